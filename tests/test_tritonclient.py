"""The interoperability promise: Triton's own ``tritonclient.grpc`` works unchanged.

tritonclient registers its own ``inference`` protos, which clash with ours, so it runs in a
subprocess with its own interpreter (``run_triton_script``). One script asks the session
server everything at once (a tritonclient start costs about a second) and reports each
check separately; the tests below judge one check each, against the frameworks run
directly in this process on the same model files, not through tensorgate's backends.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tensorgate.server.demo import SCORER_VERSIONS

from .serverproc import ServerProcess, run_triton_script

# Talks gRPC: runs against both front ends (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("front_end")

SCORER_VARIANTS = ("torch", "tf", "onnx", "pt2")
STRING_VARIANTS = ("torch", "tf", "onnx")
PLATFORMS = {
    "torch": "pytorch_libtorch",
    "tf": "tensorflow_savedmodel",
    "onnx": "onnxruntime_onnx",
    "pt2": "pytorch_export",
}
TEXTS = ["hello", "World 42", "mixed Case", ""]
ATOL = 1e-5

# Runs under the tritonclient interpreter. argv: address, workdir, spec (JSON).
# Prints one JSON object {check name: result, or {"error": "..."} if the check raised}.
CHECKS_SCRIPT = r"""
import json
import sys
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException

address, workdir, spec = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
client = grpcclient.InferenceServerClient(address)
report = {}


def check(name, fn, *args):
    try:
        report[name] = fn(*args)
    except InferenceServerException as e:
        report[name] = {"error": f"{e.status()}: {e.message()}"}
    except Exception as e:
        report[name] = {"error": f"{type(e).__name__}: {e}"}


def tensors(specs):
    return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in specs]


def metadata(model, version):
    m = client.get_model_metadata(model, version)
    return {"name": m.name, "platform": m.platform, "versions": list(m.versions),
            "inputs": tensors(m.inputs), "outputs": tensors(m.outputs)}


def config(model, version):
    c = client.get_model_config(model, version).config
    def io(items):
        return [{"name": t.name, "data_type": model_config_pb2.DataType.Name(t.data_type),
                 "dims": list(t.dims)} for t in items]
    return {"name": c.name, "platform": c.platform, "max_batch_size": c.max_batch_size,
            "input": io(c.input), "output": io(c.output)}


def infer_fp32(model, version, input_name, output_name, stem):
    x = np.load(workdir / f"{stem}_input.npy")
    tensor = grpcclient.InferInput(input_name, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)  # raw_input_contents
    result = client.infer(model, [tensor], model_version=version,
                          outputs=[grpcclient.InferRequestedOutput(output_name)])
    np.save(workdir / f"{stem}_{version}_output.npy", result.as_numpy(output_name))
    response = result.get_response()
    out = result.get_output(output_name)
    return {"model_name": response.model_name, "model_version": response.model_version,
            "datatype": out.datatype, "shape": list(out.shape)}


def infer_strings(version):
    texts = np.array([t.encode() for t in spec["texts"]], dtype=object)
    tensor = grpcclient.InferInput("text", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(texts)
    result = client.infer("strings", [tensor], model_version=version)
    upper = result.as_numpy("upper")
    return {"model_version": result.get_response().model_version,
            "datatype": result.get_output("upper").datatype,
            "upper": [u.decode() for u in upper.reshape(-1)]}


def unknown_model():
    x = np.zeros((1, 64), np.float32)
    tensor = grpcclient.InferInput("input", [1, 64], "FP32")
    tensor.set_data_from_numpy(x)
    try:
        client.infer("nosuchmodel", [tensor])
    except InferenceServerException as e:
        return {"raised": True, "status": str(e.status()), "message": e.message()}
    return {"raised": False}


def statistics(model):
    stats = client.get_inference_statistics(model).model_stats
    return {s.version: s.inference_stats.success.count for s in stats}


def repository_index():
    index = client.get_model_repository_index()
    return [{"name": m.name, "version": m.version, "state": m.state, "reason": m.reason}
            for m in index.models]


check("live", client.is_server_live)
check("ready", client.is_server_ready)
check("server_metadata", lambda: client.get_server_metadata(as_json=True))
check("model_ready", lambda: {
    "scorer": client.is_model_ready("scorer"),
    **{f"scorer/{v}": client.is_model_ready("scorer", v) for v in spec["scorer_variants"]},
    **{f"scorer/{v}": client.is_model_ready("scorer", v) for v in spec["scorer_versions"]},
    "detector/1": client.is_model_ready("detector", "1"),
    "broken": client.is_model_ready("broken"),
    "nosuchmodel": client.is_model_ready("nosuchmodel"),
})
for v in spec["scorer_variants"]:
    check(f"infer/scorer/{v}", infer_fp32, "scorer", v, "input", "output", "scorer")
    check(f"metadata/scorer/{v}", metadata, "scorer", v)
    check(f"config/scorer/{v}", config, "scorer", v)
check("statistics/scorer/before", statistics, "scorer")
for v in spec["scorer_versions"]:  # Triton's clients pin by integer: the demo's aliases
    check(f"infer/scorer/{v}", infer_fp32, "scorer", v, "input", "output", "scorer")
check("statistics/scorer/after", statistics, "scorer")
check("infer/detector/1", infer_fp32, "detector", "1", "image", "scores", "detector")
check("infer/detector_lite/1", infer_fp32, "detector_lite", "1", "image", "scores",
      "detector_lite")
check("metadata/detector/1", metadata, "detector", "1")
for v in spec["string_variants"]:
    check(f"strings/{v}", infer_strings, v)
check("unknown_model", unknown_model)
check("repository_index", repository_index)
print(json.dumps(report))
"""

# Runs under the tritonclient interpreter against a server of its own. argv: address.
LOAD_UNLOAD_SCRIPT = r"""
import json
import sys

import tritonclient.grpc as grpcclient

client = grpcclient.InferenceServerClient(sys.argv[1])
steps = {"ready_at_start": client.is_model_ready("detector")}
client.unload_model("detector")
steps["ready_after_unload"] = client.is_model_ready("detector")
steps["index_after_unload"] = [
    {"name": m.name, "version": m.version, "state": m.state, "reason": m.reason}
    for m in client.get_model_repository_index().models
]
client.load_model("detector")
steps["ready_after_load"] = client.is_model_ready("detector")
steps["versions_after_load"] = list(client.get_model_metadata("detector").versions)
print(json.dumps(steps))
"""


# --- frameworks run directly on the model files ------------------------------------------


def run_torchscript(path: Path, x: np.ndarray) -> np.ndarray:
    import torch

    module = torch.jit.load(str(path)).eval()
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


def run_savedmodel(directory: Path, x: np.ndarray, output: str) -> np.ndarray:
    from tensorgate.server.demo import import_tensorflow

    tf = import_tensorflow()
    serve = tf.saved_model.load(str(directory)).signatures["serving_default"]
    return serve(tf.constant(x))[output].numpy()


def run_onnx(path: Path, x: np.ndarray, input_name: str, output: str) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run([output], {input_name: x})[0]


def run_pt2(path: Path, x: np.ndarray) -> np.ndarray:
    """A .pt2 as torch runs it: an AOTInductor package, else an ExportedProgram (the demo
    writes the latter where no C++ compiler is found)."""
    import torch

    from tensorgate.backends.torch_export import archive_kind

    compiled, _ = archive_kind(path)
    with torch.inference_mode():
        if compiled:
            return torch._inductor.aoti_load_package(str(path))(torch.from_numpy(x)).numpy()
        return torch.export.load(str(path)).module()(torch.from_numpy(x)).numpy()


def run_tflite(path: Path, x: np.ndarray, input_name: str, output: str) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=str(path)).get_signature_runner()
    return runner(**{input_name: x})[output]


def scorer_direct(repo: Path, variant: str, x: np.ndarray) -> np.ndarray:
    scorer = repo / "scorer"
    if variant == "pt2":
        return run_pt2(scorer / "pt2" / "model.pt2", x)
    if variant == "torch":
        return run_torchscript(scorer / "torch" / "model.pt", x)
    if variant == "tf":
        return run_savedmodel(scorer / "tf" / "model.savedmodel", x, "output")
    return run_onnx(scorer / "onnx" / "model.onnx", x, "input", "output")


# --- the one tritonclient run against the session server ---------------------------------


class TritonReport:
    def __init__(self, checks: dict[str, Any], workdir: Path, inputs: dict[str, np.ndarray]):
        self.checks = checks
        self.workdir = workdir
        self.inputs = inputs

    def __getitem__(self, name: str) -> Any:
        result = self.checks.get(name)
        assert result is not None, f"tritonclient did not run check {name!r}"
        assert not (isinstance(result, dict) and "error" in result), (
            f"tritonclient check {name!r} failed: {result['error']}"
        )
        return result

    def output(self, stem: str, version: str) -> np.ndarray:
        return np.load(self.workdir / f"{stem}_{version}_output.npy")


@pytest.fixture(scope="module")
def triton(server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> TritonReport:
    workdir = tmp_path_factory.mktemp("tritonclient")
    rng = np.random.default_rng(7)
    inputs = {
        "scorer": rng.standard_normal((5, 64)).astype(np.float32),
        "detector": rng.standard_normal((2, 3, 32, 32)).astype(np.float32),
    }
    inputs["detector_lite"] = inputs["detector"]
    for stem, x in inputs.items():
        np.save(workdir / f"{stem}_input.npy", x)
    spec = {
        "scorer_variants": list(SCORER_VARIANTS),
        "scorer_versions": [str(n) for n in SCORER_VERSIONS.values()],
        "string_variants": list(STRING_VARIANTS),
        "texts": TEXTS,
    }
    checks = run_triton_script(CHECKS_SCRIPT, server.address, str(workdir), json.dumps(spec))
    return TritonReport(checks, workdir, inputs)


@pytest.mark.parametrize("variant", SCORER_VARIANTS)
def test_scorer_infer_equals_framework(
    triton: TritonReport, model_repo: Path, variant: str
) -> None:
    reply = triton[f"infer/scorer/{variant}"]
    assert reply["model_name"] == "scorer"
    assert reply["model_version"] == variant
    assert reply["datatype"] == "FP32"
    assert reply["shape"] == [5, 10]
    got = triton.output("scorer", variant)
    expected = scorer_direct(model_repo, variant, triton.inputs["scorer"])
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("variant", SCORER_VARIANTS)
def test_scorer_pinned_by_integer_version(
    triton: TritonReport, model_repo: Path, variant: str
) -> None:
    version = str(SCORER_VERSIONS[variant])
    reply = triton[f"infer/scorer/{version}"]
    # The integer pins the named variant, and the reply names the variant.
    assert (reply["model_name"], reply["model_version"]) == ("scorer", variant)
    expected = scorer_direct(model_repo, variant, triton.inputs["scorer"])
    np.testing.assert_allclose(triton.output("scorer", version), expected, rtol=0, atol=ATOL)


def test_scorer_statistics_under_integer_versions(triton: TritonReport) -> None:
    before, after = triton["statistics/scorer/before"], triton["statistics/scorer/after"]
    assert set(after) == {str(n) for n in SCORER_VERSIONS.values()}
    # Each integer pin counted once, under that integer.
    assert {v: after[v] - before[v] for v in after} == dict.fromkeys(after, 1)


def test_detector_infer_equals_onnxruntime(triton: TritonReport, model_repo: Path) -> None:
    reply = triton["infer/detector/1"]
    assert (reply["model_name"], reply["model_version"]) == ("detector", "1")
    assert (reply["datatype"], reply["shape"]) == ("FP32", [2, 4])
    expected = run_onnx(
        model_repo / "detector" / "1" / "model.onnx", triton.inputs["detector"], "image", "scores"
    )
    np.testing.assert_allclose(triton.output("detector", "1"), expected, rtol=0, atol=ATOL)


def test_detector_lite_infer_equals_litert(triton: TritonReport, model_repo: Path) -> None:
    reply = triton["infer/detector_lite/1"]
    assert (reply["model_name"], reply["model_version"]) == ("detector_lite", "1")
    assert (reply["datatype"], reply["shape"]) == ("FP32", [2, 4])
    path = model_repo / "detector_lite" / "1" / "model.tflite"
    expected = run_tflite(path, triton.inputs["detector_lite"], "image", "scores")
    np.testing.assert_allclose(triton.output("detector_lite", "1"), expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("variant", SCORER_VARIANTS)
def test_scorer_model_metadata(triton: TritonReport, variant: str) -> None:
    meta = triton[f"metadata/scorer/{variant}"]
    assert meta["name"] == "scorer"
    assert meta["platform"] == PLATFORMS[variant]
    assert set(SCORER_VARIANTS) <= set(meta["versions"])
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert meta["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 10]}]


def test_detector_model_metadata(triton: TritonReport) -> None:
    meta = triton["metadata/detector/1"]
    assert (meta["name"], meta["platform"], meta["versions"]) == (
        "detector",
        "onnxruntime_onnx",
        ["1"],
    )
    assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 3, 32, 32]}]
    assert meta["outputs"] == [{"name": "scores", "datatype": "FP32", "shape": [-1, 4]}]


@pytest.mark.parametrize("variant", SCORER_VARIANTS)
def test_scorer_model_config(triton: TritonReport, variant: str) -> None:
    config = triton[f"config/scorer/{variant}"]
    assert config == {
        "name": "scorer",
        "platform": PLATFORMS[variant],
        "max_batch_size": 0,
        "input": [{"name": "input", "data_type": "TYPE_FP32", "dims": [-1, 64]}],
        "output": [{"name": "output", "data_type": "TYPE_FP32", "dims": [-1, 10]}],
    }


def test_server_live_ready_and_metadata(triton: TritonReport) -> None:
    assert triton["live"] is True
    assert triton["ready"] is True
    meta = triton["server_metadata"]
    assert meta["name"] == "tensorgate"
    assert meta["version"]
    assert "model_repository" in meta.get("extensions", [])


def test_model_ready(triton: TritonReport) -> None:
    assert triton["model_ready"] == {
        "scorer": True,
        **{f"scorer/{v}": True for v in SCORER_VARIANTS},
        **{f"scorer/{n}": True for n in SCORER_VERSIONS.values()},
        "detector/1": True,
        "broken": False,
        "nosuchmodel": False,
    }


def test_repository_index_lists_every_model(triton: TritonReport, model_repo: Path) -> None:
    index = triton["repository_index"]
    on_disk = {p.name for p in model_repo.iterdir() if p.is_dir()}
    assert {m["name"] for m in index} == on_disk
    scorer = {m["version"]: m["state"] for m in index if m["name"] == "scorer"}
    # Each variant, and again under the integer version the demo's config.toml gives it.
    assert scorer == dict.fromkeys([*SCORER_VARIANTS, *map(str, SCORER_VERSIONS.values())], "READY")
    broken = [m for m in index if m["name"] == "broken"]
    assert broken, index
    assert all(m["state"] == "UNAVAILABLE" for m in broken), broken
    unavailable = [m for m in index if m["state"] != "READY"]
    assert all(m["reason"] for m in unavailable), f"entries without a reason: {unavailable}"


@pytest.mark.parametrize("variant", STRING_VARIANTS)
def test_bytes_through_strings_model(triton: TritonReport, variant: str) -> None:
    reply = triton[f"strings/{variant}"]
    assert reply["model_version"] == variant
    assert reply["datatype"] == "BYTES"
    assert reply["upper"] == [t.upper() for t in TEXTS]


def test_unknown_model_raises(triton: TritonReport) -> None:
    reply = triton["unknown_model"]
    assert reply["raised"], "infer on an unknown model did not raise InferenceServerException"
    assert "Request for unknown model" in reply["message"]
    assert reply["status"] == "StatusCode.NOT_FOUND"


def test_unload_and_load_detector(demo_repo: Path, tmp_path: Path) -> None:
    # A server of its own: the session server is shared, and this one needs only ONNX,
    # so it starts without loading torch or TensorFlow.
    repo = tmp_path / "models"
    shutil.copytree(demo_repo / "detector", repo / "detector")
    server = ServerProcess(repo, tmp_path)
    with server:
        steps = run_triton_script(LOAD_UNLOAD_SCRIPT, server.address)
    assert server.proc is not None and server.proc.returncode == 0, server.log()
    assert steps["ready_at_start"] is True
    assert steps["ready_after_unload"] is False
    # Still on disk, so still listed (as Triton lists an unloaded model).
    assert [(m["name"], m["state"]) for m in steps["index_after_unload"]] == [
        ("detector", "UNAVAILABLE")
    ]
    assert steps["ready_after_load"] is True
    assert steps["versions_after_load"] == ["1"]
