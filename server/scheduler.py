"""Per-variant scheduling: a bounded queue in front of N instances of one backend.

Every request for a variant goes through its scheduler: ``submit`` puts the work on the
queue (full: ``Overloaded``), one of ``instances`` worker tasks takes it, drops it if the
caller's deadline has passed or the call was cancelled, and runs the backend in the
variant's own thread pool so framework calls never block the event loop.

The worker loop is where dynamic batching plugs in: it takes one item today; a batching
policy will take several and stack them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from tensorgate.backends import Backend, BackendError
from tensorgate.backends.base import BackendInputError

from .errors import BackendFailed, DeadlineExceeded, InvalidInput, Overloaded, Unavailable


@dataclass
class Timings:
    """Seconds spent in each stage of one request (filled in as it moves)."""

    queue: float = 0.0
    compute: float = 0.0


@dataclass
class _Work:
    inputs: Mapping[str, np.ndarray]
    outputs: Sequence[str] | None
    deadline: float | None  # time.monotonic() value
    future: asyncio.Future[dict[str, np.ndarray]]
    enqueued: float = field(default_factory=time.perf_counter)
    timings: Timings = field(default_factory=Timings)


class Scheduler:
    """Queue + instances for one loaded variant."""

    def __init__(
        self,
        backend: Backend,
        *,
        name: str,
        instances: int = 1,
        max_queue_size: int = 1024,
        on_queue_change: Callable[[int], None] | None = None,
    ) -> None:
        self._backend = backend
        self._name = name
        self._instances = instances
        self._queue: asyncio.Queue[_Work] = asyncio.Queue(maxsize=max_queue_size)
        self._executor = ThreadPoolExecutor(max_workers=instances, thread_name_prefix=name)
        self._workers: list[asyncio.Task[None]] = []
        self._on_queue_change = on_queue_change
        self._closed = False
        self._active = 0  # items taken off the queue and not yet answered

    def start(self) -> None:
        self._workers = [
            asyncio.create_task(self._worker(), name=f"{self._name}-worker-{i}")
            for i in range(self._instances)
        ]

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    async def submit(
        self,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None,
        deadline: float | None,
        timings: Timings,
    ) -> dict[str, np.ndarray]:
        """Run one request. Raises Overloaded (queue full), DeadlineExceeded,
        Unavailable (variant shutting down) or BackendFailed."""
        if self._closed:
            raise Unavailable(f"variant {self._name} is unloading")
        loop = asyncio.get_running_loop()
        work = _Work(inputs, outputs, deadline, loop.create_future(), timings=timings)
        try:
            self._queue.put_nowait(work)
        except asyncio.QueueFull:
            raise Overloaded(
                f"variant {self._name}: queue is full ({self._queue.maxsize} requests waiting); "
                "retry later or raise [instances] max_queue_size"
            ) from None
        self._notify()
        # If the caller is cancelled, the future is cancelled with it and the worker skips it.
        return await work.future

    def _notify(self) -> None:
        if self._on_queue_change is not None:
            self._on_queue_change(self._queue.qsize())

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            work = await self._queue.get()
            self._notify()
            self._active += 1
            try:
                await self._run(loop, work)
            finally:
                self._active -= 1

    async def _run(self, loop: asyncio.AbstractEventLoop, work: _Work) -> None:
        if work.future.done():  # cancelled while queued
            return
        now = time.perf_counter()
        work.timings.queue = now - work.enqueued
        if work.deadline is not None and time.monotonic() >= work.deadline:
            work.future.set_exception(
                DeadlineExceeded(
                    f"variant {self._name}: deadline passed after "
                    f"{work.timings.queue * 1e3:.1f} ms in the queue, before compute"
                )
            )
            return
        try:
            result = await loop.run_in_executor(
                self._executor, self._backend.infer, work.inputs, work.outputs
            )
        except BackendInputError as e:
            if not work.future.done():
                work.future.set_exception(InvalidInput(f"variant {self._name}: {e}"))
        except BackendError as e:
            if not work.future.done():
                work.future.set_exception(BackendFailed(f"variant {self._name}: {e}"))
        except Exception as e:  # a framework raising something we did not wrap
            if not work.future.done():
                work.future.set_exception(
                    BackendFailed(f"variant {self._name}: {type(e).__name__}: {e}")
                )
        else:
            work.timings.compute = time.perf_counter() - now
            if not work.future.done():
                work.future.set_result(result)

    async def close(self) -> None:
        """Refuse new work, let queued and running work finish, stop the workers."""
        self._closed = True
        while self._queue.qsize() or self._active:
            await asyncio.sleep(0.005)
        for w in self._workers:
            w.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown, True)
