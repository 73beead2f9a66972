"""Integer aliases of named variants (``[variants.onnx] version = 3``), so that Triton's
clients, which parse versions as integers, can pin them: every RPC that takes or reports a
version, through the real gateway, the project's client and raw stubs. tritonclient pins
the demo scorer by integer in test_tritonclient.py."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from tensorgate.clients import Client, InferenceError
from tensorgate.protos import admin_pb2 as apb
from tensorgate.protos import admin_pb2_grpc
from tensorgate.protos import grpc_service_pb2 as pb
from tensorgate.protos import grpc_service_pb2_grpc as pb_grpc
from tensorgate.server.demo import MLP_TENSORS, build_mlp_onnx, mlp_reference, mlp_weights
from tensorgate.server.servicer import VARIANT_METADATA_KEY

from .serverproc import ServerProcess

# Talks gRPC: runs against both front ends (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("front_end")

# Variants "1" (an integer version), "onnx" (version 3) and "canary" (no integer).
ARMS_CONFIG = """
[variants.onnx]
version = 3
"""
TWICE_CONFIG = """
[variants.onnx]
version = 3

[variants.tf]
version = 3
"""
CLASH_CONFIG = """
[variants.onnx]
version = 3
"""
SEEDS = {"1": 1, "onnx": 3, "canary": 7}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("versions") / "models"
    for variant, seed in SEEDS.items():
        build_mlp_onnx(root / "arms" / variant / "model.onnx", mlp_weights(seed))
    (root / "arms" / "config.toml").write_text(MLP_TENSORS + ARMS_CONFIG)
    for variant in ("onnx", "tf"):
        build_mlp_onnx(root / "twice" / variant / "model.onnx", mlp_weights())
    (root / "twice" / "config.toml").write_text(TWICE_CONFIG)
    for variant in ("onnx", "3"):
        build_mlp_onnx(root / "clash" / variant / "model.onnx", mlp_weights())
    (root / "clash" / "config.toml").write_text(CLASH_CONFIG)
    return root


@pytest.fixture(scope="module")
def stub(module_server: ServerProcess) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(module_server.address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def x64(n: int) -> np.ndarray:
    return np.random.default_rng(n).standard_normal((n, 64)).astype(np.float32)


@pytest.mark.parametrize("version", ["3", "onnx"])
def test_the_alias_and_the_name_pin_the_variant(module_client: Client, stub, version: str) -> None:
    x = x64(2)
    result = module_client.infer("arms", {"input": x}, version=version, timeout=30)
    assert result.variant == "onnx"
    np.testing.assert_allclose(result["output"], mlp_reference(x, mlp_weights(3)), atol=1e-5)
    request = pb.ModelInferRequest(model_name="arms", model_version=version)
    request.inputs.add(name="input", datatype="FP32", shape=[2, 64])
    request.raw_input_contents.append(x.tobytes())
    reply, call = stub.ModelInfer.with_call(request, timeout=30)
    assert reply.model_version == "onnx"
    assert dict(call.trailing_metadata())[VARIANT_METADATA_KEY] == "onnx"


def test_an_unknown_integer_is_not_found(module_client: Client) -> None:
    with pytest.raises(InferenceError) as e:
        module_client.infer("arms", {"input": x64(1)}, version="4", timeout=30)
    assert e.value.code == grpc.StatusCode.NOT_FOUND
    assert module_client.is_model_ready("arms", "4") is False


def test_model_ready_takes_the_alias(module_client: Client) -> None:
    assert {v: module_client.is_model_ready("arms", v) for v in ("1", "3", "onnx", "canary")} == {
        "1": True,
        "3": True,
        "onnx": True,
        "canary": True,
    }


def test_model_metadata_lists_every_version_that_pins(module_client: Client) -> None:
    meta = module_client.model_metadata("arms")
    assert meta["versions"] == ["1", "canary", "onnx", "3"]
    assert module_client.model_metadata("arms", "3")["platform"] == "onnxruntime_onnx"


def test_model_config_lists_the_integer_versions(module_client: Client) -> None:
    assert module_client.model_config("arms")["version_policy"] == {
        "specific": {"versions": ["1", "3"]}
    }
    pinned = module_client.model_config("arms", "3")
    assert pinned["version_policy"] == {"specific": {"versions": ["3"]}}
    assert pinned["backend"] == "onnxruntime"
    # A model with no integer version says nothing about versions.
    assert "version_policy" not in module_client.model_config("arms", "canary")


def test_repository_index_lists_the_alias(module_client: Client) -> None:
    entries = [
        (m["version"], m["state"], m.get("reason", ""))
        for m in module_client.repository_index()
        if m["name"] == "arms"
    ]
    assert entries == [
        ("1", "READY", ""),
        ("canary", "READY", ""),
        ("onnx", "READY", ""),
        ("3", "READY", "version 3 of variant 'onnx'"),
    ]


def _stats(stub, version: str = "") -> dict[str, pb.ModelStatistics]:
    reply = stub.ModelStatistics(
        pb.ModelStatisticsRequest(name="arms", version=version), timeout=10
    )
    return {s.version: s for s in reply.model_stats}


def test_model_statistics_report_the_alias_under_its_integer(module_client: Client, stub) -> None:
    before = _stats(stub)
    # Unpinned: integer versions and aliases one by one; other named variants under "0".
    assert list(before) == ["1", "3", "0"]
    for version in ("3", "onnx", "3"):
        module_client.infer("arms", {"input": x64(1)}, version=version, timeout=30)
    module_client.infer("arms", {"input": x64(1)}, version="canary", timeout=30)
    after = _stats(stub)

    def served(stats: dict[str, pb.ModelStatistics], version: str) -> int:
        return stats[version].inference_stats.success.count

    assert served(after, "3") - served(before, "3") == 3
    assert served(after, "0") - served(before, "0") == 1
    assert served(after, "1") == served(before, "1")
    # Pinned: answered under the version asked for, by integer or by name.
    assert served(_stats(stub, "3"), "3") == served(after, "3")
    assert served(_stats(stub, "onnx"), "onnx") == served(after, "3")
    with pytest.raises(grpc.RpcError) as e:
        _stats(stub, "4")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_routes_show_the_alias(module_server: ServerProcess) -> None:
    with grpc.insecure_channel(module_server.address) as channel:
        routes = admin_pb2_grpc.RoutingAdminStub(channel).GetRoutes(
            apb.GetRoutesRequest(model="arms"), timeout=10
        )
    assert {v.name: v.version for v in routes.models[0].variants} == {
        "1": 0,
        "canary": 0,
        "onnx": 3,
    }
    shown = subprocess.run(
        [
            sys.executable,
            "-m",
            "tensorgate.server.cli",
            "routes",
            "show",
            "arms",
            "--url",
            module_server.address,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr
    assert "onnx (version 3)" in shown.stdout


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (
            "twice",
            "field 'variants.tf.version': version 3 is given to both variant 'onnx' and "
            "variant 'tf'; give each its own version",
        ),
        (
            "clash",
            "field 'variants.onnx.version': version 3 of variant 'onnx' is also variant "
            "directory '3' (clash/3/)",
        ),
    ],
)
def test_an_ambiguous_alias_is_a_config_error(
    module_client: Client, model: str, message: str
) -> None:
    assert module_client.is_model_ready(model) is False
    entries = [m for m in module_client.repository_index() if m["name"] == model]
    assert [m["state"] for m in entries] == ["UNAVAILABLE"]
    assert "config.toml" in entries[0]["reason"]
    assert message in entries[0]["reason"], entries[0]["reason"]
