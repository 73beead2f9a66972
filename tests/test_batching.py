"""Dynamic batching and instances: the scheduler on its own with a plain-numpy backend,
then a real ONNX model through a real gateway."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc
import numpy as np
import pytest

from tensorgate.backends import Backend, BackendOptions, Signature
from tensorgate.clients import Client, InferenceError
from tensorgate.errors import DeadlineExceeded, Overloaded
from tensorgate.protos import grpc_service_pb2 as pb
from tensorgate.protos import grpc_service_pb2_grpc as pb_grpc
from tensorgate.server.demo import mlp_reference, mlp_weights
from tensorgate.server.scheduler import BatchPolicy, Scheduler, Timings

from .serverproc import ServerProcess

# Talks gRPC: runs against both front ends (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("front_end")


class RowSums(Backend):
    """Returns each row's sum and the batch size it was computed in; can be held closed."""

    name = "rowsums"
    platform = "numpy"

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.calls: list[int] = []
        self.entered = 0  # executions that have started (some may wait at the gate)

    @classmethod
    def find_model_file(cls, variant_dir: Path) -> Path | None:
        return None

    def load(self, path: Path, options: BackendOptions) -> Signature:
        return Signature((), ())

    def infer(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        self.entered += 1
        self.gate.wait(10)
        x = inputs["x"]
        self.calls.append(x.shape[0])
        return {"sum": x.sum(axis=1), "n": np.full(x.shape[0], x.shape[0])}


def run(coro):
    return asyncio.run(coro)


async def _submit(s: Scheduler, x: np.ndarray, deadline: float | None = None):
    return await s.submit({"x": x}, None, deadline, Timings())


async def until(condition, what: str, timeout: float = 10.0) -> None:
    """Wait for a state of the scheduler or backend to be reached (no fixed sleeps)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.001)


async def held(**options) -> tuple[RowSums, Scheduler, asyncio.Future]:
    """A started scheduler whose backend holds its first request (1 row) at the gate."""
    backend = RowSums()
    s = Scheduler(backend, name="m/v", **options)
    s.start()
    backend.gate.clear()
    first = asyncio.ensure_future(_submit(s, np.ones((1, 3))))
    await until(lambda: backend.entered == 1, "the first request in the backend")
    return backend, s, first


def test_concurrent_requests_are_stacked_and_split_back() -> None:
    async def main() -> None:
        # The first request holds the only instance.
        backend, s, first = await held(batching=BatchPolicy(8, max_queue_delay=0.05))
        xs = [np.full((rows, 3), float(i)) for i, rows in enumerate([1, 2, 3, 2], start=1)]
        rest = [asyncio.ensure_future(_submit(s, x)) for x in xs]
        await until(lambda: s.queued == 4, "four queued requests")
        backend.gate.set()
        results = await asyncio.gather(first, *rest)
        assert backend.calls == [1, 8]  # the four waiting requests ran as one batch
        for x, r in zip(xs, results[1:], strict=True):
            np.testing.assert_array_equal(r["sum"], x.sum(axis=1))  # exactly its own rows
            assert list(r["n"]) == [8] * x.shape[0]
        await s.close()

    run(main())


def test_batch_never_exceeds_max_and_incompatible_shapes_are_not_mixed() -> None:
    async def main() -> None:
        backend, s, hold = await held(batching=BatchPolicy(4, max_queue_delay=0.05))
        narrow = [asyncio.ensure_future(_submit(s, np.ones((1, 3)))) for _ in range(6)]
        wide = [asyncio.ensure_future(_submit(s, np.ones((1, 5)))) for _ in range(2)]
        await until(lambda: s.queued == 8, "eight queued requests")
        backend.gate.set()
        await asyncio.gather(hold, *narrow, *wide)
        assert max(backend.calls) <= 4
        assert sum(backend.calls) == 9
        assert sorted(backend.calls[1:]) == [2, 2, 4]  # 4 + 2 narrow, 2 wide apart
        await s.close()

    run(main())


def test_preferred_batch_size_does_not_wait_for_more() -> None:
    async def main() -> None:
        backend = RowSums()
        # A 30 s delay that the preferred size must cut short.
        policy = BatchPolicy(16, max_queue_delay=30.0, preferred_batch_sizes=(2,))
        s = Scheduler(backend, name="m/v", batching=policy)
        s.start()
        pair = [_submit(s, np.ones((1, 3))) for _ in range(2)]
        await asyncio.wait_for(asyncio.gather(*pair), timeout=20)
        assert backend.calls == [2]
        await s.close()

    run(main())


def test_a_filling_batch_runs_as_soon_as_it_is_full() -> None:
    async def main() -> None:
        backend = RowSums()
        s = Scheduler(backend, name="m/v", batching=BatchPolicy(4, max_queue_delay=30.0))
        s.start()
        first = asyncio.ensure_future(_submit(s, np.ones((1, 3))))
        # The worker took the first request and sleeps for company (up to 30 s) ...
        await until(lambda: s._filling is not None, "the worker to wait for a batch")
        rest = [asyncio.ensure_future(_submit(s, np.ones((1, 3)))) for _ in range(3)]
        # ... and the three that fill the batch wake it: no 30 s wait.
        await asyncio.wait_for(asyncio.gather(first, *rest), timeout=20)
        assert backend.calls == [4]
        await s.close()

    run(main())


def test_the_queue_delay_counts_from_the_first_requests_arrival() -> None:
    async def main() -> None:
        delay = 2.0
        backend, s, first = await held(batching=BatchPolicy(8, max_queue_delay=delay))
        second = asyncio.ensure_future(_submit(s, np.ones((1, 3))))
        await until(lambda: s.queued == 1, "the second request queued")
        await asyncio.sleep(delay + 0.05)  # it waits behind the held execution past its delay
        backend.gate.set()
        # Its batch runs at once, not after another full delay counted from now.
        await asyncio.wait_for(asyncio.gather(first, second), timeout=delay / 2)
        assert backend.calls == [1, 1]
        await s.close()

    run(main())


def test_expired_and_cancelled_requests_never_reach_the_backend() -> None:
    async def main() -> None:
        backend, s, hold = await held(max_queue_size=2)
        expires = time.monotonic() + 0.01
        expired = asyncio.ensure_future(_submit(s, np.ones((1, 3)), expires))
        cancelled = asyncio.ensure_future(_submit(s, np.ones((1, 3))))
        await until(lambda: s.queued == 2, "two queued requests")
        with pytest.raises(Overloaded, match="queue is full"):
            await _submit(s, np.ones((1, 3)))
        cancelled.cancel()
        await until(lambda: s.queued == 1, "the cancelled request to leave the queue")
        await until(lambda: time.monotonic() > expires, "the deadline to pass")
        backend.gate.set()
        await hold
        with pytest.raises(DeadlineExceeded, match="before compute"):
            await expired
        assert backend.calls == [1]  # neither the expired nor the cancelled one ran
        await s.close()

    run(main())


def test_the_next_execution_waits_on_the_pool_not_on_the_loop() -> None:
    async def main() -> None:
        backend, s, first = await held()
        second = asyncio.ensure_future(_submit(s, np.full((2, 3), 2.0)))
        # Handed to the pool behind the first (a queued request all the same) ...
        await until(lambda: s.queued == 1 and not s._pending, "the second staged on the pool")
        backend.gate.set()
        # ... so the pool thread starts it while the event loop is blocked: no round trip
        # through the loop between two executions.
        blocked_until = time.monotonic() + 10
        while backend.entered < 2 and time.monotonic() < blocked_until:
            time.sleep(0.001)
        assert backend.entered == 2
        assert (await second)["sum"].tolist() == [6.0, 6.0]
        await first
        assert s.queued == 0
        await s.close()

    run(main())


@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_a_staged_execution_whose_caller_left_never_runs(how: str) -> None:
    async def main() -> None:
        backend, s, hold = await held(max_queue_size=1)
        expires = time.monotonic() + 0.05 if how == "deadline" else None
        staged = asyncio.ensure_future(_submit(s, np.ones((1, 3)), expires))
        await until(lambda: s.queued == 1 and not s._pending, "the second staged on the pool")
        with pytest.raises(Overloaded, match="queue is full"):
            await _submit(s, np.ones((1, 3)))
        if how == "cancel":
            staged.cancel()
            await until(lambda: s.queued == 0, "the cancelled request to leave the count")
        else:
            await until(lambda: time.monotonic() > expires, "the deadline to pass")
        backend.gate.set()
        await hold
        if how == "deadline":
            with pytest.raises(DeadlineExceeded, match="before compute"):
                await staged
        await until(lambda: not s._in_pool, "the pool to finish")
        assert backend.calls == [1]  # the staged one never reached the backend
        await s.close()

    run(main())


def test_instances_run_concurrently() -> None:
    async def main() -> None:
        backend = RowSums()
        s = Scheduler(backend, name="m/v", instances=3)
        s.start()
        backend.gate.clear()
        calls = [asyncio.ensure_future(_submit(s, np.ones((1, 3)))) for _ in range(3)]
        # All three are in the backend at once, each on its own instance, none queued.
        await until(lambda: backend.entered == 3, "three executions at once")
        assert s.queued == 0
        backend.gate.set()
        await asyncio.gather(*calls)
        await s.close()

    run(main())


BATCHED_CONFIG = """
max_batch_size = 16

[[input]]
name = "input"
datatype = "FP32"
shape = [-1, 64]

[[output]]
name = "output"
datatype = "FP32"
shape = [-1, 10]

[batching]
max_queue_delay_us = 20000
preferred_batch_sizes = [16]
"""


# Batching in every framework: the same MLP as ONNX, TorchScript and SavedModel.
BATCHED_VARIANTS = ("onnx", "torch", "tf")


@pytest.fixture(scope="module")
def batched_server(front_end: str, demo_repo: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("batched") / "models"
    for variant in BATCHED_VARIANTS:
        shutil.copytree(demo_repo / "scorer" / variant, root / "scorer" / variant)
    (root / "scorer" / "config.toml").write_text(BATCHED_CONFIG)
    with ServerProcess(root, root.parent) as proc:
        yield proc


@pytest.mark.parametrize("variant", BATCHED_VARIANTS)
def test_batched_gateway_gives_each_caller_its_own_rows(
    batched_server: ServerProcess, variant: str
) -> None:
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((int(rng.integers(1, 4)), 64)).astype(np.float32) for _ in range(48)]

    async def main() -> list:
        client = Client(batched_server.address)
        try:
            return await asyncio.gather(
                *(client.aio.infer("scorer", {"input": x}, version=variant) for x in xs)
            )
        finally:
            await client.aio.close()
            client.close()

    results = asyncio.run(main())
    weights = mlp_weights()
    for x, r in zip(xs, results, strict=True):
        assert r.variant == variant
        np.testing.assert_allclose(r["output"], mlp_reference(x, weights), atol=1e-5)
    with grpc.insecure_channel(batched_server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="scorer", version=variant))
    s = stats.model_stats[0]
    assert s.inference_count == sum(x.shape[0] for x in xs)
    assert s.inference_stats.success.count == len(xs)
    assert s.execution_count < len(xs)  # requests were batched together
    assert max(b.batch_size for b in s.batch_stats) > 3
    assert "tensorgate_batch_size_bucket" in batched_server.scrape()


def test_request_over_max_batch_size_is_invalid_argument(batched_server: ServerProcess) -> None:
    with Client(batched_server.address) as client, pytest.raises(InferenceError) as info:
        client.infer("scorer", {"input": np.zeros((17, 64), np.float32)})
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "exceeds max_batch_size 16" in info.value.message


def test_backends_that_wait_on_other_processes_never_run_on_the_event_loop() -> None:
    from tensorgate.backends.isolated import IsolatedBackend
    from tensorgate.backends.remote import RemoteBackend

    assert RowSums.may_run_inline
    assert not IsolatedBackend.may_run_inline and not RemoteBackend.may_run_inline
