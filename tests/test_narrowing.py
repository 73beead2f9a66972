"""config.toml (or a more specific variant) narrows what a model file leaves open (-1 -> a
size): real TorchScript and ONNX models, served by a real gateway, through the real module_client.
The merging rules themselves are unit-tested in test_signature.py."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from tensorgate.clients import Client, InferenceError

from . import modelfactory as mf

# The TorchScript model returns List[str], which it reports as BYTES [-1]; config says 16.
LABELS_CONFIG = """
[[input]]
name = "INPUT__0"
datatype = "FP32"
shape = [16]

[[output]]
name = "OUTPUT__0"
datatype = "FP32"
shape = [16]

[[output]]
name = "OUTPUT__1"
datatype = "BYTES"
shape = [16]
"""

DYNAMIC_CONFIG = """
[[input]]
name = "x"
shape = [-1, 64]
"""

CONFLICT_CONFIG = """
[[input]]
name = "x"
datatype = "FP32"
shape = [-1, 8]
"""


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("narrowing") / "models"
    mf.build_labels_torchscript(root / "labels" / "1" / "model.pt")
    (root / "labels" / "config.toml").write_text(LABELS_CONFIG)
    mf.build_double_onnx(root / "dynamic" / "1" / "model.onnx", ["n", "m"])
    (root / "dynamic" / "config.toml").write_text(DYNAMIC_CONFIG)
    # Two variants, one more specific than the other.
    mf.build_double_onnx(root / "specific" / "loose" / "model.onnx", ["n", "m"])
    mf.build_double_onnx(root / "specific" / "tight" / "model.onnx", ["n", 64])
    # A real conflict: the file says 64, config.toml says 8.
    mf.build_double_onnx(root / "conflict" / "1" / "model.onnx", ["n", 64])
    (root / "conflict" / "config.toml").write_text(CONFLICT_CONFIG)
    return root


def shapes(meta: dict, kind: str) -> dict[str, list[int]]:
    return {t["name"]: [int(d) for d in t["shape"]] for t in meta[kind]}


def test_config_narrows_a_torchscript_string_list(module_client: Client) -> None:
    meta = module_client.model_metadata("labels")
    assert shapes(meta, "outputs") == {"OUTPUT__0": [16], "OUTPUT__1": [16]}
    assert [t["datatype"] for t in meta["outputs"]] == ["FP32", "BYTES"]
    x = np.linspace(-1, 1, 16, dtype=np.float32)
    result = module_client.infer("labels", {"INPUT__0": x}, timeout=30)
    np.testing.assert_array_equal(result["OUTPUT__0"], 2 * x)
    assert list(result["OUTPUT__1"]) == [b"pos" if v > 0 else b"neg" for v in x]
    config = module_client.model_config("labels")
    assert [int(d) for d in config["output"][1]["dims"]] == [16]


def test_requests_are_checked_against_the_narrowed_shape(module_client: Client) -> None:
    with pytest.raises(InferenceError) as e:
        module_client.infer("labels", {"INPUT__0": np.zeros(8, np.float32)}, timeout=30)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "shape [8], expected [16]" in str(e.value)


def test_config_narrows_a_dynamic_onnx_axis(module_client: Client) -> None:
    meta = module_client.model_metadata("dynamic")
    assert shapes(meta, "inputs") == {"x": [-1, 64]}
    assert meta["inputs"][0]["datatype"] == "FP32"  # from the file
    x = np.arange(3 * 64, dtype=np.float32).reshape(3, 64)
    np.testing.assert_array_equal(module_client.infer("dynamic", {"x": x}, timeout=30)["y"], 2 * x)
    with pytest.raises(InferenceError) as e:
        module_client.infer("dynamic", {"x": np.zeros((3, 32), np.float32)}, timeout=30)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "shape [3, 32], expected [-1, 64]" in str(e.value)


def test_the_more_specific_variant_narrows_the_other(module_client: Client) -> None:
    meta = module_client.model_metadata("specific")
    assert sorted(meta["versions"]) == ["loose", "tight"]
    assert shapes(meta, "inputs") == {"x": [-1, 64]}
    assert shapes(meta, "outputs") == {"y": [-1, 64]}
    x = np.ones((2, 64), np.float32)
    for variant in ("loose", "tight"):
        result = module_client.infer("specific", {"x": x}, version=variant, timeout=30)
        assert result.variant == variant
        np.testing.assert_array_equal(result["y"], 2 * x)
    # The loose variant would take 32 columns; the model as a whole does not.
    with pytest.raises(InferenceError) as e:
        module_client.infer("specific", {"x": np.ones((2, 32), np.float32)}, version="loose")
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_a_real_conflict_is_refused_with_the_reason(module_client: Client) -> None:
    assert module_client.is_model_ready("conflict") is False
    (entry,) = [m for m in module_client.repository_index() if m["name"] == "conflict"]
    assert entry["state"] == "UNAVAILABLE"
    assert (
        "model 'conflict': config.toml and variant '1' disagree on input 'x': "
        "FP32 [-1, 8] vs FP32 [-1, 64]" in entry["reason"]
    ), entry
