"""Reduced precisions: ``tensorgate convert --precision`` writing real reduced variants of
the demo scorer (a 64-256-256-10 MLP) from PyTorch and from a SavedModel, judged, listed in
config.toml and served by the real server; and ``[variants.NAME] precision = "bf16"``
serving an FP32 torch file in bfloat16 autocast through the real server. The tests that
talk gRPC run against both front ends (the ``front_end`` fixture, tests/conftest.py).

The PyTorch conversion compiles two AOTInductor packages (pt2, pt2-bf16; about 40 s of CPU
each): the conversions run once per session, in fixtures, and the tests read what they wrote.
"""

from __future__ import annotations

import json
import shutil
import tomllib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tensorgate.clients import Client
from tensorgate.errors import ConfigError
from tensorgate.server.config import load_model_config
from tensorgate.server.convert.parity import compare, parse_tolerances
from tensorgate.server.demo.weights import mlp_reference, mlp_weights

from .serverproc import ServerProcess
from .test_convert import Converted, tensorgate

#: The PyTorch source: the demo scorer's module with its seeded weights.
TORCH_SOURCE = """
from tensorgate.server.demo.torchscript import dense_module
from tensorgate.server.demo.weights import mlp_weights


def build():
    return dense_module(mlp_weights(3))
"""
TORCH_WEIGHTS_SEED = 3
TF_WEIGHTS_SEED = 4
TORCH_INPUT = "input:FP32:-1,64"

TORCH_PRODUCED = ("torch", "torch-bf16", "torch-int8", "pt2", "pt2-bf16", "onnx", "onnx-int8")
#: Combinations the frameworks cannot produce: torch.export cannot trace torch.ao's packed
#: int8 weights, ONNX Runtime has no bfloat16 Gemm on the CPU, TensorFlow writes no
#: reduced SavedModel.
TORCH_NOT_PRODUCED = ("pt2-int8", "onnx-bf16")
TF_PRODUCED = ("tf", "tflite", "tflite-fp16", "tflite-int8", "onnx", "onnx-fp16", "onnx-int8")
TF_NOT_PRODUCED = ("tf-fp16", "tf-int8")
TIMES = "\N{MULTIPLICATION SIGN}"
DEFAULT_TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 1e-2, "int8": 5e-2}


def confident_rows(weights_seed: int, count: int = 64) -> np.ndarray:
    """Random inputs on which the scorer's top class leads the next by more than 1 (its
    logits are a few units large): the kind of input a trained classifier mostly sees. On
    inputs that sit on a decision boundary a reduced precision flips some top-1 answers
    (about 1 row in 100 for this untrained MLP), which is what the 99 % rule is there to
    catch in real data."""
    rows = np.random.default_rng(weights_seed).standard_normal((4000, 64)).astype(np.float32)
    logits = np.sort(mlp_reference(rows, mlp_weights(weights_seed)), axis=1)
    confident = rows[logits[:, -1] - logits[:, -2] > 1.0][:count]
    assert len(confident) == count
    return confident


def write_rows(path: Path, weights_seed: int) -> Path:
    np.savez(path, input=confident_rows(weights_seed))
    return path


def variant_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def within(got: np.ndarray, want: np.ndarray, tolerance: float) -> bool:
    """The reduced precisions' rule: |got - want| <= T * max(1, max |want|)."""
    scale = max(1.0, float(np.abs(want).max()))
    return bool(np.abs(got.astype(np.float64) - want).max() <= tolerance * scale)


# -- the conversions (once per session) -------------------------------------------------
@pytest.fixture(scope="session")
def precise_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("precise") / "models"


@pytest.fixture(scope="session")
def ranker(precise_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Converted:
    directory = tmp_path_factory.mktemp("precise-source")
    source = directory / "ranker.py"
    source.write_text(TORCH_SOURCE)
    data = write_rows(directory / "rows.npz", TORCH_WEIGHTS_SEED)
    out = precise_repo / "ranker"
    run = tensorgate(
        "convert", "pytorch", f"{source}:build", "--input", TORCH_INPUT, "--out", str(out),
        "--precision", "fp32,bf16,int8", "--data", str(data),
    )  # fmt: skip
    return Converted(out, run)


@pytest.fixture(scope="session")
def tf_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tensorgate.server.demo.savedmodel import build_mlp_savedmodel

    directory = tmp_path_factory.mktemp("precise-tf") / "scorer"
    return build_mlp_savedmodel(directory, mlp_weights(TF_WEIGHTS_SEED))


@pytest.fixture(scope="session")
def scorer(
    precise_repo: Path, tf_source: Path, tmp_path_factory: pytest.TempPathFactory
) -> Converted:
    data = write_rows(tmp_path_factory.mktemp("tf-rows") / "rows.npz", TF_WEIGHTS_SEED)
    out = precise_repo / "scorer"
    run = tensorgate(
        "convert", "tensorflow", str(tf_source), "--out", str(out),
        "--precision", "fp32,fp16,int8", "--data", str(data),
    )  # fmt: skip
    return Converted(out, run)


@pytest.fixture(scope="session")
def calibrated(
    precise_repo: Path, tf_source: Path, tmp_path_factory: pytest.TempPathFactory
) -> Converted:
    """tflite-int8 quantized in full integer, calibrated on 64 rows of inputs."""
    data = write_rows(tmp_path_factory.mktemp("calibration") / "rows.npz", TF_WEIGHTS_SEED)
    out = precise_repo / "calibrated"
    run = tensorgate(
        "convert", "tensorflow", str(tf_source), "--out", str(out), "--to", "tflite",
        "--precision", "int8", "--calibration", str(data), "--data", str(data),
    )  # fmt: skip
    return Converted(out, run)


@pytest.fixture(scope="module")
def gateway(
    front_end: str,
    precise_repo: Path,
    ranker: Converted,
    scorer: Converted,
    calibrated: Converted,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServerProcess]:
    """The real server on the repository the conversions wrote, as they wrote it, with
    each front end (tests/conftest.py)."""
    for converted in (ranker, scorer, calibrated):
        assert converted.run.returncode == 0, converted.run.stdout + converted.run.stderr
    proc = ServerProcess(precise_repo, tmp_path_factory.mktemp("precise-server"))
    with proc:
        yield proc
    assert proc.proc is not None and proc.proc.returncode == 0, proc.log()


# -- what convert wrote -----------------------------------------------------------------
def check_parity_entries(converted: Converted, produced: tuple[str, ...]) -> dict:
    parity = converted.parity
    for variant in produced:
        figures = parity[variant]
        precision = variant.rpartition("-")[2] if "-" in variant else "fp32"
        assert figures["precision"] == precision, (variant, figures)
        assert figures["passed"] is True, (variant, figures)
        assert figures["samples"] == 64
        assert figures["tolerance"]["atol"] == DEFAULT_TOLERANCE[precision]
        reduced = precision != "fp32"
        assert figures["tolerance"]["scaled_by_output_max"] is reduced
        assert figures["tolerance"]["min_top1_agreement"] == (0.99 if reduced else None)
        assert figures["top1_agreement"] >= 0.99
        assert figures["bytes"] == variant_bytes(converted.model_dir / variant), variant
        assert figures["p50_ms"] > 0
    return parity


def test_pytorch_writes_each_precision_and_judges_it(ranker: Converted) -> None:
    run = ranker.run
    assert run.returncode == 0, run.stdout + run.stderr
    parity = check_parity_entries(ranker, TORCH_PRODUCED)
    assert set(parity) == {*TORCH_PRODUCED, *TORCH_NOT_PRODUCED}
    # Reduced arithmetic really happened: further from the source than FP32 rounding.
    for variant in ("torch-bf16", "torch-int8", "pt2-bf16", "onnx-int8"):
        assert parity[variant]["max_abs_diff"] > 1e-3, (variant, parity[variant])
    assert parity["torch-int8"]["bytes"] < parity["torch"]["bytes"] / 2
    assert parity["onnx-int8"]["bytes"] < parity["onnx"]["bytes"] / 2
    assert parity["torch-bf16"]["bytes"] < parity["torch"]["bytes"] * 0.75


def test_torch_bf16_holds_bfloat16_weights_and_takes_float32(ranker: Converted) -> None:
    import torch

    module = torch.jit.load(str(ranker.model_dir / "torch-bf16" / "model.pt"))
    dtypes = {p.dtype for p in module.parameters()}
    assert dtypes == {torch.bfloat16}
    x = np.random.default_rng(2).standard_normal((3, 64)).astype(np.float32)
    with torch.inference_mode():
        out = module(torch.from_numpy(x))
    assert out.dtype == torch.float32
    want = mlp_reference(x, mlp_weights(TORCH_WEIGHTS_SEED))
    assert within(out.numpy(), want, 1e-2)


def test_onnx_int8_is_quantized_by_onnx_runtime(ranker: Converted) -> None:
    import onnx

    model = onnx.load(str(ranker.model_dir / "onnx-int8" / "model.onnx"))
    types = {t.data_type for t in model.graph.initializer}
    assert onnx.TensorProto.INT8 in types
    assert "DynamicQuantizeLinear" in {n.op_type for n in model.graph.node}
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [onnx.TensorProto.FLOAT]


def test_what_a_framework_cannot_produce_is_reported_with_its_reason(ranker: Converted) -> None:
    parity, stderr = ranker.parity, ranker.run.stderr
    onnx_bf16 = parity["onnx-bf16"]["error"]
    assert onnx_bf16.startswith("not produced: onnxruntime cannot run it:"), onnx_bf16
    assert "NOT_IMPLEMENTED" in onnx_bf16  # ONNX Runtime's own words
    assert parity["pt2-int8"]["error"].startswith("not produced: "), parity["pt2-int8"]
    for variant in TORCH_NOT_PRODUCED:
        assert parity[variant]["precision"] == variant.rpartition("-")[2]
        assert "bytes" not in parity[variant]
        assert not (ranker.model_dir / variant).exists()
        assert f"note: variant '{variant}' (" in stderr and "not produced:" in stderr
        assert f"error: variant '{variant}'" not in stderr


def test_table_shows_precision_size_latency_and_the_ratios(ranker: Converted) -> None:
    parity, stdout = ranker.parity, ranker.run.stdout
    rows = {
        cells[0]: cells
        for line in stdout.splitlines()
        if line.count("│") > 2 and (cells := [c.strip() for c in line.split("│")[1:-1]])[0]
    }
    for variant in TORCH_PRODUCED:
        cells = rows[variant]
        assert cells[1] == parity[variant]["precision"], cells
        assert cells[-2] == f"{parity[variant]['p50_ms']:.3f}", cells
        assert "agrees" in cells[-1]
        assert cells[-3].endswith("KiB") or cells[-3].endswith("MiB")
    for variant, base in (("onnx-int8", "onnx"), ("torch-bf16", "torch")):
        smaller = parity[base]["bytes"] / parity[variant]["bytes"]
        top1 = parity[variant]["top1_agreement"] * 100
        precision = variant.rpartition("-")[2]
        line = next(x for x in stdout.splitlines() if x.startswith(f"{precision} ({variant} "))
        head = f"{precision} ({variant} against {base}): {smaller:.1f}{TIMES} smaller, "
        assert line.startswith(head), line
        assert line.endswith(f", top-1 {top1:.1f} %")
        assert f"{TIMES} faster" in line or f"{TIMES} slower" in line
    assert "int8 judged by |diff| <= 0.05 x max(1, max |source|), top-1 >= 99%" in stdout


def test_config_lists_the_reduced_variants_with_a_rollout_line(ranker: Converted) -> None:
    config = ranker.config
    assert config["default_variant"] == "torch"
    listed = config["variants"]
    reduced = [v for v in TORCH_PRODUCED if "-" in v]
    assert sorted(listed) == sorted(reduced)
    backends = {"torch": "torchscript", "pt2": "torch_export", "onnx": "onnxruntime"}
    for variant in reduced:
        assert listed[variant] == {"backend": backends[variant.partition("-")[0]]}
    text = (ranker.model_dir / "config.toml").read_text()
    for variant in reduced:
        gate = max(
            DEFAULT_TOLERANCE[variant.rpartition("-")[2]],
            float(f"{2 * ranker.parity[variant]['max_abs_diff']:.2g}"),
        )
        assert (
            f"# tensorgate rollout start ranker --to {variant} --max-abs-diff {gate:g} "
            "--min-argmax-agreement 0.99\n"
        ) in text
    for variant in TORCH_NOT_PRODUCED:
        assert variant not in text
    assert load_model_config(ranker.model_dir).variants["onnx-int8"].backend == "onnxruntime"


def test_tensorflow_writes_tflite_and_onnx_precisions(scorer: Converted) -> None:
    import onnx

    run = scorer.run
    assert run.returncode == 0, run.stdout + run.stderr
    parity = check_parity_entries(scorer, TF_PRODUCED)
    assert set(parity) == {*TF_PRODUCED, *TF_NOT_PRODUCED}
    for variant in TF_NOT_PRODUCED:
        assert parity[variant]["error"].startswith(
            "not produced: TensorFlow has no converter from a SavedModel to a SavedModel"
        )
    for variant in ("tflite-fp16", "tflite-int8", "onnx-fp16", "onnx-int8"):
        base = variant.partition("-")[0]
        assert parity[variant]["bytes"] < parity[base]["bytes"] * 0.6, (variant, parity)
        assert parity[variant]["max_abs_diff"] > parity[base]["max_abs_diff"], variant
    assert "dynamic range int8" in run.stdout
    half = onnx.load(str(scorer.model_dir / "onnx-fp16" / "model.onnx"))
    assert onnx.TensorProto.FLOAT16 in {t.data_type for t in half.graph.initializer}
    io = [*half.graph.input, *half.graph.output]
    assert {v.type.tensor_type.elem_type for v in io} == {onnx.TensorProto.FLOAT}
    assert sorted(scorer.config["variants"]) == sorted(v for v in TF_PRODUCED if "-" in v)
    assert scorer.config["default_variant"] == "tf"


def test_calibration_makes_tflite_int8_full_integer(
    calibrated: Converted, scorer: Converted
) -> None:
    from ai_edge_litert.interpreter import Interpreter

    run = calibrated.run
    assert run.returncode == 0, run.stdout + run.stderr
    check_parity_entries(calibrated, ("tflite", "tflite-int8"))
    assert "full integer int8 (64 calibration samples)" in run.stdout

    def int8_tensors(model_dir: Path) -> int:
        interpreter = Interpreter(model_path=str(model_dir / "tflite-int8" / "model.tflite"))
        return sum(d["dtype"] == np.int8 for d in interpreter.get_tensor_details())

    # Dynamic range keeps activations in float; full integer quantizes them too.
    assert int8_tensors(calibrated.model_dir) > int8_tensors(scorer.model_dir)
    interpreter = Interpreter(model_path=str(calibrated.model_dir / "tflite-int8/model.tflite"))
    runner = interpreter.get_signature_runner("serving_default")
    assert runner.get_input_details()["input"]["dtype"] == np.float32  # inputs kept


# -- serving what was written -----------------------------------------------------------
def test_every_reduced_variant_serves_close_answers(gateway: ServerProcess) -> None:
    x = confident_rows(TORCH_WEIGHTS_SEED)[-4:]
    with Client(gateway.address) as client:
        want = mlp_reference(x, mlp_weights(TORCH_WEIGHTS_SEED))
        for variant in TORCH_PRODUCED:
            got = client.infer("ranker", {"input": x}, version=variant, timeout=60)
            assert got.variant == variant
            precision = variant.rpartition("-")[2] if "-" in variant else "fp32"
            assert got["output"].dtype == np.float32
            assert within(got["output"], want, DEFAULT_TOLERANCE[precision]), variant
            assert (got["output"].argmax(1) == want.argmax(1)).all(), variant
        assert client.infer("ranker", {"input": x}, timeout=60).variant == "torch"

        x = confident_rows(TF_WEIGHTS_SEED)[-4:]
        want = mlp_reference(x, mlp_weights(TF_WEIGHTS_SEED))
        for model, variants in (("scorer", TF_PRODUCED), ("calibrated", ("tflite-int8",))):
            for variant in variants:
                got = client.infer(model, {"input": x}, version=variant, timeout=60)
                assert got.variant == variant
                precision = variant.rpartition("-")[2] if "-" in variant else "fp32"
                assert within(got["output"], want, DEFAULT_TOLERANCE[precision]), variant
        assert client.infer("scorer", {"input": x}, timeout=60).variant == "tf"


@pytest.mark.usefixtures("front_end")
def test_bf16_precision_serves_an_fp32_file_in_mixed_precision(
    ranker: Converted, tmp_path: Path
) -> None:
    """``precision = "bf16"`` on the converted FP32 TorchScript file (in the gateway and in
    a worker process) and on an ExportedProgram: close to FP32 answers in the signature's
    datatype; refused with a clear reason by ONNX Runtime and by compiled AOTInductor code."""
    from tensorgate.server.demo.pt2 import build_mlp_pt2

    assert ranker.run.returncode == 0, ranker.run.stderr
    root = tmp_path / "models"
    model_dir = root / "mixed"
    for variant in ("torch", "pt2", "onnx"):
        shutil.copytree(ranker.model_dir / variant, model_dir / variant)
    shutil.copytree(ranker.model_dir / "torch", model_dir / "torch-autocast")
    shutil.copytree(ranker.model_dir / "torch", model_dir / "isolated")
    build_mlp_pt2(model_dir / "program" / "model.pt2", mlp_weights(TORCH_WEIGHTS_SEED), False)
    config = tomllib.loads((ranker.model_dir / "config.toml").read_text())
    tensors = "".join(
        f'[[{kind}]]\nname = "{t["name"]}"\ndatatype = "{t["datatype"]}"\nshape = {t["shape"]}\n'
        for kind in ("input", "output")
        for t in config[kind]
    )
    (model_dir / "config.toml").write_text(
        'default_variant = "torch"\n' + tensors + "".join(
            f'[variants.{v}]\nprecision = "bf16"\n'
            for v in ("torch-autocast", "program", "pt2", "onnx")
        ) + '[variants.isolated]\nprecision = "bf16"\nisolation = "process"\n'
    )  # fmt: skip
    x = np.random.default_rng(8).standard_normal((5, 64)).astype(np.float32)
    with ServerProcess(root, tmp_path) as server, Client(server.address) as client:
        index = {m["version"]: m for m in client.repository_index() if m["name"] == "mixed"}
        fp32 = client.infer("mixed", {"input": x}, version="torch", timeout=60)["output"]
        for variant in ("torch-autocast", "program", "isolated"):
            assert index[variant]["state"] == "READY", index[variant]
            got = client.infer("mixed", {"input": x}, version=variant, timeout=60)["output"]
            assert got.dtype == np.float32, variant
            diff = np.abs(got - fp32).max()
            assert diff > 0 and within(got, fp32, 1e-2), (variant, diff)
        assert index["pt2"]["state"] == "UNAVAILABLE"
        assert "cannot apply to compiled code" in index["pt2"]["reason"]
        assert index["onnx"]["state"] == "UNAVAILABLE"
        assert (
            '[variants.onnx] precision = "bf16": the onnxruntime backend runs a model in the '
            "precision of its file" in index["onnx"]["reason"]
        )


# -- arguments and config ---------------------------------------------------------------
def test_an_unknown_precision_key_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text('[variants.torch]\nprecision = "fp8"\n')
    with pytest.raises(ConfigError) as info:
        load_model_config(tmp_path)
    message = str(info.value)
    assert "variants.torch.precision" in message and "precision 'fp8'" in message
    assert 'use "fp32"' in message and '"bf16"' in message


def test_tolerance_option_judges_that_precision(tmp_path: Path, ranker: Converted) -> None:
    source = tmp_path / "ranker.py"
    source.write_text(TORCH_SOURCE)
    out = tmp_path / "models" / "ranker"
    run = tensorgate(
        "convert", "pytorch", f"{source}:build", "--input", TORCH_INPUT, "--out", str(out),
        "--to", "onnx", "--precision", "int8", "--tolerance", "int8=0.0001",
        "--data", str(write_rows(tmp_path / "rows.npz", TORCH_WEIGHTS_SEED)),
    )  # fmt: skip
    assert run.returncode == 1, run.stdout + run.stderr
    assert "error: variant 'onnx-int8' (onnx, int8): exceeds the int8 tolerance, |diff| <= " in (
        run.stderr
    )
    parity = json.loads((out / "parity.json").read_text())
    assert parity["onnx"]["passed"] is True  # fp32 is always written, and judged as before
    assert parity["onnx-int8"]["passed"] is False
    assert parity["onnx-int8"]["tolerance"]["atol"] == 0.0001
    # The same file, judged by the default: the session's conversion passed it.
    assert ranker.parity["onnx-int8"]["max_abs_diff"] == pytest.approx(
        parity["onnx-int8"]["max_abs_diff"]
    )


@pytest.mark.parametrize(
    ("command", "args", "message"),
    [
        ("pytorch", ["--precision", "fp8"], "cannot convert to precision fp8"),
        ("pytorch", ["--tolerance", "int8"], "use PRECISION=TOLERANCE"),
        ("pytorch", ["--tolerance", "int4=0.1"], "use PRECISION=TOLERANCE"),
        ("pytorch", ["--tolerance", "int8=-1"], "must be a number >= 0"),
        ("tensorflow", ["--precision", "bf16"], "choose from fp32,fp16,int8"),
        ("tensorflow", ["--calibration", "CAL"], "--calibration calibrates tflite-int8"),
    ],
)
def test_bad_precision_arguments_are_refused(
    tmp_path: Path, tf_source: Path, command: str, args: list[str], message: str
) -> None:
    cal = tmp_path / "cal.npz"
    np.savez(cal, input=np.zeros((2, 64), np.float32))
    args = [str(cal) if a == "CAL" else a for a in args]
    source = tmp_path / "ranker.py"
    source.write_text(TORCH_SOURCE)
    out = tmp_path / "models" / "m"
    head = [f"{source}:build", "--input", TORCH_INPUT] if command == "pytorch" else [str(tf_source)]
    run = tensorgate("convert", command, *head, "--out", str(out), *args)
    assert run.returncode == 2, run.stdout + run.stderr
    assert message in run.stderr
    assert not out.exists()


def test_reduced_tolerance_is_scaled_and_needs_top1() -> None:
    tolerances = parse_tolerances("int8=0.1", 1e-4, 1e-3)
    t = tolerances["int8"]
    assert (t.atol, t.rtol, t.scaled, t.min_top1) == (0.1, 0.0, True, 0.99)
    assert tolerances["bf16"].atol == 0.01 and tolerances["fp32"].atol == 1e-4
    ref = [{"y": np.array([[20.0, 1.0], [0.5, 0.0]], np.float32)}]
    # 1.5 off on a value of 20: within 0.1 x 20, though far beyond 0.1 absolute.
    near = [{"y": np.array([[21.5, 1.0], [0.5, 0.0]], np.float32)}]
    assert compare(ref, near, ["y"], 0.1, 0.0, scaled=True, min_top1=0.99).passed
    assert not compare(ref, near, ["y"], 0.1, 0.0).passed
    flipped = [{"y": np.array([[20.0, 1.0], [0.0, 0.5]], np.float32)}]
    c = compare(ref, flipped, ["y"], 0.1, 0.0, scaled=True, min_top1=0.99)
    assert c.top1_agreement == 0.5 and not c.passed
    assert compare(ref, flipped, ["y"], 0.1, 0.0, scaled=True).passed  # no top-1 rule


def test_nothing_to_quantize_is_not_produced_and_int8_missing_fails(tmp_path: Path) -> None:
    """A model without a layer that dynamic quantization handles gets no "int8" copy of its
    FP32 file; no format in int8 at all is an error."""
    source = tmp_path / "squash.py"
    source.write_text(
        "import torch\n\n\nclass Squash(torch.nn.Module):\n"
        "    def forward(self, x: torch.Tensor) -> torch.Tensor:\n"
        "        return torch.tanh(x) * 2.0\n\n\ndef build():\n    return Squash()\n"
    )
    out = tmp_path / "models" / "squash"
    run = tensorgate(
        "convert", "pytorch", f"{source}:build", "--input", "x:FP32:-1,4", "--out", str(out),
        "--to", "torchscript,onnx", "--precision", "int8",
    )  # fmt: skip
    assert run.returncode == 1, run.stdout + run.stderr
    parity = json.loads((out / "parity.json").read_text())
    assert "quantize_dynamic found no layer to quantize" in parity["torch-int8"]["error"]
    assert "quantize_dynamic found no weights to quantize" in parity["onnx-int8"]["error"]
    assert parity["torch"]["passed"] and parity["onnx"]["passed"]
    assert "error: no format could be produced in int8" in run.stderr
    assert "variants" not in tomllib.loads((out / "config.toml").read_text())
