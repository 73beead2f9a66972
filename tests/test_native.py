"""The native front end (``native/``, ``server/frontends/native.py``) through real clients:
what it serves itself (transport, health, reflection, limits, deadlines, ServerLive while
Python is busy) and the hand-over to the Python gateway (inference, streams, cancellation,
cold RPCs, tokens). Like the rest of the suite they run against both front ends (the
``front_end`` fixture): the grpcio one is the reference the native one must equal.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tensorgate.clients import Client
from tensorgate.codec import encode_request
from tensorgate.protos import grpc_service_pb2 as pb
from tensorgate.protos import grpc_service_pb2_grpc as pb_grpc
from tensorgate.server.demo import build_mlp_onnx, mlp_reference, mlp_weights

from .modelfactory import build_identity_onnx
from .serverproc import ServerProcess, wait_busy, wait_until
from .slowmodel import build_slow_onnx, slow_inputs, slow_reference

GRPCURL = Path(sys.executable).parent / "grpcurl"
MAX_MESSAGE_BYTES = 4_000_000
TOKEN = "native-secret-0123456789"
# Steps of the slow model that keep its one instance busy for a second or more (64 rows).
LONG = 30_000
UNLIMITED = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("native") / "models"
    build_mlp_onnx(root / "mlp" / "1" / "model.onnx", mlp_weights())
    build_identity_onnx(root / "identity" / "1" / "model.onnx", ("FP32",))
    build_slow_onnx(root / "slow" / "1" / "model.onnx")
    (root / "slow" / "config.toml").write_text("[instances]\ncount = 1\n")
    return root


@pytest.fixture(scope="module")
def server(
    repo: Path, tmp_path_factory: pytest.TempPathFactory, front_end: str
) -> Iterator[ServerProcess]:
    workdir = tmp_path_factory.mktemp("native-server")
    with ServerProcess(repo, workdir, "--max-message-bytes", str(MAX_MESSAGE_BYTES)) as proc:
        yield proc
    assert proc.proc is not None and proc.proc.returncode == 0, proc.log()


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.address, options=UNLIMITED) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def x64(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 64)).astype(np.float32)


def test_start_up_says_which_front_end(server: ServerProcess, front_end: str) -> None:
    assert f"front end: {front_end}" in server.log()


def test_inference_through_the_client(server: ServerProcess) -> None:
    x = x64(3)
    with Client(server.address) as client:
        result = client.infer("mlp", {"input": x}, request_id="r-1")
        assert client.is_live() and client.is_ready()
        assert client.model_metadata("mlp")["name"] == "mlp"
    np.testing.assert_allclose(result["output"], mlp_reference(x, mlp_weights()), atol=1e-5)
    assert (result.model, result.variant, result.id) == ("mlp", "1", "r-1")


def test_variant_trailer(stub) -> None:
    _, call = stub.ModelInfer.with_call(encode_request("mlp", {"input": x64(1)}), timeout=30)
    assert ("tensorgate-variant", "1") in tuple(call.trailing_metadata())


def test_health_check_and_watch(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService", "mlp"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
        watch = health.Watch(health_pb2.HealthCheckRequest(service="mlp"), timeout=10)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        with pytest.raises(grpc.RpcError) as info:
            health.Check(health_pb2.HealthCheckRequest(service="no-such-model"), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def grpcurl(address: str, *args: str) -> str:
    assert GRPCURL.exists(), f"no grpcurl at {GRPCURL}; pip install -e '.[dev]'"
    done = subprocess.run(
        [str(GRPCURL), "-plaintext", address, *args], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_reflection_through_grpcurl(server: ServerProcess) -> None:
    listed = set(grpcurl(server.address, "list").split())
    assert listed == {
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
        "inference.GRPCInferenceService",
        "tensorgate.admin.v1.RoutingAdmin",
    }
    described = grpcurl(server.address, "describe", "inference.GRPCInferenceService.ModelInfer")
    assert (
        "rpc ModelInfer ( .inference.ModelInferRequest ) returns "
        "( .inference.ModelInferResponse );" in described
    )
    fields = grpcurl(server.address, "describe", "inference.ModelInferRequest")
    assert "repeated bytes raw_input_contents = 7;" in fields


def test_a_stream_answers_every_request_with_its_id(stub) -> None:
    good = [encode_request("mlp", {"input": x64(1, seed=i)}, request_id=f"s{i}") for i in range(5)]
    bad = encode_request("mlp", {"input": np.ones((1, 3), np.float32)}, request_id="bad")
    bad_unary = None
    try:
        stub.ModelInfer(bad, timeout=30)
    except grpc.RpcError as e:
        bad_unary = e
    assert bad_unary is not None
    replies = list(stub.ModelStreamInfer(iter([*good[:2], bad, *good[2:]]), timeout=60))
    by_id = {r.infer_response.id: r for r in replies}
    assert sorted(by_id) == sorted([*(f"s{i}" for i in range(5)), "bad"])
    for i in range(5):
        reply = by_id[f"s{i}"]
        assert reply.error_message == ""
        out = np.frombuffer(reply.infer_response.raw_output_contents[0], np.float32)
        np.testing.assert_allclose(
            out.reshape(1, -1), mlp_reference(x64(1, seed=i), mlp_weights()), atol=1e-5
        )
    # A failed request answers in error_message what a unary call gets as its status.
    assert by_id["bad"].error_message == f"{bad_unary.code().name}: {bad_unary.details()}"
    assert by_id["bad"].infer_response.model_name == "mlp"


def test_a_too_large_request_is_resource_exhausted(stub) -> None:
    huge = encode_request("identity", {"in_FP32": np.zeros(MAX_MESSAGE_BYTES // 4, np.float32)})
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(huge, timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    size = huge.ByteSize()
    assert info.value.details() == (
        f"SERVER: Received message larger than max ({size} vs. {MAX_MESSAGE_BYTES})"
    )


def test_one_megabyte_each_way(stub) -> None:
    x = np.random.default_rng(1).standard_normal(1 << 18).astype(np.float32)  # 1 MiB
    reply = stub.ModelInfer(encode_request("identity", {"in_FP32": x}), timeout=30)
    assert reply.outputs[0].name == "out_FP32"
    np.testing.assert_array_equal(np.frombuffer(reply.raw_output_contents[0], np.float32), x)


def test_gzip_requests_are_accepted(server: ServerProcess) -> None:
    x = x64(2)
    with grpc.insecure_channel(server.address, compression=grpc.Compression.Gzip) as channel:
        reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            encode_request("mlp", {"input": x}), timeout=30
        )
    out = np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(2, -1)
    np.testing.assert_allclose(out, mlp_reference(x, mlp_weights()), atol=1e-5)


def test_unknown_rpcs_and_bad_cold_requests(stub) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelMetadata(pb.ModelMetadataRequest(name="no-such-model"), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-model" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_live_while_python_computes_and_cancellation_frees_the_queue(
    server: ServerProcess, stub
) -> None:
    # slow has one instance: A computes for seconds, B waits in the queue.
    busy = stub.ModelInfer.future(encode_request("slow", slow_inputs(64, LONG)), timeout=120)
    wait_busy(server, "slow", inflight=1, queued=0)
    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live
    waiting = stub.ModelInfer.future(encode_request("slow", slow_inputs(1, 1)), timeout=120)
    wait_busy(server, "slow", inflight=2, queued=1)
    waiting.cancel()
    assert waiting.cancelled()
    # The cancelled call leaves the queue at once (Rust told Python), not when A ends.
    wait_busy(server, "slow", inflight=1, queued=0)
    assert not busy.done(), "A ended before B was checked; raise LONG"
    # A deadline is a status from the server too, and frees the queue the same way.
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(encode_request("slow", slow_inputs(1, 1)), timeout=0.3)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_busy(server, "slow", inflight=1, queued=0)
    feeds = slow_inputs(64, LONG)
    y = np.frombuffer(busy.result().raw_output_contents[0], np.float32).reshape(64, -1)
    np.testing.assert_allclose(y[:1], slow_reference(feeds["x"][:1], LONG), atol=1e-4)


def test_tokens_on_hot_cold_and_live_calls(repo: Path, tmp_path: Path, front_end: str) -> None:
    with (
        ServerProcess(repo, tmp_path, env={"TENSORGATE_AUTH_TOKEN": TOKEN}) as proc,
        grpc.insecure_channel(proc.address) as channel,
    ):
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        calls = {
            "ServerLive": lambda md: stub.ServerLive(pb.ServerLiveRequest(), metadata=md),
            "ModelMetadata": lambda md: stub.ModelMetadata(
                pb.ModelMetadataRequest(name="mlp"), metadata=md
            ),
            "ModelInfer": lambda md: stub.ModelInfer(
                encode_request("mlp", {"input": x64(1)}), metadata=md
            ),
            "ModelStreamInfer": lambda md: list(
                stub.ModelStreamInfer(iter([encode_request("mlp", {"input": x64(1)})]), metadata=md)
            ),
        }
        for name, call in calls.items():
            for metadata, message in (
                ((), "this call needs the server's token: send metadata "
                 "'authorization: Bearer <token>'"),
                ((("authorization", "Bearer wrong"),), "the bearer token is not the token"),
            ):  # fmt: skip
                with pytest.raises(grpc.RpcError) as info:
                    call(metadata)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
                assert info.value.details() == message, name
            assert call((("authorization", f"Bearer {TOKEN}"),)), name
        # Health and reflection stay open.
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert proc.proc is not None and proc.proc.returncode == 0, proc.log()


def test_sigterm_with_requests_in_flight_answers_them(
    repo: Path, tmp_path: Path, front_end: str
) -> None:
    proc = ServerProcess(repo, tmp_path).start()
    try:
        with grpc.insecure_channel(proc.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            request = encode_request("slow", slow_inputs(64, LONG))
            busy = stub.ModelInfer.future(request, timeout=120)
            wait_busy(proc, "slow", inflight=1, queued=0)
            stopping = threading.Thread(target=proc.stop)
            stopping.start()
            reply = busy.result()
            assert reply.model_name == "slow"
            stopping.join()
        wait_until(lambda: proc.proc is not None and proc.proc.poll() is not None, 60, "exit")
        assert proc.proc.returncode == 0, proc.log()
    finally:
        proc.kill()


@pytest.mark.parametrize("mode", ["echo", "decode"])
def test_measurement_modes_answer_model_infer_in_rust(mode: str) -> None:
    """``Server(mode=...)``, the rungs of loadtest/account.py: ModelInfer answered without
    Python (nothing reaches ``take()``), over a real gRPC call."""
    from tensorgate.server.frontends.native import bind

    tensorgate_native = pytest.importorskip("tensorgate_native")

    sock = bind("127.0.0.1", 0, reuse_port=False)
    port = sock.getsockname()[1]
    server = tensorgate_native.Server(
        fd=sock.fileno(), max_message_bytes=MAX_MESSAGE_BYTES, mode=mode
    )
    sock.detach()
    server.start()
    try:
        x = x64(2, seed=3)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            reply = stub.ModelInfer(encode_request("m", {"x": x}, request_id="r-9"), timeout=30)
        (out,) = reply.outputs
        if mode == "echo":  # canned: the MLP's reply, whatever was asked
            assert (reply.model_name, reply.id, out.name) == ("mlp", "", "output")
            assert (list(out.shape), reply.raw_output_contents[0]) == ([1, 10], bytes(40))
        else:  # decoded: the inputs back
            assert (reply.model_name, reply.id, out.name) == ("m", "r-9", "x")
            assert (out.datatype, list(out.shape)) == ("FP32", [2, 64])
            got = np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(2, 64)
            np.testing.assert_array_equal(got, x)
        assert server.take() == [] and server.in_flight() == 0
    finally:
        server.stop(0)
        server.wait()


def test_an_unknown_measurement_mode_is_refused() -> None:
    tensorgate_native = pytest.importorskip("tensorgate_native")
    with socket.socket() as sock, pytest.raises(ValueError, match='not "fast"'):
        tensorgate_native.Server(fd=sock.fileno(), max_message_bytes=1024, mode="fast")


def test_reply_tensors_from_arrays_bytes_and_buffers_and_the_arrays_let_go() -> None:
    """``complete()`` refers to numpy arrays and bytes from the reply without a copy (other
    buffers are copied) and lets them go once the reply is encoded: the next call into
    the module drops the last reference, from the event loop's thread."""
    import weakref

    from tensorgate.server.frontends.native import bind

    tensorgate_native = pytest.importorskip("tensorgate_native")

    sock = bind("127.0.0.1", 0, reuse_port=False)
    port = sock.getsockname()[1]
    server = tensorgate_native.Server(fd=sock.fileno(), max_message_bytes=MAX_MESSAGE_BYTES)
    sock.detach()
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            call = stub.ModelInfer.future(encode_request("m", {"x": x64(1)}), timeout=30)
            items: list = []
            wait_until(lambda: items.extend(server.take()) or items, 10, "the request in take()")
            ((kind, slot, *_),) = items
            assert kind == "infer"
            y = np.arange(6, dtype=np.float32).reshape(2, 3) * 1.5
            held = weakref.ref(y)
            scratch = bytearray(np.float32([7.0]).tobytes())
            outputs = [
                ("y", "FP32", (2, 3), y),
                ("s", "BYTES", (1,), b"\x02\x00\x00\x00hi"),
                ("z", "FP32", (1,), scratch),
            ]
            server.complete([(slot, (0, "m", "1", "r", outputs, []))])
            del y, outputs
            scratch[:] = bytes(4)  # copied at complete(): the reply keeps 7.0
            reply = call.result()
        assert [o.name for o in reply.outputs] == ["y", "s", "z"]
        got = np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(2, 3)
        np.testing.assert_array_equal(got, np.arange(6, dtype=np.float32).reshape(2, 3) * 1.5)
        assert reply.raw_output_contents[1] == b"\x02\x00\x00\x00hi"
        assert np.frombuffer(reply.raw_output_contents[2], np.float32).tolist() == [7.0]
        # The reply is encoded and sent: its reference to the array waits in pyo3's pool of
        # deferred decrefs, which the next call into the module empties.
        wait_until(lambda: server.take() == [] and held() is None, 10, "the array released")
    finally:
        server.stop(0)
        server.wait()
