"""Deadlines, cancellation, backpressure, limits, drain on SIGTERM, hot reload and repository
polling, each through a real gateway process and its gRPC interface.

The servers here serve ONNX models only (they start in about a second). ``slow`` computes
for as long as the caller asks (``tests/slowmodel.py``), so a test can keep a variant's one
instance busy without sleeping in the model; nothing asserts how long anything takes.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tensorgate.clients import Client, InferenceError
from tensorgate.codec import encode_request
from tensorgate.protos import grpc_service_pb2 as pb
from tensorgate.protos import grpc_service_pb2_grpc as pb_grpc
from tensorgate.server.demo import build_mlp_onnx, mlp_reference, mlp_weights

from .modelfactory import write_broken_model
from .serverproc import FRONT_END, ServerProcess, wait_busy, wait_until
from .slowmodel import build_slow_onnx, slow_inputs, slow_reference

# Talks gRPC: runs against both front ends (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("front_end")

# Steps of the slow model that keep one instance busy for a second or more here (64 rows).
LONG = 30_000
MAX_INFLIGHT = 4
MAX_MESSAGE_BYTES = 4_000_000
MAX_TENSOR_ELEMENTS = 100_000


def x64(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 64)).astype(np.float32)


@pytest.fixture(scope="module")
def slow_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("reliability") / "models"
    build_slow_onnx(root / "slow" / "1" / "model.onnx")
    # One instance and one queue slot: a second request waits, a third is refused.
    build_slow_onnx(root / "slow1" / "1" / "model.onnx")
    (root / "slow1" / "config.toml").write_text("[instances]\ncount = 1\nmax_queue_size = 1\n")
    build_mlp_onnx(root / "mlp" / "1" / "model.onnx", mlp_weights())
    # Two copies of the slow model: a request that waits on a busy "a" longer than the
    # attempt timeout moves on to "b".
    build_slow_onnx(root / "slowpair" / "a" / "model.onnx")
    build_slow_onnx(root / "slowpair" / "b" / "model.onnx")
    (root / "slowpair" / "config.toml").write_text(
        '[instances]\ncount = 1\n\n[routing]\nweights = { a = 1 }\nfallback = ["b"]\n'
        "attempt_timeout_ms = 300\n"
    )
    return root


@pytest.fixture(scope="module")
def limited(
    front_end: str, slow_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    args = (
        "--max-inflight", str(MAX_INFLIGHT),
        "--max-message-bytes", str(MAX_MESSAGE_BYTES),
        "--max-tensor-elements", str(MAX_TENSOR_ELEMENTS),
    )  # fmt: skip
    with ServerProcess(slow_repo, tmp_path_factory.mktemp("limited"), *args) as proc:
        yield proc
    assert proc.proc is not None and proc.proc.returncode == 0, proc.log()


@pytest.fixture(scope="module")
def stub(limited: ServerProcess) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    with grpc.insecure_channel(limited.address, options=options) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def slow_request(model: str, rows: int, steps: int) -> pb.ModelInferRequest:
    return encode_request(model, slow_inputs(rows, steps))


def error_of(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def test_attempt_timeout_moves_a_waiting_request_to_the_fallback(
    limited: ServerProcess, stub
) -> None:
    # "a" computes a long pinned request; an unpinned one routed to "a" waits behind it,
    # gives up after the 300 ms attempt timeout, and "b" answers it.
    pinned = encode_request("slowpair", slow_inputs(64, LONG), "a")  # no fallback: pinned
    busy = stub.ModelInfer.future(pinned, timeout=120)
    wait_busy(limited, "slowpair", inflight=1, queued=0)
    before = limited.metric("tensorgate_fallbacks_total", model="slowpair", reason="timeout")
    feeds = slow_inputs(2, 3)
    reply = stub.ModelInfer(encode_request("slowpair", feeds), timeout=60)
    assert reply.model_version == "b"
    out = np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(2, -1)
    np.testing.assert_allclose(out, slow_reference(feeds["x"], 3), atol=1e-5)
    after = limited.metric("tensorgate_fallbacks_total", model="slowpair", reason="timeout")
    assert after - before == 1
    assert busy.result().model_version == "a"  # the long request itself was not disturbed


# -- deadlines and cancellation ------------------------------------------------------------


@pytest.mark.parametrize("how", ["deadline", "cancel"])
def test_abandoned_queued_call_frees_its_slot(limited: ServerProcess, stub, how: str) -> None:
    # slow1 has one instance and one queue slot. A computes; B waits in the only slot.
    busy = stub.ModelInfer.future(slow_request("slow1", 64, LONG), timeout=120)
    wait_busy(limited, "slow1", inflight=1, queued=0)
    if how == "deadline":
        err = error_of(lambda: stub.ModelInfer(slow_request("slow1", 1, 1), timeout=0.3))
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err.details()
    else:
        waiting = stub.ModelInfer.future(slow_request("slow1", 1, 1), timeout=120)
        wait_busy(limited, "slow1", inflight=2, queued=1)
        waiting.cancel()
        assert waiting.cancelled()
    # The abandoned call leaves the queue at once, not when the instance gets to it...
    wait_busy(limited, "slow1", inflight=1, queued=0)
    # A runs LONG steps (tens of seconds here): it is still computing, so B left the queue
    # because it was abandoned, not because the instance got to it.
    assert not busy.done(), "A ended before B was checked; raise LONG"
    # ...so the slot is free for C (with B still queued, C would be RESOURCE_EXHAUSTED).
    feeds = slow_inputs(2, 3)
    reply = stub.ModelInfer(encode_request("slow1", feeds), timeout=120)
    y = np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(2, -1)
    np.testing.assert_allclose(y, slow_reference(feeds["x"], 3), atol=1e-5)
    assert busy.result().model_name == "slow1"


# -- backpressure and limits ---------------------------------------------------------------


def test_inflight_limit_answers_resource_exhausted(limited: ServerProcess, stub) -> None:
    # One long call and three short ones behind it (slow has one instance): 4 in flight.
    calls = [stub.ModelInfer.future(slow_request("slow", 64, LONG), timeout=120)]
    wait_busy(limited, "slow", inflight=1, queued=0)
    calls += [stub.ModelInfer.future(slow_request("slow", 1, 1), timeout=120) for _ in range(3)]
    wait_busy(limited, "slow", inflight=MAX_INFLIGHT, queued=MAX_INFLIGHT - 1)
    request = encode_request("mlp", {"input": x64(1)})
    err = error_of(lambda: stub.ModelInfer(request, timeout=30))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
    assert f"--max-inflight {MAX_INFLIGHT}" in err.details(), err.details()
    for call in calls:  # what was accepted still completes
        assert call.result().model_name == "slow"
    wait_busy(limited, "slow", inflight=0, queued=0)
    assert stub.ModelInfer(request, timeout=30).model_name == "mlp"
    refused = limited.metric("tensorgate_requests_total", code="RESOURCE_EXHAUSTED")
    assert refused >= 1


def test_full_queue_answers_resource_exhausted(limited: ServerProcess, stub) -> None:
    busy = stub.ModelInfer.future(slow_request("slow1", 64, LONG), timeout=120)
    wait_busy(limited, "slow1", inflight=1, queued=0)
    waiting = stub.ModelInfer.future(slow_request("slow1", 1, 1), timeout=120)
    wait_busy(limited, "slow1", inflight=2, queued=1)
    err = error_of(lambda: stub.ModelInfer(slow_request("slow1", 1, 1), timeout=30))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue is full" in err.details(), err.details()
    busy.result()
    waiting.result()


def test_oversize_message_is_resource_exhausted(stub) -> None:
    rows = MAX_MESSAGE_BYTES // (64 * 4) + 100
    err = error_of(lambda: stub.ModelInfer(encode_request("mlp", {"input": x64(rows)}), timeout=30))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
    assert "larger than max" in err.details(), err.details()
    assert str(MAX_MESSAGE_BYTES) in err.details(), err.details()


@pytest.mark.parametrize("typed", [False, True])
def test_tensor_element_limit_is_invalid_argument(stub, typed: bool) -> None:
    rows = MAX_TENSOR_ELEMENTS // 64 + 1
    if typed:
        request = pb.ModelInferRequest(model_name="mlp")
        tensor = request.inputs.add(name="input", datatype="FP32", shape=[rows, 64])
        tensor.contents.fp32_contents.extend([0.0] * (rows * 64))
    else:
        request = encode_request("mlp", {"input": x64(rows)})
    err = error_of(lambda: stub.ModelInfer(request, timeout=30))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert f"more than the limit of {MAX_TENSOR_ELEMENTS}" in err.details(), err.details()
    # At the limit it is served.
    ok = encode_request("mlp", {"input": x64(MAX_TENSOR_ELEMENTS // 64)})
    assert stub.ModelInfer(ok, timeout=30).model_name == "mlp"


# -- drain on SIGTERM ------------------------------------------------------------------------


class LoadThreads:
    """Client threads that call models in a loop and keep every outcome.

    ``calls`` are (model, inputs, check) triples; ``check(outputs)`` says whether a reply is
    right. Each thread stops at ``stop``, or after its first failure once ``stop_on_error``.
    """

    def __init__(self, address: str, calls: list, threads: int = 4, **client_kwargs) -> None:
        self.address = address
        self.calls = calls
        self.client_kwargs = client_kwargs
        self.stop = threading.Event()
        self.stop_on_error = threading.Event()
        self.lock = threading.Lock()
        self.ok: list[tuple[float, str]] = []  # (completion time, model)
        self.wrong: list[str] = []
        self.errors: list[tuple[float, str, grpc.StatusCode, str]] = []
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def _run(self, index: int) -> None:
        with Client(self.address, **self.client_kwargs) as client:
            i = index
            while not self.stop.is_set():
                model, inputs, check = self.calls[i % len(self.calls)]
                i += 1
                try:
                    result = client.infer(model, inputs, timeout=60)
                except InferenceError as e:
                    with self.lock:
                        self.errors.append((time.monotonic(), model, e.code, e.message))
                    if self.stop_on_error.is_set():
                        return
                    time.sleep(0.01)
                    continue
                with self.lock:
                    self.ok.append((time.monotonic(), model))
                    if not check(result):
                        self.wrong.append(model)

    def served(self, model: str | None = None) -> int:
        with self.lock:
            return sum(1 for _, m in self.ok if model is None or m == model)

    def __enter__(self) -> LoadThreads:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(120)


def mlp_call(seed: int = 0, weights_seed: int = 0, rows: int = 2):
    x = x64(rows, seed)
    expected = mlp_reference(x, mlp_weights(weights_seed))
    return ("mlp", {"input": x}, lambda r: np.allclose(r["output"], expected, atol=1e-4))


def slow_call(seed: int, rows: int = 4, steps: int = 1500):
    feeds = slow_inputs(rows, steps, seed)
    expected = slow_reference(feeds["x"], steps)
    return ("slow", feeds, lambda r: np.allclose(r["y"], expected, atol=1e-4))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_under_load_finishes_every_accepted_call(
    slow_repo: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    server = ServerProcess(slow_repo, tmp_path, "--drain-timeout", "60").start()
    calls = [slow_call(0), slow_call(1), mlp_call(0), slow_call(2)]
    with LoadThreads(server.address, calls, threads=5) as load:
        wait_until(lambda: load.served("slow") >= 10, 120, "10 slow calls served")
        load.stop_on_error.set()
        signalled = time.monotonic()
        assert server.proc is not None
        server.proc.send_signal(sig)
        returncode = server.proc.wait(120)
        load.stop.set()
    server.stop()
    log = server.log()
    assert returncode == 0, log
    assert not load.wrong, f"wrong answers from {load.wrong}"
    # Every failure is a refusal: the drain's own UNAVAILABLE, or no server any more.
    unexpected = [e for e in load.errors if e[2] != grpc.StatusCode.UNAVAILABLE]
    assert not unexpected, unexpected
    # Every call the server had accepted when the signal came was answered, and right.
    draining = [line for line in log.splitlines() if "draining:" in line]
    assert draining, log
    accepted = int(draining[0].split("draining:")[1].split()[0])
    answered_after = sum(1 for t, _ in load.ok if t > signalled)
    assert answered_after >= accepted, (answered_after, accepted, log)
    refused = [e for e in load.errors if "draining" in e[3]]
    assert all("server is draining" in e[3] for e in refused)


def test_drain_timeout_bounds_the_drain(slow_repo: Path, tmp_path: Path) -> None:
    server = ServerProcess(slow_repo, tmp_path, "--drain-timeout", "0.5").start()
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        busy = stub.ModelInfer.future(slow_request("slow", 64, LONG), timeout=120)
        wait_busy(server, "slow", inflight=1, queued=0)
        assert server.stop(timeout=120) == 0, server.log()
        assert busy.exception() is not None  # cut off by the drain timeout, not lost silently
    assert "drain timeout: 1 inference request(s) still in flight" in server.log()


# -- hot reload --------------------------------------------------------------------------


@pytest.fixture
def reload_repo(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    build_mlp_onnx(root / "mlp" / "1" / "model.onnx", mlp_weights(0))
    return root


def replace_file(path: Path, write) -> None:
    """Write a new version of ``path`` next to it and rename it over (as deploy tools do)."""
    tmp = path.with_name(f".{path.name}.new")
    write(tmp)
    os.replace(tmp, path)


def test_reload_under_load_fails_no_request(reload_repo: Path, tmp_path: Path) -> None:
    model_file = reload_repo / "mlp" / "1" / "model.onnx"
    x = x64(2, 7)
    refs = {seed: mlp_reference(x, mlp_weights(seed)) for seed in (0, 1)}
    seen: Counter[int] = Counter()

    def either(result) -> bool:
        for seed, ref in refs.items():
            if np.allclose(result["output"], ref, atol=1e-4):
                seen[seed] += 1
                return True
        return False

    with ServerProcess(reload_repo, tmp_path) as server, Client(server.address) as client:
        with LoadThreads(server.address, [("mlp", {"input": x}, either)], threads=4) as load:
            for i in range(6):
                seed = (i + 1) % 2
                replace_file(model_file, lambda p, s=seed: build_mlp_onnx(p, mlp_weights(s)))
                before = load.served()
                client.load_model("mlp", timeout=60)
                wait_until(lambda b=before: load.served() > b + 5, 60, "calls after a reload")
        assert not load.errors, load.errors[:5]
        assert not load.wrong
        assert seen[0] and seen[1], seen  # both versions served
        # The last reload (seed 0) is what serves now.
        np.testing.assert_allclose(client.infer("mlp", {"input": x})["output"], refs[0], atol=1e-4)


@pytest.mark.parametrize("broken", ["model file", "config.toml"])
def test_broken_reload_keeps_the_loaded_version_and_says_why(
    reload_repo: Path, tmp_path: Path, broken: str
) -> None:
    model_file = reload_repo / "mlp" / "1" / "model.onnx"
    good = model_file.read_bytes()
    x = x64(3)
    with ServerProcess(reload_repo, tmp_path) as server, Client(server.address) as client:
        if broken == "model file":
            replace_file(model_file, write_broken_model)
        else:
            (reload_repo / "mlp" / "config.toml").write_text("max_batch_sise = 4\n")
        with pytest.raises(InferenceError) as info:
            client.load_model("mlp", timeout=60)
        assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION, info.value
        assert "was not reloaded, the loaded version keeps serving" in info.value.message
        expected = "cannot load ONNX model" if broken == "model file" else "max_batch_sise"
        assert expected in info.value.message, info.value.message
        # The old version still serves, and the index says why the new one does not.
        result = client.infer("mlp", {"input": x}, timeout=30)
        np.testing.assert_allclose(result["output"], mlp_reference(x, mlp_weights()), atol=1e-5)
        (entry,) = [m for m in client.repository_index() if m["name"] == "mlp"]
        assert entry["state"] == "READY", entry
        assert "the last reload failed" in entry["reason"] and expected in entry["reason"], entry
        # Fixed files load, and the note goes away.
        model_file.write_bytes(good)
        (reload_repo / "mlp" / "config.toml").unlink(missing_ok=True)
        client.load_model("mlp", timeout=60)
        (entry,) = [m for m in client.repository_index() if m["name"] == "mlp"]
        assert entry["state"] == "READY" and not entry.get("reason"), entry


def test_polling_loads_reloads_and_unloads(reload_repo: Path, tmp_path: Path) -> None:
    x = x64(2, 3)
    ref = {seed: mlp_reference(x, mlp_weights(seed)) for seed in (0, 1)}
    with (
        ServerProcess(reload_repo, tmp_path, "--poll-interval", "0.2") as server,
        Client(server.address) as client,
    ):

        def output() -> np.ndarray:
            return client.infer("fresh", {"input": x}, timeout=30)["output"]

        # A new model directory (moved in whole) is loaded.
        staging = tmp_path / "staging"
        build_mlp_onnx(staging / "1" / "model.onnx", mlp_weights(0))
        staging.rename(reload_repo / "fresh")
        wait_until(lambda: client.is_model_ready("fresh"), 60, "fresh to load")
        np.testing.assert_allclose(output(), ref[0], atol=1e-5)

        # Changed files are reloaded.
        model_file = reload_repo / "fresh" / "1" / "model.onnx"
        replace_file(model_file, lambda p: build_mlp_onnx(p, mlp_weights(1)))
        wait_until(lambda: np.allclose(output(), ref[1], atol=1e-5), 60, "fresh to reload")

        # Broken files leave the loaded version serving, and the index says why.
        replace_file(model_file, write_broken_model)

        def reload_failed() -> bool:
            index = [m for m in client.repository_index() if m["name"] == "fresh"]
            return bool(index) and "the last reload failed" in index[0].get("reason", "")

        wait_until(reload_failed, 60, "the broken reload to be reported")
        np.testing.assert_allclose(output(), ref[1], atol=1e-5)

        # A removed directory is unloaded.
        shutil.rmtree(reload_repo / "fresh")

        def unloaded() -> bool:
            try:
                output()
            except InferenceError as e:
                return e.code == grpc.StatusCode.NOT_FOUND
            return False

        wait_until(unloaded, 60, "fresh to unload")
        assert client.infer("mlp", {"input": x})["output"].shape == (2, 10)
    assert "poll: model directory fresh removed" in server.log()


def test_drain_under_load_answers_every_call_or_refuses_it_retryably(
    slow_repo: Path, tmp_path: Path
) -> None:
    # 16 callers keep calling through the whole drain (clients retry UNAVAILABLE): each
    # sees its answer or UNAVAILABLE, never CANCELLED; health says NOT_SERVING meanwhile.
    server = ServerProcess(slow_repo, tmp_path, "--drain-timeout", "30").start()
    health_seen: list[int] = []
    exited = threading.Event()

    def watch_health() -> None:
        with grpc.insecure_channel(server.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not exited.is_set():
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                except grpc.RpcError:
                    return  # the server is gone
                health_seen.append(reply.status)
                time.sleep(0.005)

    with LoadThreads(server.address, [mlp_call(i) for i in range(4)], threads=16) as load:
        wait_until(lambda: load.served("mlp") >= 200, 120, "200 calls served")
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        watcher = threading.Thread(target=watch_health)
        watcher.start()
        returncode = server.proc.wait(120)
        exited.set()
        watcher.join(30)
        time.sleep(0.2)  # the callers' last calls meet a closed port
    server.stop()
    assert returncode == 0, server.log()
    assert not load.wrong
    unexpected = [e for e in load.errors if e[2] != grpc.StatusCode.UNAVAILABLE]
    assert not unexpected, (len(unexpected), unexpected[:5])
    assert any("server is draining" in e[3] for e in load.errors), load.errors[:5]
    assert health_pb2.HealthCheckResponse.NOT_SERVING in health_seen, health_seen[:20]


def test_start_up_answers_models_still_loading_with_unavailable(tmp_path: Path) -> None:
    # The port opens at once (liveness answers); until the initial load is done ServerReady
    # is false and a model that is on disk but not loaded yet answers UNAVAILABLE "loading"
    # (clients retry), never NOT_FOUND. "a-late" is a remote variant whose target never
    # answers: it holds the load for its timeout_s while "mlp" waits its turn.
    from tensorgate.server.app import Gateway
    from tensorgate.server.settings import ServerSettings

    root = tmp_path / "models"
    (root / "a-late" / "remote").mkdir(parents=True)
    (root / "a-late" / "remote" / "remote.toml").write_text(
        'target = "127.0.0.1:1"\nmodel = "mlp"\ntimeout_s = 5\n'
    )
    build_mlp_onnx(root / "mlp" / "1" / "model.onnx", mlp_weights())

    async def main() -> None:
        gateway = Gateway(
            ServerSettings(
                repository=root, port=0, metrics_port=None, front_end=FRONT_END["current"]
            )
        )
        starting = asyncio.create_task(gateway.start())
        while not gateway.grpc_port:
            await asyncio.sleep(0.01)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            request = encode_request("mlp", {"input": x64(1)})
            assert (await stub.ServerLive(pb.ServerLiveRequest(), timeout=5)).live
            assert not (await stub.ServerReady(pb.ServerReadyRequest(), timeout=5)).ready
            assert not starting.done()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ModelInfer(request, timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "model 'mlp' is loading" in info.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ModelInfer(encode_request("nosuch", {"input": x64(1)}), timeout=5)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            await starting
            assert (await stub.ServerReady(pb.ServerReadyRequest(), timeout=5)).ready
            reply = await stub.ModelInfer(request, timeout=5)
            assert reply.model_name == "mlp"
        await gateway.stop(grace=5)

    asyncio.run(main())


def test_drain_ends_idle_streams_at_once(slow_repo: Path, tmp_path: Path) -> None:
    # An open ModelStreamInfer with nothing in flight must not hold the stopping server for
    # the whole drain timeout (60 s here): the drain ends it (OK) and the server exits.
    server = ServerProcess(slow_repo, tmp_path, "--drain-timeout", "60").start()
    release = threading.Event()

    def requests() -> Iterator[pb.ModelInferRequest]:
        yield encode_request("mlp", {"input": x64(1)})
        release.wait(120)  # an idle client: the stream stays open, nothing more is sent

    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        replies = stub.ModelStreamInfer(requests(), timeout=120)
        first = next(replies)
        assert not first.error_message and first.infer_response.model_name == "mlp"
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        try:
            assert list(replies) == []  # the server ended the stream without an error
            assert server.proc.wait(30) == 0, server.log()
        finally:
            release.set()
    server.stop()


def test_the_heap_is_settled_after_load_and_model_changes(tmp_path: Path) -> None:
    # server/heap.py: once the models are loaded the collector runs generation 0 every
    # GEN0_THRESHOLD allocations and skips what was alive (frozen); each later change to the
    # models collects everything again (an unloaded model's cycles go) and freezes anew;
    # stop puts the collector back as it was (this test's own process runs the gateway).
    import gc
    import weakref

    from tensorgate.server import heap
    from tensorgate.server.app import Gateway
    from tensorgate.server.settings import ServerSettings

    root = tmp_path / "models"
    build_mlp_onnx(root / "mlp" / "1" / "model.onnx", mlp_weights())
    before = gc.get_threshold()

    class Node:
        pass

    async def main() -> None:
        gateway = Gateway(
            ServerSettings(
                repository=root, port=0, metrics_port=None, front_end=FRONT_END["current"]
            )
        )
        await gateway.start()
        assert gc.get_threshold()[0] == heap.GEN0_THRESHOLD
        assert gc.get_freeze_count() > 0
        assert heap.tune_malloc(), "glibc's mallopt refused the thresholds"
        cycle = Node()
        cycle.me = cycle  # type: ignore[attr-defined]
        gone = weakref.ref(cycle)
        gc.freeze()  # as if it had been alive at the last settle: only a settle frees it
        del cycle
        gc.collect()
        assert gone() is not None
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            await stub.RepositoryModelUnload(
                pb.RepositoryModelUnloadRequest(model_name="mlp"), timeout=30
            )
            assert gone() is None, "the unload did not settle the heap"
            await stub.RepositoryModelLoad(
                pb.RepositoryModelLoadRequest(model_name="mlp"), timeout=60
            )
            reply = await stub.ModelInfer(encode_request("mlp", {"input": x64(1)}), timeout=5)
            assert reply.model_name == "mlp"
        await gateway.stop(grace=5)
        assert gc.get_threshold() == before
        assert gc.get_freeze_count() == 0

    asyncio.run(main())
