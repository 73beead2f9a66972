"""``Client(target, stream=True)``: infer calls carried over one ModelStreamInfer stream,
through real gateway processes, from both faces of the client (threads and asyncio).

Nothing here asserts how long anything takes: a deadline test holds the slow model's only
instance busy for seconds (``tests/slowmodel.py``) with a call it waits for, so a call
queued behind it with a timeout well under that cannot be answered in time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from tensorgate.clients import Client, InferenceError, InferResult
from tensorgate.clients.client import DEFAULT_STREAMS
from tensorgate.clients.errors import from_stream_reply
from tensorgate.clients.stream import StreamMux
from tensorgate.codec import encode_request
from tensorgate.protos import grpc_service_pb2_grpc as pb_grpc
from tensorgate.server.demo import build_mlp_onnx, mlp_reference, mlp_weights

from .modelfactory import IDENTITY_DATATYPES, build_identity_onnx
from .serverproc import ServerProcess, wait_busy, wait_until
from .slowmodel import build_slow_onnx, slow_inputs, slow_reference
from .tcpproxy import TcpProxy
from .test_server import _identity_value

# Talks gRPC: runs against both front ends (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("front_end")

# Steps of the slow model that keep its one instance busy for a second or more (64 rows).
LONG = 30_000
FACES = ["sync", "aio"]


@pytest.fixture(scope="module")
def stream_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("stream") / "models"
    build_identity_onnx(root / "echo" / "1" / "model.onnx", ("FP32",), "echo")
    build_mlp_onnx(root / "mlp" / "1" / "model.onnx", mlp_weights())
    build_slow_onnx(root / "slow" / "1" / "model.onnx")
    (root / "slow" / "config.toml").write_text("[instances]\ncount = 1\n")
    return root


@pytest.fixture(scope="module")
def gateway(
    front_end: str, stream_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    with ServerProcess(stream_repo, tmp_path_factory.mktemp("gateway")) as proc:
        yield proc
    assert proc.proc is not None and proc.proc.returncode == 0, proc.log()


class Face:
    """One face of a streaming Client, with calls started in the background: ``start``
    returns a concurrent future. The aio face runs on an event loop of its own thread, so
    that a test drives both faces the same way."""

    def __init__(self, name: str, address: str) -> None:
        self.name = name
        self.client = Client(address, stream=True)
        self._pool = concurrent.futures.ThreadPoolExecutor(16)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    def start(self, *args: Any, **kwargs: Any) -> concurrent.futures.Future[InferResult]:
        if self.name == "sync":
            return self._pool.submit(self.client.infer, *args, **kwargs)
        return self.run(lambda: self.client.aio.infer(*args, **kwargs))

    def run(self, coro: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``coro()`` on the aio face's loop (the face is created there, on first use)."""

        async def inside() -> Any:
            return await coro()

        return asyncio.run_coroutine_threadsafe(inside(), self._loop)

    def infer(self, *args: Any, **kwargs: Any) -> InferResult:
        return self.start(*args, **kwargs).result(120)

    @property
    def mux(self) -> StreamMux:
        """The aio face's multiplexer, or the sync face's (for checks on its bookkeeping)."""
        if self.name == "aio":
            return self.client.aio._stream  # type: ignore[return-value]
        return self.client._stream._mux  # type: ignore[union-attr,return-value]

    def on_loop(self, fn: Callable[[], Any]) -> Any:
        """Read the aio face's state on its own loop thread."""
        loop = self._loop if self.name == "aio" else self.client._stream._loop  # type: ignore

        async def read() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(read(), loop).result(30)

    def close(self) -> None:
        if self.client._aio is not None:
            self.run(lambda: self.client.aio.close()).result(30)
        self.client.close()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._pool.shutdown()


@pytest.fixture(params=FACES)
def face(request: pytest.FixtureRequest, gateway: ServerProcess) -> Iterator[Face]:
    f = Face(request.param, gateway.address)
    yield f
    f.close()


def x64(rows: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 64)).astype(np.float32)


# -- the same answers as unary -----------------------------------------------------------


CASES = [
    ("scorer", "onnx"),
    ("scorer", "torch"),
    ("scorer", "tf"),
    ("strings", "onnx"),
    ("identity", None),
]


def _inputs(model: str) -> dict[str, np.ndarray]:
    if model == "scorer":
        return {"input": x64(3, 7)}
    if model == "strings":
        return {"text": np.array([b"hello", b"MiXed 123", b""], dtype=object)}
    return {f"in_{dt}": _identity_value(dt) for dt in IDENTITY_DATATYPES}


@pytest.mark.parametrize("name", FACES)
def test_stream_results_equal_unary(server: ServerProcess, client: Client, name: str) -> None:
    f = Face(name, server.address)
    try:
        for model, version in CASES:
            want = client.infer(model, _inputs(model), version=version)
            got = f.infer(model, _inputs(model), version=version, request_id="r1")
            assert (got.model, got.variant, got.id) == (want.model, want.variant, "r1")
            assert got.keys() == want.keys()
            for name_ in want:
                assert got[name_].dtype == want[name_].dtype, (model, name_)
                np.testing.assert_array_equal(got[name_], want[name_])
    finally:
        f.close()


# -- replies matched by id ---------------------------------------------------------------


@pytest.mark.parametrize("streams", [1, True])
def test_replies_reach_their_callers_from_threads(gateway: ServerProcess, streams: int) -> None:
    # 16 threads x 25 calls share the sync face's streams; each sends values of its own and
    # must get exactly them back; half name their own request id, which must come back.
    with Client(gateway.address, stream=streams) as client:

        def caller(t: int) -> list[tuple[np.ndarray, InferResult, str]]:
            out = []
            for i in range(25):
                x = np.arange(5, dtype=np.float32) + 1000 * t + i
                rid = f"t{t}-{i}" if i % 2 else ""
                out.append((x, client.infer("echo", {"in_FP32": x}, request_id=rid), rid))
            return out

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            results = [r for rs in pool.map(caller, range(16)) for r in rs]
        assert client._stream is not None and not client._stream._mux.pending  # type: ignore
    with pytest.raises(InferenceError) as info:  # closed: no new streams
        client.infer("echo", {"in_FP32": np.ones(1, np.float32)})
    assert info.value.code == grpc.StatusCode.CANCELLED
    assert len(results) == 400
    for x, result, rid in results:
        np.testing.assert_array_equal(result["out_FP32"], x)
        assert result.id == rid


def test_replies_reach_their_callers_from_tasks(gateway: ServerProcess) -> None:
    async def main() -> list[tuple[np.ndarray, InferResult, str]]:
        client = Client(gateway.address, stream=True)
        try:

            async def one(i: int) -> tuple[np.ndarray, InferResult, str]:
                x = x64(1 + i % 4, i)
                rid = f"task-{i}" if i % 3 else ""
                return x, await client.aio.infer("mlp", {"input": x}, request_id=rid), rid

            results = await asyncio.gather(*(one(i) for i in range(300)))
            assert not client.aio._stream.pending  # type: ignore[union-attr]
            return results
        finally:
            await client.aio.close()
            client.close()

    weights = mlp_weights()
    for x, result, rid in asyncio.run(main()):
        np.testing.assert_allclose(result["output"], mlp_reference(x, weights), atol=1e-4)
        assert result.id == rid


# -- one call fails, the others go on ----------------------------------------------------


def test_a_bad_request_fails_only_itself(face: Face) -> None:
    for _ in range(DEFAULT_STREAMS):  # every stream is open
        face.infer("echo", {"in_FP32": np.ones(2, np.float32)})
    streams = face.on_loop(lambda: set(face.mux.streams()))
    assert len(streams) == DEFAULT_STREAMS
    good = [face.start("mlp", {"input": x64(2, i)}) for i in range(20)]
    unknown = face.start("nope", {"input": x64(1, 0)})
    shape = face.start("mlp", {"input": np.ones((2, 63), np.float32)})
    dtype = face.start("mlp", {"input": np.ones((2, 64), np.float64)})
    more = [face.start("mlp", {"input": x64(2, 100 + i)}) for i in range(20)]
    for fut, code, words in (
        (unknown, grpc.StatusCode.NOT_FOUND, "'nope'"),
        (shape, grpc.StatusCode.INVALID_ARGUMENT, "64"),
        (dtype, grpc.StatusCode.INVALID_ARGUMENT, "FP64"),
    ):
        with pytest.raises(InferenceError) as info:
            fut.result(60)
        assert info.value.code == code, info.value
        assert words in info.value.message and not info.value.message.startswith(code.name)
    weights = mlp_weights()
    for i, fut in enumerate(good):
        np.testing.assert_allclose(fut.result(60)["output"], mlp_reference(x64(2, i), weights),
                                   atol=1e-4)  # fmt: skip
    for fut in more:
        assert fut.result(60)["output"].shape == (2, 10)
    assert face.on_loop(lambda: set(face.mux.streams())) == streams  # the same throughout


def test_error_message_parsing() -> None:
    e = from_stream_reply("INVALID_ARGUMENT: input 'x': expected FP32, got FP64: fix it")
    assert (e.code, e.message) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "input 'x': expected FP32, got FP64: fix it",
    )
    assert from_stream_reply("something odd").code == grpc.StatusCode.UNKNOWN
    assert from_stream_reply("NOT_A_CODE: x").message == "NOT_A_CODE: x"


# -- deadlines and cancellation ----------------------------------------------------------


def test_deadline_fails_only_that_call(face: Face, gateway: ServerProcess) -> None:
    # A computes on slow's only instance for seconds; B waits behind it with a 0.3 s
    # timeout and fails DEADLINE_EXCEEDED; C (another model) and A succeed on the same stream.
    feeds = slow_inputs(64, LONG)
    a = face.start("slow", feeds)
    wait_busy(gateway, "slow", inflight=1, queued=0)
    expired = gateway.metric("tensorgate_requests_total", model="slow", code="DEADLINE_EXCEEDED")
    with pytest.raises(InferenceError) as info:
        face.infer("slow", slow_inputs(1, 1), timeout=0.3)
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED, info.value
    c = face.infer("echo", {"in_FP32": np.arange(3, dtype=np.float32)})
    np.testing.assert_array_equal(c["out_FP32"], np.arange(3, dtype=np.float32))
    a_still_running = not a.done()
    np.testing.assert_allclose(a.result(120)["y"], slow_reference(feeds["x"], LONG), atol=1e-4)
    # The timeout travelled with B: the server drops it instead of computing it after A.
    wait_until(
        lambda: (
            gateway.metric("tensorgate_requests_total", model="slow", code="DEADLINE_EXCEEDED")
            == expired + 1
        ),
        60,
        "the server to drop the expired request",
    )
    assert not face.on_loop(lambda: dict(face.mux.pending))  # nothing left waiting
    assert a_still_running  # A was in flight all along: B's deadline came first


def test_cancelling_one_aio_call(gateway: ServerProcess) -> None:
    face = Face("aio", gateway.address)
    try:
        feeds = slow_inputs(64, LONG)
        a = face.start("slow", feeds)
        wait_busy(gateway, "slow", inflight=1, queued=0)
        b = face.start("slow", slow_inputs(1, 1))
        wait_busy(gateway, "slow", inflight=2, queued=1)
        assert b.cancel()  # cancels the task awaiting B
        c = face.infer("mlp", {"input": x64(1, 3)})
        np.testing.assert_allclose(c["output"], mlp_reference(x64(1, 3), mlp_weights()),
                                   atol=1e-4)  # fmt: skip
        assert face.on_loop(lambda: len(face.mux.pending)) == 1  # only A waits
        assert not a.done()  # C was served while A computed, on the same stream
        np.testing.assert_allclose(a.result(120)["y"], slow_reference(feeds["x"], LONG),
                                   atol=1e-4)  # fmt: skip
        assert b.cancelled()
        assert face.on_loop(lambda: dict(face.mux.pending)) == {}
    finally:
        face.close()


# -- the stream breaks -------------------------------------------------------------------


@pytest.mark.parametrize("name", FACES)
def test_stream_reopens_after_the_connection_breaks(name: str, gateway: ServerProcess) -> None:
    with TcpProxy(gateway.address) as proxy:
        face = Face(name, proxy.address)
        try:
            assert face.infer("mlp", {"input": x64(1, 0)})["output"].shape == (1, 10)
            a = face.start("slow", slow_inputs(64, LONG))
            wait_busy(gateway, "slow", inflight=1, queued=0)
            proxy.cut()
            with pytest.raises(InferenceError) as info:
                a.result(60)
            assert info.value.code == grpc.StatusCode.UNAVAILABLE, info.value
            assert "stream" in info.value.message
            opened = proxy.connections
            for i in range(DEFAULT_STREAMS):  # new streams, on new connections
                x = x64(2, i)
                out = face.infer("mlp", {"input": x})["output"]
                np.testing.assert_allclose(out, mlp_reference(x, mlp_weights()), atol=1e-4)
            assert proxy.connections > opened
        finally:
            face.close()
    wait_busy(gateway, "slow", inflight=0, queued=0)  # A, orphaned, ends on the server


@pytest.mark.parametrize("name", FACES)
def test_stream_reopens_after_the_server_restarts(
    name: str, stream_repo: Path, tmp_path: Path
) -> None:
    first = ServerProcess(stream_repo, tmp_path).start()
    second: ServerProcess | None = None
    try:
        with TcpProxy(first.address) as proxy:
            face = Face(name, proxy.address)
            try:
                assert face.infer("echo", {"in_FP32": np.ones(1, np.float32)})
                a = face.start("slow", slow_inputs(64, LONG))
                wait_busy(first, "slow", inflight=1, queued=0)
                second = ServerProcess(stream_repo, tmp_path).start()
                proxy.target = second.address  # the same address, served by a new process
                first.kill()  # the server dies under the call in flight
                with pytest.raises(InferenceError) as info:
                    a.result(60)
                assert info.value.code == grpc.StatusCode.UNAVAILABLE, info.value
                for i in range(DEFAULT_STREAMS):  # every stream, reopened on the new server
                    x = x64(3, i)
                    out = face.infer("mlp", {"input": x}, timeout=60)["output"]
                    np.testing.assert_allclose(out, mlp_reference(x, mlp_weights()), atol=1e-4)
                served = second.metric("tensorgate_requests_total", model="mlp", code="OK")
                assert served == DEFAULT_STREAMS
            finally:
                face.close()
    finally:
        first.stop()
        if second is not None:
            assert second.stop() == 0, second.log()


def test_stream_timeout_parameter_must_be_an_integer(gateway: ServerProcess) -> None:
    bad = encode_request("mlp", {"input": x64(1, 0)}, request_id="bad")
    bad.parameters["timeout"].string_param = "1s"
    good = encode_request("mlp", {"input": x64(1, 0)}, request_id="good")
    good.parameters["timeout"].uint64_param = 60_000_000
    with grpc.insecure_channel(gateway.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        replies = {r.infer_response.id: r for r in stub.ModelStreamInfer(iter([bad, good]))}
    assert replies["bad"].error_message.startswith("INVALID_ARGUMENT: ")
    assert "microseconds" in replies["bad"].error_message
    assert not replies["good"].error_message
