"""Every streamed request gets exactly one reply, whatever fails while it is served: a
third-party backend (installed through the ``tensorgate.backends`` entry-point group, as a
user would) that returns something that is not an array makes the gateway itself fail with
an unexpected exception. Unary calls get INTERNAL; on a stream that request answers with
``error_message`` and its id, and the stream goes on serving the others."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from tensorgate.codec import decode_response, encode_request
from tensorgate.protos import grpc_service_pb2_grpc as pb_grpc

from .serverproc import ServerProcess

# Talks gRPC: runs against both front ends (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("front_end")

PLUGIN = textwrap.dedent(
    '''
    from pathlib import Path

    import numpy as np

    from tensorgate.backends import Backend, Signature, TensorSpec


    class WrongTypeBackend(Backend):
        """y = 2x, but for a negative first element it returns a string as "y"."""

        name = "wrongtype"
        platform = "test_wrongtype"

        @classmethod
        def find_model_file(cls, variant_dir):
            path = Path(variant_dir) / "model.wrongtype"
            return path if path.is_file() else None

        def load(self, path, options):
            spec = lambda n: TensorSpec(n, "FP32", (-1,))
            return Signature((spec("x"),), (spec("y"),))

        def infer(self, inputs, outputs=None):
            x = inputs["x"]
            return {"y": "not an array" if x[0] < 0 else x * 2}
    '''
)


@pytest.fixture(scope="module")
def plugin_server(
    front_end: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    site = tmp_path_factory.mktemp("site")
    (site / "tg_wrongtype_plugin.py").write_text(PLUGIN)
    dist = site / "tg_wrongtype_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: tg-wrongtype-plugin\nVersion: 0.1\n"
    )
    (dist / "entry_points.txt").write_text(
        "[tensorgate.backends]\nwrongtype = tg_wrongtype_plugin:WrongTypeBackend\n"
    )
    root = tmp_path_factory.mktemp("repo") / "models"
    (root / "odd" / "1").mkdir(parents=True)
    (root / "odd" / "1" / "model.wrongtype").write_text("")
    server = ServerProcess(root, tmp_path_factory.mktemp("srv"), env={"PYTHONPATH": str(site)})
    with server:
        yield server


def request(i: int, value: float):
    msg = encode_request("odd", {"x": np.full(3, value, np.float32)})
    msg.id = f"r{i}"
    return msg


def test_unary_call_gets_internal(plugin_server: ServerProcess) -> None:
    with grpc.insecure_channel(plugin_server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        ok = decode_response(stub.ModelInfer(request(0, 1.0), timeout=10))
        np.testing.assert_array_equal(ok["y"], np.full(3, 2.0, np.float32))
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request(1, -1.0), timeout=10)
        assert info.value.code() == grpc.StatusCode.INTERNAL
        assert "internal error" in info.value.details()


def test_every_streamed_request_gets_one_reply_and_the_stream_goes_on(
    plugin_server: ServerProcess,
) -> None:
    requests = [request(i, -1.0 if i % 3 == 0 else float(i)) for i in range(30)]
    with grpc.insecure_channel(plugin_server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        replies = list(stub.ModelStreamInfer(iter(requests), timeout=60))
    assert sorted(r.infer_response.id for r in replies) == sorted(f"r{i}" for i in range(30))
    for r in replies:
        i = int(r.infer_response.id[1:])
        if i % 3 == 0:
            assert r.error_message.startswith("INTERNAL: internal error"), r.error_message
        else:
            assert not r.error_message
            out = decode_response(r.infer_response)["y"]
            np.testing.assert_array_equal(out, np.full(3, 2.0 * i, np.float32))
