"""PyTorch 2 (``torch_export``, ``.pt2``) and LiteRT (``litert``, ``.tflite``) served by a real
gateway and asked through real clients: tensorgate's own and Triton's ``tritonclient``.

The model files are built once per session: one AOTInductor compile of the scorer (packaged
alone, and again beside the ExportedProgram that describes it), ExportedPrograms, and
``.tflite`` files from TensorFlow's converter. Outputs are compared with each framework run
directly on the same files, not through tensorgate's backends.
"""

from __future__ import annotations

import json
import os
import signal
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tensorgate.backends import BackendError, BackendOptions
from tensorgate.backends.litert import LiteRTBackend
from tensorgate.backends.torch_export import TorchExportBackend, archive_kind
from tensorgate.clients import Client
from tensorgate.server.demo import (
    MLP_TENSORS,
    build_mlp_onnx,
    build_mlp_tflite,
    export_dense,
    import_tensorflow,
    mlp_reference,
    mlp_weights,
)

from .modelfactory import write_broken_model
from .serverproc import ServerProcess, run_triton_script, wait_until

# Talks gRPC: runs against both front ends (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("front_end")

ATOL = 1e-5
WORKER_MODULE = "tensorgate.backends.isolated"
#: The scorer's variants: one of each kind of file, no config.toml (the files say it all).
SCORER_VARIANTS = ("aoti", "export", "tflite", "onnx")
PLATFORMS = {
    "aoti": "pytorch_export",
    "export": "pytorch_export",
    "tflite": "tensorflow_lite",
    "onnx": "onnxruntime_onnx",
}

BATCHED_CONFIG = (
    "max_batch_size = 16\n"
    "intra_op_threads = 1\n"
    "\n[batching]\nmax_queue_delay_us = 5000\n"
    "\n[instances]\ncount = 2\n"
    "\n" + MLP_TENSORS
)
RENAMED_CONFIG = """
[[input]]
name = "x"

[[output]]
name = "logits"
"""
LITE_CONFIG = "intra_op_threads = 1\n\n[instances]\ncount = 2\n"


def tensors(meta: dict[str, Any], kind: str) -> list[tuple[str, str, list[int]]]:
    return [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta[kind]]


def rows(n: int, seed: int, width: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, width)).astype(np.float32)


# --- the model files ------------------------------------------------------------------------


def _pair_program() -> Any:
    """An ExportedProgram with two inputs of different dtypes and named (dict) outputs."""
    import torch

    class Pair(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(4, 3)

        def forward(self, features: torch.Tensor, counts: torch.Tensor) -> dict:
            return {
                "score": torch.relu(self.proj(features)),
                "total": counts.sum(dim=1, keepdim=True),
            }

    torch.manual_seed(0)
    batch = torch.export.Dim("batch")
    example = (torch.randn(2, 4), torch.ones(2, 5, dtype=torch.int64))
    return torch.export.export(
        Pair().eval(), example, dynamic_shapes={"features": {0: batch}, "counts": {0: batch}}
    )


def _tflite_without_signatures(path: Path) -> Path:
    """A TF1-style graph converted from a session: its .tflite has no SignatureDef."""
    tf = import_tensorflow()
    with tf.Graph().as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 4], name="features")
        y = tf.identity(x * 2.0, name="doubled")
        with tf.compat.v1.Session() as session:
            flatbuffer = tf.compat.v1.lite.TFLiteConverter.from_session(session, [x], [y]).convert()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(flatbuffer)
    return path


@pytest.fixture(scope="session")
def edge_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each kind of file once: {"aoti", "combined", "export", "pair", "tflite", "nosig"}."""
    import torch
    from torch.export.pt2_archive._package import package_pt2

    root = tmp_path_factory.mktemp("edge-files")
    weights = mlp_weights()
    program = export_dense(weights)
    files = {
        "aoti": root / "aoti.pt2",
        "combined": root / "combined.pt2",
        "export": root / "export.pt2",
        "pair": root / "pair.pt2",
        "tflite": root / "scorer.tflite",
        "nosig": root / "nosig.tflite",
        "onnx": root / "scorer.onnx",
    }
    torch._inductor.aoti_compile_and_package(program, package_path=str(files["aoti"]))
    # The same compiled files, packaged with the program that describes them.
    unpacked = root / "unpacked"
    with zipfile.ZipFile(files["aoti"]) as archive:
        archive.extractall(unpacked)
    compiled = sorted(
        str(p) for p in unpacked.rglob("*") if p.is_file() and "aotinductor" in p.parts
    )
    package_pt2(files["combined"], exported_programs=program, aoti_files={"model": compiled})
    torch.export.save(program, str(files["export"]))
    torch.export.save(_pair_program(), str(files["pair"]))
    build_mlp_tflite(files["tflite"], weights)
    _tflite_without_signatures(files["nosig"])
    build_mlp_onnx(files["onnx"], weights)
    return files


def _place(source: Path, target: Path, config: str | None = None) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(source.read_bytes())
    if config is not None:
        (target.parent.parent / "config.toml").write_text(config)


@pytest.fixture(scope="session")
def edge_repo(tmp_path_factory: pytest.TempPathFactory, edge_files: dict[str, Path]) -> Path:
    root = tmp_path_factory.mktemp("edge") / "models"
    f = edge_files
    # Every kind of file as a variant of one model: the named ones complete the AOTI package.
    _place(f["aoti"], root / "scorer" / "aoti" / "model.pt2")
    _place(f["export"], root / "scorer" / "export" / "model.pt2")
    _place(f["tflite"], root / "scorer" / "tflite" / "model.tflite")
    _place(f["onnx"], root / "scorer" / "onnx" / "model.onnx")
    # An AOTI package alone, completed by config.toml; batching and two instances.
    _place(f["aoti"], root / "batched" / "1" / "model.pt2", BATCHED_CONFIG)
    # A package that carries its program: described by it, no config.toml.
    _place(f["combined"], root / "combined" / "1" / "model.pt2")
    _place(f["pair"], root / "pair" / "1" / "model.pt2")
    # config.toml renames the program's tensors; its dtypes and shapes still apply.
    _place(f["export"], root / "renamed" / "1" / "model.pt2", RENAMED_CONFIG)
    _place(
        f["aoti"],
        root / "isolated" / "1" / "model.pt2",
        'isolation = "process"\n\n' + MLP_TENSORS,
    )
    _place(f["aoti"], root / "bare" / "1" / "model.pt2")  # nothing says its dtypes
    _place(f["tflite"], root / "lite" / "1" / "model.tflite", LITE_CONFIG)
    _place(f["nosig"], root / "nosig" / "1" / "model.tflite")
    write_broken_model(root / "broken_pt2" / "1" / "model.pt2")
    write_broken_model(root / "broken_tflite" / "1" / "model.tflite")
    return root


@pytest.fixture(scope="module")
def server(
    front_end: str, edge_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    with ServerProcess(edge_repo, tmp_path_factory.mktemp("edge-server")) as proc:
        yield proc
    assert proc.proc is not None and proc.proc.returncode == 0, proc.log()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[Client]:
    with Client(server.address) as c:
        yield c


# --- the frameworks, run directly on the files ------------------------------------------------


def run_aoti(path: Path, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return torch._inductor.aoti_load_package(str(path))(torch.from_numpy(x)).numpy()


def run_exported(path: Path, *xs: np.ndarray) -> Any:
    import torch

    with torch.inference_mode():
        return torch.export.load(str(path)).module()(*(torch.from_numpy(x) for x in xs))


def run_tflite(path: Path, x: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(model_path=str(path)).get_signature_runner()(input=x)["output"]


def run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["output"], {"input": x})[0]


def scorer_direct(files: dict[str, Path], variant: str, x: np.ndarray) -> np.ndarray:
    if variant == "aoti":
        return run_aoti(files["aoti"], x)
    if variant == "export":
        return run_exported(files["export"], x).numpy()
    if variant == "tflite":
        return run_tflite(files["tflite"], x)
    return run_onnx(files["onnx"], x)


# --- the archive kinds ------------------------------------------------------------------------


def test_archive_kind_tells_the_pt2_formats_apart(edge_files: dict[str, Path]) -> None:
    assert archive_kind(edge_files["aoti"]) == (True, False)
    assert archive_kind(edge_files["export"]) == (False, True)
    assert archive_kind(edge_files["combined"]) == (True, True)


# --- signatures, through ModelMetadata -------------------------------------------------------


def test_signatures_come_from_the_programs(client: Client) -> None:
    pair = client.model_metadata("pair")
    assert pair["platform"] == "pytorch_export"
    assert tensors(pair, "inputs") == [
        ("features", "FP32", [-1, 4]),
        ("counts", "INT64", [-1, 5]),
    ]
    assert tensors(pair, "outputs") == [("score", "FP32", [-1, 3]), ("total", "INT64", [-1, 1])]
    # A compiled package beside its program: the program describes it (outputs positional).
    combined = client.model_metadata("combined")
    assert tensors(combined, "inputs") == [("input", "FP32", [-1, 64])]
    assert tensors(combined, "outputs") == [("output__0", "FP32", [-1, 10])]


def test_litert_names_come_from_the_signature_def(client: Client) -> None:
    meta = client.model_metadata("lite")
    assert meta["platform"] == "tensorflow_lite"
    # The converter names the tensor serving_default_input:0; its SignatureDef says "input".
    assert tensors(meta, "inputs") == [("input", "FP32", [-1, 64])]
    assert tensors(meta, "outputs") == [("output", "FP32", [-1, 10])]
    nosig = client.model_metadata("nosig")
    assert tensors(nosig, "inputs") == [("features", "FP32", [-1, 4])]
    assert tensors(nosig, "outputs") == [("doubled", "FP32", [-1, 4])]


def test_scorer_variants_present_one_signature(client: Client) -> None:
    meta = client.model_metadata("scorer")
    assert sorted(meta["versions"]) == sorted(SCORER_VARIANTS)
    assert tensors(meta, "inputs") == [("input", "FP32", [-1, 64])]
    assert tensors(meta, "outputs") == [("output", "FP32", [-1, 10])]
    platforms = {v: client.model_metadata("scorer", v)["platform"] for v in SCORER_VARIANTS}
    assert platforms == PLATFORMS


def test_config_toml_completes_and_renames(client: Client) -> None:
    batched = client.model_metadata("batched")  # the package alone says no dtype or shape
    assert tensors(batched, "inputs") == [("input", "FP32", [-1, 64])]
    assert tensors(batched, "outputs") == [("output", "FP32", [-1, 10])]
    config = client.model_config("batched")
    assert config["max_batch_size"] == 16
    renamed = client.model_metadata("renamed")  # names from config, the rest from the program
    assert tensors(renamed, "inputs") == [("x", "FP32", [-1, 64])]
    assert tensors(renamed, "outputs") == [("logits", "FP32", [-1, 10])]
    x = rows(3, seed=4)
    result = client.infer("renamed", {"x": x})
    np.testing.assert_allclose(result["logits"], mlp_reference(x, mlp_weights()), atol=ATOL)


# --- inference --------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", SCORER_VARIANTS)
@pytest.mark.parametrize("batch", [1, 5, 32])
def test_scorer_variants_equal_their_frameworks(
    client: Client, edge_files: dict[str, Path], variant: str, batch: int
) -> None:
    x = rows(batch, seed=batch)
    result = client.infer("scorer", {"input": x}, version=variant)
    assert result.variant == variant
    assert result["output"].shape == (batch, 10) and result["output"].dtype == np.float32
    np.testing.assert_allclose(result["output"], scorer_direct(edge_files, variant, x), atol=ATOL)
    np.testing.assert_allclose(result["output"], mlp_reference(x, mlp_weights()), atol=ATOL)


def test_dict_outputs_and_int64_from_an_exported_program(
    client: Client, edge_files: dict[str, Path]
) -> None:
    features = rows(3, seed=9, width=4)
    counts = np.arange(15, dtype=np.int64).reshape(3, 5)
    result = client.infer("pair", {"features": features, "counts": counts})
    expected = run_exported(edge_files["pair"], features, counts)
    np.testing.assert_allclose(result["score"], expected["score"].numpy(), atol=ATOL)
    assert result["total"].dtype == np.int64
    np.testing.assert_array_equal(result["total"], counts.sum(axis=1, keepdims=True))


def test_litert_without_signatures_serves_by_tensor_name(client: Client) -> None:
    x = rows(6, seed=2, width=4)
    np.testing.assert_allclose(client.infer("nosig", {"features": x})["doubled"], 2 * x)


@pytest.mark.parametrize("model", ["batched", "lite"])
def test_concurrent_requests_of_mixed_sizes_stay_correct(client: Client, model: str) -> None:
    # batched: an AOTI package with dynamic batching over two runners; lite: two LiteRT
    # interpreters, each resized to every request's batch size.
    inputs = [rows(int(n), seed=i) for i, n in enumerate([1, 3, 7, 2, 16, 5, 1, 9] * 4)]

    with ThreadPoolExecutor(max_workers=8) as pool:
        outputs = list(
            pool.map(lambda x: client.infer(model, {"input": x}, timeout=60)["output"], inputs)
        )
    weights = mlp_weights()
    for x, got in zip(inputs, outputs, strict=True):
        np.testing.assert_allclose(got, mlp_reference(x, weights), atol=ATOL)


def test_isolated_pt2_worker_restarts_and_serves_again(
    server: ServerProcess, client: Client
) -> None:
    def worker() -> int | None:
        return next(
            (pid for pid, cmd in server.children().items() if "--label isolated/1" in cmd), None
        )

    old = worker()
    assert old is not None and WORKER_MODULE in server.children()[old]
    x = rows(4, seed=5)
    expected = mlp_reference(x, mlp_weights())
    np.testing.assert_allclose(
        client.infer("isolated", {"input": x})["output"], expected, atol=ATOL
    )
    assert client.model_metadata("isolated")["platform"] == "pytorch_export"
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: worker() not in (None, old), 60, "a new pt2 worker")
    wait_until(lambda: client.is_model_ready("isolated"), 60, "isolated to be ready again")

    def serves() -> bool:
        try:
            got = client.infer("isolated", {"input": x}, timeout=30)["output"]
        except Exception:
            return False
        return bool(np.allclose(got, expected, atol=ATOL))

    wait_until(serves, 60, "the restarted worker to serve")


# --- failures are reported, the rest serves ----------------------------------------------------


def test_unloadable_files_are_reported_while_the_rest_serves(client: Client) -> None:
    index = {m["name"]: m for m in client.repository_index()}
    assert index["broken_pt2"]["state"] == "UNAVAILABLE"
    assert "not a .pt2 archive" in index["broken_pt2"]["reason"]
    assert "model.pt2" in index["broken_pt2"]["reason"]
    assert index["broken_tflite"]["state"] == "UNAVAILABLE"
    assert "cannot load LiteRT model" in index["broken_tflite"]["reason"]
    assert "model.tflite" in index["broken_tflite"]["reason"]
    # A compiled package alone does not say its dtypes: the reason names the fix.
    assert index["bare"]["state"] == "UNAVAILABLE"
    assert "[[input]]" in index["bare"]["reason"] and "config.toml" in index["bare"]["reason"]
    for name in ("scorer", "batched", "combined", "pair", "lite", "nosig"):
        assert index[name]["state"] == "READY", index[name]
        assert client.is_model_ready(name)


def test_litert_signature_name_from_config_is_checked(edge_files: dict[str, Path]) -> None:
    backend = LiteRTBackend()
    with pytest.raises(BackendError, match=r"no signature 'other'.*'serving_default'"):
        backend.load(edge_files["tflite"], BackendOptions(signature_name="other"))


def test_pt2_archive_without_a_model_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.pt2"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("model/extra/notes.txt", "no program here")
    with pytest.raises(BackendError, match="neither an ExportedProgram"):
        TorchExportBackend().load(path, BackendOptions())


# --- Triton's client --------------------------------------------------------------------------

# Runs under the tritonclient interpreter. argv: address, workdir, variants (JSON).
TRITON_SCRIPT = r"""
import json
import sys
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

address, workdir, variants = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
client = grpcclient.InferenceServerClient(address)
report = {}


def metadata(model, version=""):
    m = client.get_model_metadata(model, version)
    return {"platform": m.platform, "versions": sorted(m.versions),
            "inputs": [[t.name, t.datatype, list(t.shape)] for t in m.inputs],
            "outputs": [[t.name, t.datatype, list(t.shape)] for t in m.outputs]}


x = np.load(workdir / "input.npy")
for model, version in [["scorer", v] for v in variants] + [["lite", ""], ["batched", ""]]:
    tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer(model, [tensor], model_version=version)
    np.save(workdir / f"{model}_{version}.npy", result.as_numpy("output"))
    report[f"infer/{model}/{version}"] = result.get_response().model_version
for model, version in [["scorer", v] for v in variants] + [["pair", ""], ["lite", ""]]:
    report[f"metadata/{model}/{version}"] = metadata(model, version)
report["ready"] = {m: client.is_model_ready(m) for m in ["scorer", "lite", "broken_pt2"]}
print(json.dumps(report))
"""


def test_tritonclient_serves_pt2_and_tflite(
    server: ServerProcess, edge_files: dict[str, Path], tmp_path: Path
) -> None:
    x = rows(4, seed=11)
    np.save(tmp_path / "input.npy", x)
    report = run_triton_script(
        TRITON_SCRIPT, server.address, str(tmp_path), json.dumps(list(SCORER_VARIANTS))
    )
    for variant in SCORER_VARIANTS:
        assert report[f"infer/scorer/{variant}"] == variant
        got = np.load(tmp_path / f"scorer_{variant}.npy")
        np.testing.assert_allclose(got, scorer_direct(edge_files, variant, x), atol=ATOL)
        meta = report[f"metadata/scorer/{variant}"]
        assert meta["platform"] == PLATFORMS[variant]
        assert meta["inputs"] == [["input", "FP32", [-1, 64]]]
    np.testing.assert_allclose(
        np.load(tmp_path / "lite_.npy"), run_tflite(edge_files["tflite"], x), atol=ATOL
    )
    np.testing.assert_allclose(
        np.load(tmp_path / "batched_.npy"), run_aoti(edge_files["aoti"], x), atol=ATOL
    )
    assert report["metadata/pair/"]["inputs"] == [
        ["features", "FP32", [-1, 4]],
        ["counts", "INT64", [-1, 5]],
    ]
    assert report["metadata/pair/"]["outputs"] == [
        ["score", "FP32", [-1, 3]],
        ["total", "INT64", [-1, 1]],
    ]
    assert report["metadata/lite/"]["platform"] == "tensorflow_lite"
    assert report["ready"] == {"scorer": True, "lite": True, "broken_pt2": False}
