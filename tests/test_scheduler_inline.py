"""Cheap executions run on the event loop thread (the hand-off to a pool thread costs more
than they compute); costly ones, large requests to cheap models, variants with several
instances and GPU variants stay in the pool. The cost is the backend's CPU time per input
element, so an execution that waits (preempted, or for the GIL) costs what it computed,
not how long it waited, and one slow execution in a window moves nothing."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest

from tensorgate.backends import Backend, BackendOptions, Signature
from tensorgate.errors import DeadlineExceeded
from tensorgate.server.inline import INLINE_BUDGET_S, INLINE_FIRST, INLINE_SAMPLE, INLINE_WINDOW
from tensorgate.server.scheduler import Scheduler, Timings


class Doubler(Backend):
    """Doubles ``x``; records which thread ran each call; can be made to burn CPU (``burn``
    seconds of thread CPU time per call) or to wait (``delay`` seconds asleep)."""

    name = "doubler"
    platform = "numpy"

    def __init__(self) -> None:
        self.threads: list[int] = []
        self.delay = 0.0
        self.burn = 0.0

    @classmethod
    def find_model_file(cls, variant_dir: Path) -> Path | None:
        return None

    def load(self, path: Path, options: BackendOptions) -> Signature:
        return Signature((), ())

    def infer(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        self.threads.append(threading.get_ident())
        if self.delay:
            time.sleep(self.delay)
        until = time.thread_time() + self.burn
        while time.thread_time() < until:
            pass
        return {"y": inputs["x"] * 2}


async def _call(
    s: Scheduler, value: float, deadline: float | None = None, rows: int = 1
) -> Timings:
    timings = Timings()
    out = await s.submit({"x": np.full(rows, value)}, None, deadline, timings)
    assert out["y"][0] == value * 2 and out["y"].shape == (rows,)
    return timings


def test_cheap_variant_moves_to_the_loop_and_back_when_it_gets_costly() -> None:
    async def main() -> None:
        backend = Doubler()
        s = Scheduler(backend, name="m/v")
        s.start()
        loop_thread = threading.get_ident()
        for i in range(INLINE_FIRST):
            await _call(s, i)
        assert loop_thread not in backend.threads  # measured in the pool first
        t = await _call(s, 1.0)
        assert backend.threads[-1] == loop_thread  # now inline
        assert t.execution_rows == 1 and t.compute > 0 and t.queue > 0
        # Costly executions: the next estimate (one execution in INLINE_SAMPLE measured)
        # sends the variant back to its pool.
        backend.burn = INLINE_BUDGET_S * 2
        for i in range(INLINE_WINDOW * INLINE_SAMPLE):
            await _call(s, i)
        backend.burn = 0.0
        await _call(s, 3.0)
        assert backend.threads[-1] != loop_thread
        with pytest.raises(DeadlineExceeded):
            await _call(s, 4.0, deadline=time.monotonic() - 1)
        await s.close()

    asyncio.run(main())


def test_one_slow_execution_moves_nothing() -> None:
    # A preempted or otherwise unlucky execution is one in a window: the estimate is the
    # window's 25th percentile, so the variant stays on the loop.
    async def main() -> None:
        backend = Doubler()
        s = Scheduler(backend, name="m/v")
        s.start()
        loop_thread = threading.get_ident()
        for i in range(INLINE_FIRST):
            await _call(s, i)
        for i in range(INLINE_WINDOW * INLINE_SAMPLE):
            # The first execution measured after the first estimate is the slow one.
            backend.burn = INLINE_BUDGET_S * 10 if i == INLINE_SAMPLE - 1 else 0.0
            await _call(s, i)
            if i == INLINE_SAMPLE - 1:
                assert max(s._inline.costs) > INLINE_BUDGET_S * 5  # it was measured
        await _call(s, 1.0)
        assert backend.threads[-1] == loop_thread
        await s.close()

    asyncio.run(main())


def test_a_large_request_to_an_inline_variant_runs_in_the_pool() -> None:
    async def main() -> None:
        backend = Doubler()
        backend.burn = INLINE_BUDGET_S / 4  # per one-element request
        s = Scheduler(backend, name="m/v")
        s.start()
        loop_thread = threading.get_ident()
        for i in range(INLINE_FIRST):
            await _call(s, i)
        await _call(s, 1.0)
        assert backend.threads[-1] == loop_thread
        await _call(s, 1.0, rows=64)  # expected to cost 16 budgets: not on the loop
        assert backend.threads[-1] != loop_thread
        await _call(s, 1.0)
        assert backend.threads[-1] == loop_thread
        await s.close()

    asyncio.run(main())


def test_a_gpu_variant_never_runs_on_the_loop() -> None:
    async def main() -> None:
        backend = Doubler()
        s = Scheduler(backend, name="m/v", may_inline=False)
        s.start()
        for i in range(INLINE_FIRST + INLINE_WINDOW):
            await _call(s, i)
        assert threading.get_ident() not in backend.threads
        await s.close()

    asyncio.run(main())


def test_concurrent_callers_of_an_inline_variant_all_get_their_rows() -> None:
    async def main() -> None:
        backend = Doubler()
        s = Scheduler(backend, name="m/v")
        s.start()
        for i in range(INLINE_WINDOW):
            await _call(s, i)
        await asyncio.gather(*(_call(s, float(i)) for i in range(100)))
        await s.close()

    asyncio.run(main())


def test_several_instances_never_run_on_the_loop() -> None:
    async def main() -> None:
        backend = Doubler()
        s = Scheduler(backend, name="m/v", instances=2)
        s.start()
        for i in range(INLINE_WINDOW * 2):
            await _call(s, i)
        assert threading.get_ident() not in backend.threads
        await s.close()

    asyncio.run(main())
