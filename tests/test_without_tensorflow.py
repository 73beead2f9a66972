"""A gateway on a machine without TensorFlow still serves its ONNX and TorchScript variants.

The server runs with a ``tensorflow`` package first on its path whose import fails exactly
as a missing one does (``ModuleNotFoundError``), so this runs where TensorFlow is installed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tensorgate.clients import Client, InferenceError
from tensorgate.server.demo import mlp_reference, mlp_weights

from .serverproc import ServerProcess

# Talks gRPC: runs against both front ends (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("front_end")

ATOL = 1e-5
#: What backends/tf_savedmodel.py says when ``import tensorflow`` fails.
NOT_INSTALLED = "needs TensorFlow, which is not installed"

MISSING_TENSORFLOW = """\
raise ModuleNotFoundError("No module named 'tensorflow'", name="tensorflow")
"""


@pytest.fixture(scope="module")
def no_tf_server(
    front_end: str, demo_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    shadow = tmp_path_factory.mktemp("no_tensorflow")
    (shadow / "tensorflow").mkdir()
    (shadow / "tensorflow" / "__init__.py").write_text(MISSING_TENSORFLOW)
    # An empty PYTHONPATH entry would mean the working directory: keep only real ones.
    path = [str(shadow), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    server = ServerProcess(demo_repo, shadow, env={"PYTHONPATH": os.pathsep.join(path)})
    with server:
        yield server
    assert server.proc is not None and server.proc.returncode == 0, server.log()


@pytest.fixture(scope="module")
def no_tf_client(no_tf_server: ServerProcess) -> Iterator[Client]:
    with Client(no_tf_server.address) as c:
        yield c


@pytest.mark.parametrize("variant", ["torch", "onnx"])
def test_torch_and_onnx_variants_serve(no_tf_client: Client, variant: str) -> None:
    x = np.random.default_rng(11).standard_normal((3, 64)).astype(np.float32)
    result = no_tf_client.infer("scorer", {"input": x}, version=variant, timeout=30)
    assert result.variant == variant
    np.testing.assert_allclose(result["output"], mlp_reference(x, mlp_weights()), rtol=0, atol=ATOL)


def test_tf_variant_is_unavailable_with_reason(no_tf_client: Client) -> None:
    assert no_tf_client.is_model_ready("scorer", "tf") is False
    assert no_tf_client.is_model_ready("scorer") is True
    index = {
        (m["name"], m.get("version", "")): m for m in no_tf_client.repository_index(timeout=10)
    }
    tf_entry = index[("scorer", "tf")]
    assert tf_entry["state"] == "UNAVAILABLE"
    assert NOT_INSTALLED in tf_entry["reason"], tf_entry
    assert index[("scorer", "torch")]["state"] == "READY"
    assert index[("scorer", "onnx")]["state"] == "READY"
    assert index[("detector", "1")]["state"] == "READY"
    with pytest.raises(InferenceError) as caught:
        no_tf_client.infer(
            "scorer", {"input": np.zeros((1, 64), np.float32)}, version="tf", timeout=30
        )
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert NOT_INSTALLED in caught.value.message


def test_server_stays_healthy(no_tf_server: ServerProcess, no_tf_client: Client) -> None:
    # Runs after the failed tf request above: the gateway must still be up and serving.
    assert no_tf_client.is_live() and no_tf_client.is_ready()
    with grpc.insecure_channel(no_tf_server.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    result = no_tf_client.infer(
        "detector", {"image": np.zeros((1, 3, 32, 32), np.float32)}, timeout=30
    )
    assert result.variant == "1" and result["scores"].shape == (1, 4)
    assert no_tf_server.proc is not None and no_tf_server.proc.poll() is None
