"""``tensorgate convert``: a real torch module and a real SavedModel, converted by the CLI
into every format, checked for parity, and served by the real server.

The PyTorch conversion compiles an AOTInductor package (about 40 s of CPU): it runs once per
session, in a fixture, and the tests read what it wrote.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from tensorgate.clients import Client
from tensorgate.protos import admin_pb2 as apb
from tensorgate.protos import admin_pb2_grpc as apb_grpc
from tensorgate.server.convert.parity import compare, random_samples
from tensorgate.server.convert.tensors import TensorDecl, parse_tensor_decl

from .serverproc import ServerProcess

# Talks gRPC: runs against both front ends (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("front_end")

CLI = (sys.executable, "-m", "tensorgate.server.cli")
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}

#: The torch source: a classifier returning named outputs, and one with an op the ONNX
#: exporter has no translation for (erfinv), which TorchScript runs.
TORCH_SOURCE = """
import torch


class Classifier(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.hidden = torch.nn.Linear(16, 32)
        self.head = torch.nn.Linear(32, 4)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.head(torch.relu(self.hidden(features)))
        return {"logits": logits, "probabilities": torch.softmax(logits, dim=-1)}


class Squashed(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(8)
        self.layer = torch.nn.Linear(16, 4)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.erfinv(torch.tanh(self.layer(features)) * 0.5)


def build():
    return Classifier()


def squashed():
    return Squashed()


def not_a_module():
    return 42
"""

TORCH_INPUT = "features:FP32:-1,16"


def tensorgate(*args: str, timeout: float = 900.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=ENV)


@dataclass(frozen=True)
class Converted:
    model_dir: Path
    run: subprocess.CompletedProcess[str]

    @property
    def config(self) -> dict:
        return tomllib.loads((self.model_dir / "config.toml").read_text())

    @property
    def parity(self) -> dict:
        return json.loads((self.model_dir / "parity.json").read_text())


# -- the sources ------------------------------------------------------------------------
@pytest.fixture(scope="session")
def torch_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("torch-source") / "classifier.py"
    path.write_text(TORCH_SOURCE)
    return path


def torch_reference(torch_file: Path, function: str, x: np.ndarray) -> dict[str, np.ndarray]:
    """What the source module itself returns, run here in eager mode."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("convert_test_source", torch_file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with torch.inference_mode():
        out = getattr(module, function)().eval()(torch.from_numpy(x))
    if isinstance(out, dict):
        return {k: v.numpy() for k, v in out.items()}
    return {"output": out.numpy()}


@pytest.fixture(scope="session")
def savedmodel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SavedModel with a named input and output and a dynamic batch dimension."""
    from tensorgate.server.demo import import_tensorflow

    tf = import_tensorflow()
    weights = np.random.default_rng(11).standard_normal((12, 5)).astype(np.float32)

    class Scorer(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = tf.Variable(weights)

        @tf.function(input_signature=[tf.TensorSpec([None, 12], tf.float32, name="pixels")])
        def serve(self, pixels):
            return {"scores": tf.nn.softmax(tf.matmul(pixels, self.w))}

    scorer = Scorer()
    directory = tmp_path_factory.mktemp("tf-source") / "scorer"
    tf.saved_model.save(scorer, str(directory), signatures={"serving_default": scorer.serve})
    return directory


def tf_reference(savedmodel: Path, x: np.ndarray) -> np.ndarray:
    from tensorgate.server.demo import import_tensorflow

    tf = import_tensorflow()
    signature = tf.saved_model.load(str(savedmodel)).signatures["serving_default"]
    return signature(pixels=tf.constant(x))["scores"].numpy()


# -- the conversions (once per session) -------------------------------------------------
@pytest.fixture(scope="session")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("converted") / "models"


@pytest.fixture(scope="session")
def converted_torch(repo: Path, torch_file: Path) -> Converted:
    out = repo / "classifier"
    run = tensorgate(
        "convert", "pytorch", f"{torch_file}:build", "--input", TORCH_INPUT, "--out", str(out)
    )
    return Converted(out, run)


@pytest.fixture(scope="session")
def converted_tf(repo: Path, savedmodel: Path) -> Converted:
    out = repo / "scorer"
    run = tensorgate("convert", "tensorflow", str(savedmodel), "--out", str(out))
    return Converted(out, run)


@pytest.fixture(scope="module")
def gateway(
    front_end: str,
    repo: Path,
    converted_torch: Converted,
    converted_tf: Converted,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServerProcess]:
    """The real server on the repository the conversions wrote, as they wrote it."""
    assert converted_torch.run.returncode == 0, converted_torch.run.stderr
    assert converted_tf.run.returncode == 0, converted_tf.run.stderr
    proc = ServerProcess(repo, tmp_path_factory.mktemp("convert-server"))
    with proc:
        yield proc
    assert proc.proc is not None and proc.proc.returncode == 0, proc.log()


# -- what the conversions wrote ---------------------------------------------------------
def test_pytorch_writes_every_variant_config_and_parity(converted_torch: Converted) -> None:
    run, model_dir = converted_torch.run, converted_torch.model_dir
    assert run.returncode == 0, run.stdout + run.stderr
    for name in ("torch/model.pt", "pt2/model.pt2", "onnx/model.onnx", "config.toml"):
        assert (model_dir / name).is_file(), f"convert did not write {name}"
    config = converted_torch.config
    assert config["default_variant"] == "torch"
    assert config["input"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 16]}]
    # The module returns a dict: its keys name the outputs, in its order.
    assert config["output"] == [
        {"name": "logits", "datatype": "FP32", "shape": [-1, 4]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 4]},
    ]
    parity = converted_torch.parity
    assert set(parity) == {"torch", "pt2", "onnx"}
    for variant, figures in parity.items():
        assert figures["samples"] == 64, variant
        assert figures["passed"] is True, (variant, figures)
        assert 0 <= figures["max_abs_diff"] <= 1e-4, (variant, figures)
        assert figures["max_rel_diff"] <= 1e-3, (variant, figures)
        assert figures["top1_agreement"] == 1.0, (variant, figures)
    for variant in ("torch", "pt2", "onnx"):  # the table on the terminal
        assert any(
            line.split("│")[1].strip() == variant and "agrees" in line
            for line in run.stdout.splitlines()
            if line.count("│") > 2
        ), run.stdout
    assert not any(p.name.startswith(".") for p in model_dir.parent.iterdir()), "staging left"


def test_pytorch_onnx_file_holds_the_source_model(
    converted_torch: Converted, torch_file: Path
) -> None:
    """The written ONNX file, read by onnxruntime directly, computes what the module does."""
    import onnxruntime

    session = onnxruntime.InferenceSession(
        str(converted_torch.model_dir / "onnx/model.onnx"), providers=["CPUExecutionProvider"]
    )
    assert [i.name for i in session.get_inputs()] == ["features"]
    assert [o.name for o in session.get_outputs()] == ["logits", "probabilities"]
    x = np.random.default_rng(1).standard_normal((5, 16)).astype(np.float32)
    logits, probabilities = session.run(None, {"features": x})
    want = torch_reference(torch_file, "build", x)
    np.testing.assert_allclose(logits, want["logits"], atol=1e-5)
    np.testing.assert_allclose(probabilities, want["probabilities"], atol=1e-5)


def test_tensorflow_writes_every_variant_config_and_parity(converted_tf: Converted) -> None:
    run, model_dir = converted_tf.run, converted_tf.model_dir
    assert run.returncode == 0, run.stdout + run.stderr
    for name in (
        "tf/model.savedmodel/saved_model.pb",
        "tflite/model.tflite",
        "onnx/model.onnx",
        "config.toml",
    ):
        assert (model_dir / name).is_file(), f"convert did not write {name}"
    config = converted_tf.config
    assert config["default_variant"] == "tf"
    # Names from the SavedModel's signature, the dynamic batch as -1.
    assert config["input"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 12]}]
    assert config["output"] == [{"name": "scores", "datatype": "FP32", "shape": [-1, 5]}]
    parity = converted_tf.parity
    assert set(parity) == {"tf", "tflite", "onnx"}
    assert parity["tf"]["max_abs_diff"] == 0.0  # the source itself, as the server loads it
    for variant, figures in parity.items():
        assert figures["passed"] is True and figures["samples"] == 64, (variant, figures)
        assert figures["max_abs_diff"] <= 1e-4 and figures["top1_agreement"] == 1.0, figures


# -- serving what was written -----------------------------------------------------------
def test_every_converted_variant_serves_the_source_outputs(
    gateway: ServerProcess, torch_file: Path, savedmodel: Path
) -> None:
    rng = np.random.default_rng(5)
    with Client(gateway.address) as client:
        x = rng.standard_normal((3, 16)).astype(np.float32)
        want = torch_reference(torch_file, "build", x)
        for variant in ("torch", "pt2", "onnx"):
            got = client.infer("classifier", {"features": x}, version=variant, timeout=60)
            assert got.variant == variant
            for name in ("logits", "probabilities"):
                np.testing.assert_allclose(got[name], want[name], atol=1e-5, err_msg=variant)
        assert client.infer("classifier", {"features": x}, timeout=60).variant == "torch"

        pixels = rng.standard_normal((2, 12)).astype(np.float32)
        scores = tf_reference(savedmodel, pixels)
        for variant in ("tf", "tflite", "onnx"):
            got = client.infer("scorer", {"pixels": pixels}, version=variant, timeout=60)
            assert got.variant == variant
            np.testing.assert_allclose(got["scores"], scores, atol=1e-5, err_msg=variant)
        assert client.infer("scorer", {"pixels": pixels}, timeout=60).variant == "tf"

        meta = client.model_metadata("classifier")
        assert [(t["name"], t["shape"]) for t in meta["outputs"]] == [
            ("logits", ["-1", "4"]),
            ("probabilities", ["-1", "4"]),
        ]


def test_shadow_keeps_comparing_the_new_variants_on_live_traffic(
    converted_torch: Converted, tmp_path: Path
) -> None:
    """The shadow table config.toml suggests, switched on, compares the converted variants
    with the default one on every request."""
    assert converted_torch.run.returncode == 0, converted_torch.run.stderr
    root = tmp_path / "models"
    model_dir = root / "classifier"
    shutil.copytree(converted_torch.model_dir, model_dir)
    config = model_dir / "config.toml"
    text = config.read_text()
    assert '# shadow = { variants = ["pt2", "onnx"], fraction = 0.1 }' in text
    text = text.replace("# [routing]", "[routing]").replace("# shadow = ", "shadow = ")
    config.write_text(text.replace("fraction = 0.1", "fraction = 1.0"))
    n = 10
    with ServerProcess(root, tmp_path) as server, Client(server.address) as client:
        for i in range(n):
            x = np.random.default_rng(i).standard_normal((2, 16)).astype(np.float32)
            assert client.infer("classifier", {"features": x}, timeout=60).variant == "torch"
        with grpc.insecure_channel(server.address) as channel:
            admin = apb_grpc.RoutingAdminStub(channel)
            deadline = time.monotonic() + 60  # mirrors run after the replies: wait for them
            while True:
                (route,) = admin.GetRoutes(
                    apb.GetRoutesRequest(model="classifier"), timeout=10
                ).models
                comparisons = {c.shadow: c for c in route.shadow_comparisons}
                compared = [
                    comparisons[v].compared if v in comparisons else 0 for v in ("pt2", "onnx")
                ]
                if compared == [n, n] or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
    assert compared == [n, n], server.log()[-2000:]
    for variant in ("pt2", "onnx"):
        c = comparisons[variant]
        assert c.primary == "torch" and c.failed == 0
        assert c.worst_abs_diff < 1e-4 and c.argmax_agree == c.argmax_rows > 0


# -- failures -------------------------------------------------------------------------
def test_a_variant_beyond_the_tolerance_exits_1_naming_it(
    converted_torch: Converted, torch_file: Path, tmp_path: Path
) -> None:
    # The same samples (a fixed seed) as the session's conversion, where ONNX Runtime's
    # float32 arithmetic differed from torch's by a little: half of that is out of reach.
    measured = converted_torch.parity["onnx"]["max_abs_diff"]
    assert measured > 0, "precondition: ONNX Runtime and torch round differently here"
    out = tmp_path / "models" / "classifier"
    run = tensorgate(
        "convert", "pytorch", f"{torch_file}:build", "--input", TORCH_INPUT, "--out", str(out),
        "--to", "torchscript,onnx", "--atol", str(measured / 2), "--rtol", "0",
    )  # fmt: skip
    assert run.returncode == 1, run.stdout + run.stderr
    assert "variant 'onnx' (onnx): exceeds --atol" in run.stderr
    assert "variant 'torch'" not in run.stderr  # TorchScript runs torch's own kernels
    parity = json.loads((out / "parity.json").read_text())
    assert parity["onnx"]["passed"] is False
    assert parity["onnx"]["max_abs_diff"] == pytest.approx(measured)
    assert parity["torch"]["passed"] is True
    assert "exceeds tolerance" in run.stdout


def test_an_op_one_exporter_lacks_is_reported_and_the_rest_written(
    torch_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "models" / "squashed"
    run = tensorgate(
        "convert", "pytorch", f"{torch_file}:squashed", "--input", TORCH_INPUT,
        "--out", str(out), "--to", "torchscript,onnx",
    )  # fmt: skip
    assert run.returncode == 1, run.stdout + run.stderr
    assert "variant 'onnx' (onnx): not produced:" in run.stderr
    assert "erf_inv" in run.stderr  # the exporter's own reason
    assert (out / "torch" / "model.pt").is_file()
    assert not (out / "onnx").exists()
    parity = json.loads((out / "parity.json").read_text())
    assert parity["torch"]["passed"] is True and parity["torch"]["samples"] == 64
    assert "erf_inv" in parity["onnx"]["error"]
    config = tomllib.loads((out / "config.toml").read_text())
    assert config["default_variant"] == "torch"
    assert config["output"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 4]}]


def test_data_file_gives_the_samples(torch_file: Path, tmp_path: Path) -> None:
    data = tmp_path / "rows.npz"
    rows = np.random.default_rng(3).standard_normal((10, 16)).astype(np.float32)
    np.savez(data, features=rows)
    out = tmp_path / "models" / "classifier"
    run = tensorgate(
        "convert", "pytorch", f"{torch_file}:build", "--input", TORCH_INPUT, "--out", str(out),
        "--to", "torchscript", "--data", str(data),
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert json.loads((out / "parity.json").read_text())["torch"]["samples"] == 10
    # A rerun replaces what an earlier conversion wrote.
    rerun = tensorgate(
        "convert", "pytorch", f"{torch_file}:build", "--input", TORCH_INPUT, "--out", str(out),
        "--to", "torchscript", "--samples", "3",
    )  # fmt: skip
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert json.loads((out / "parity.json").read_text())["torch"]["samples"] == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--input", "features:FP32"], "use NAME:DATATYPE:SHAPE"),
        (["--input", "features:FLOAT:-1,16"], "unknown datatype 'FLOAT'"),
        (["--input", "features:FP32:-1,x"], "must be comma-separated integers"),
        (["--input", TORCH_INPUT, "--to", "onnx,tflite"], "cannot convert to tflite"),
    ],
)
def test_bad_arguments_are_refused_with_the_fix(
    torch_file: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    out = tmp_path / "models" / "m"
    run = tensorgate("convert", "pytorch", f"{torch_file}:build", "--out", str(out), *args)
    assert run.returncode == 2, run.stdout + run.stderr
    assert message in run.stderr
    assert not out.exists()


def test_bad_sources_are_refused(torch_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "models" / "m"
    cases = {
        f"{torch_file}:missing": "defines no function 'missing'",
        f"{torch_file}:not_a_module": "returned int; it must return an nn.Module",
        f"{tmp_path / 'absent.py'}:build": "no such file",
    }
    for source, message in cases.items():
        run = tensorgate("convert", "pytorch", source, "--input", TORCH_INPUT, "--out", str(out))
        assert run.returncode == 2 and message in run.stderr, run.stderr
    narrow = "features:FP32:-1,15"  # the model takes 16 features
    run = tensorgate(
        "convert", "pytorch", f"{torch_file}:build", "--input", narrow, "--out", str(out)
    )
    assert run.returncode == 2, run.stderr
    assert "fails on the declared inputs (--input features:FP32:-1,15" in run.stderr
    assert not out.exists()
    occupied = tmp_path / "models" / "occupied"
    occupied.mkdir(parents=True)
    (occupied / "notes.txt").write_text("mine")
    run = tensorgate("convert", "tensorflow", str(tmp_path), "--out", str(occupied))
    assert run.returncode == 2 and "was not written by tensorgate convert" in run.stderr
    assert (occupied / "notes.txt").read_text() == "mine"
    run = tensorgate("convert", "tensorflow", str(tmp_path), "--out", str(out))
    assert run.returncode == 2 and "not a SavedModel directory" in run.stderr


# -- parity arithmetic ------------------------------------------------------------------
def test_parity_uses_the_allclose_rule_and_counts_top1_rows() -> None:
    ref = [{"y": np.array([[1.0, 2.0, 0.0], [0.0, 0.5, 0.48]], np.float32)}]
    near = [{"y": np.array([[1.001, 2.0, 0.0], [0.0, 0.5, 0.53]], np.float32)}]
    c = compare(ref, near, ["y"], atol=0.06, rtol=0.0)
    assert c.passed and c.samples == 1
    assert c.top1_agreement == 0.5  # the second row's arg-max moved
    assert c.max_abs_diff == pytest.approx(0.05, abs=1e-6)
    assert c.max_rel_diff == pytest.approx(0.05 / 0.48, abs=1e-5)
    assert not compare(ref, near, ["y"], atol=0.01, rtol=0.05).passed  # 0.05 > 0.01 + 0.024
    assert compare(ref, near, ["y"], atol=0.0, rtol=0.2).passed  # 0.05 <= 0.2 * 0.48
    nan = [{"y": np.array([np.nan, 1.0], np.float32)}]
    assert compare(nan, nan, ["y"], 0.0, 0.0).passed
    assert not compare(nan, [{"y": np.array([0.0, 1.0], np.float32)}], ["y"], 1.0, 1.0).passed


def test_random_samples_are_seeded_and_vary_the_dynamic_dimensions() -> None:
    decls = [parse_tensor_decl("a:FP32:-1,3"), TensorDecl("b", "INT64", (-1,))]
    first, again = random_samples(decls, 32), random_samples(decls, 32)
    assert all(np.array_equal(x["a"], y["a"]) for x, y in zip(first, again, strict=True))
    sizes = {s["a"].shape[0] for s in first}
    assert len(sizes) > 1 and sizes <= {1, 2, 3, 4}
    assert all(s["a"].shape[0] == s["b"].shape[0] for s in first)  # one size per sample
    assert all(s["b"].dtype == np.int64 for s in first)
