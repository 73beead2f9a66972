"""Per-variant scheduling: a bounded queue in front of N instances of one backend, with
optional dynamic batching.

Every request for a variant goes through its scheduler: ``submit`` puts the work on the
queue (full: ``Overloaded``); one of ``instances`` worker tasks takes it - with batching,
together with every queued request it can be stacked with, waiting up to
``max_queue_delay`` for more - drops what is cancelled or past its deadline, and runs the
backend in the variant's own thread pool so framework calls never block the event loop.
Each caller gets exactly its own rows of the batch back.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from tensorgate.backends import Backend, BackendError
from tensorgate.backends.base import BackendInputError, BackendUnreachable
from tensorgate.errors import BackendFailed, DeadlineExceeded, InvalidInput, Overloaded, Unavailable
from tensorgate.server.inline import InlineCost


class Retired(Unavailable):
    """The variant was unloaded (or replaced by a reload) before the request reached it:
    no verdict on its health. The pipeline retries once on the model now loaded."""


@dataclass(slots=True)
class Timings:
    """What happened to one request in the scheduler (filled in as it moves)."""

    queue: float = 0.0  # seconds waiting before its execution started
    compute: float = 0.0  # seconds of the execution it was part of
    # Set on exactly one request per backend execution: the rows that execution computed.
    # Statistics count executions and batch sizes from it.
    execution_rows: int = 0


@dataclass(frozen=True)
class BatchPolicy:
    """Dynamic batching for one variant (``[batching]`` in config.toml)."""

    max_batch_size: int
    max_queue_delay: float = 0.0005  # seconds
    preferred_batch_sizes: tuple[int, ...] = ()


@dataclass(eq=False, slots=True)  # compared by identity: the queue removes abandoned work
class _Work:
    inputs: Mapping[str, np.ndarray]
    outputs: Sequence[str] | None
    deadline: float | None  # time.monotonic() value
    future: asyncio.Future[dict[str, np.ndarray]]
    rows: int = 1
    key: tuple = ()  # requests with equal keys can be stacked along the first dimension
    enqueued: float = field(default_factory=time.perf_counter)
    timings: Timings = field(default_factory=Timings)


class _Abandoned(Exception):
    """Every caller of an execution went away while it waited for a pool thread."""


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _batch_key(inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None) -> tuple:
    if len(inputs) == 1:  # the common case, without the sort
        ((n, a),) = inputs.items()
        tensors: tuple = ((n, a.dtype, a.shape[1:]),)
    else:
        tensors = tuple((n, a.dtype, a.shape[1:]) for n, a in sorted(inputs.items()))
    return (tensors, tuple(sorted(outputs)) if outputs else None)


class Scheduler:
    """Queue + instances (+ batching) for one loaded variant."""

    def __init__(
        self,
        backend: Backend,
        *,
        name: str,
        instances: int = 1,
        max_queue_size: int = 1024,
        batching: BatchPolicy | None = None,
        on_queue_change: Callable[[int], None] | None = None,
        may_inline: bool = True,
    ) -> None:
        self._backend = backend
        self._name = name
        self._instances = instances
        self._max_queue = max_queue_size
        self._batching = batching
        self._pending: deque[_Work] = deque()
        self._arrived = asyncio.Event()
        self._staging = asyncio.Event()  # wakes the stager (see start)
        self._executor = ThreadPoolExecutor(max_workers=instances, thread_name_prefix=name)
        self._workers: list[asyncio.Task[None]] = []
        self._on_queue_change = on_queue_change
        self._reporting = False  # a queue length report is scheduled (_notify)
        self._closed = False
        self._active = 0  # requests taken off the queue and not yet answered
        # Executions handed to the pool and not yet returned (by id of their batch).
        self._in_pool: dict[int, list[_Work]] = {}
        # Run cheap executions on the loop (tensorgate.server.inline); more instances ask
        # for executions in parallel, which only the pool gives; a GPU variant waits on its
        # device, which the loop must not.
        self._inline = (
            InlineCost(name) if may_inline and instances == 1 and backend.may_run_inline else None
        )
        # A worker waiting for a batch to fill (``_fill``), and how many queued requests
        # should wake it.
        self._filling: asyncio.Future[None] | None = None
        self._fill_need = 0

    def start(self) -> None:
        self._workers = [
            asyncio.create_task(self._worker(), name=f"{self._name}-worker-{i}")
            for i in range(self._instances)
        ]
        # Unbatched, one more worker that stages the next execution on the pool while every
        # pool thread computes: a thread then goes from one execution straight to the next
        # instead of idling through a round trip over the event loop (the result's
        # hand-back, a worker's wake-up, the next submission). It sleeps while executions
        # run on the loop. Batched, a batch forms when an instance is free, so that it
        # takes every request that came during the execution before it.
        if self._batching is None:
            stager = self._worker(staging=True)
            self._workers.append(asyncio.create_task(stager, name=f"{self._name}-stager"))

    @property
    def queued(self) -> int:
        """Requests waiting: in the queue, and an execution handed to the pool that waits
        there for a thread (see ``start``)."""
        if len(self._in_pool) <= self._instances:
            return len(self._pending)
        # The pool runs its executions in order, so all but the first ``instances`` wait
        # there; one whose callers went away leaves the count at once.
        staged = list(self._in_pool.values())[self._instances :]
        return len(self._pending) + sum(1 for batch in staged for w in batch if not w.future.done())

    async def submit(
        self,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None,
        deadline: float | None,
        timings: Timings,
    ) -> dict[str, np.ndarray]:
        """Run one request. Raises Overloaded (queue full), DeadlineExceeded,
        Unavailable (variant shutting down or unreachable), InvalidInput (the framework
        refused the input) or BackendFailed."""
        if self._closed:
            raise Retired(f"variant {self._name} is unloading")
        if self.queued >= self._max_queue:
            raise Overloaded(
                f"variant {self._name}: queue is full ({self._max_queue} requests waiting); "
                "retry later or raise [instances] max_queue_size"
            )
        if (
            self._batching is None
            and not self._pending
            and not self._active
            and self._cheap(inputs)
        ):
            return self._run_now(inputs, outputs, deadline, timings)
        loop = asyncio.get_running_loop()
        work = _Work(inputs, outputs, deadline, loop.create_future(), timings=timings)
        if self._batching is not None:
            work.rows = next(iter(inputs.values())).shape[0] if inputs else 1
            work.key = _batch_key(inputs, outputs)
        self._pending.append(work)
        self._arrived.set()
        if self._pool_full():
            self._staging.set()
        filling = self._filling
        if filling is not None and len(self._pending) >= self._fill_need:
            _wake(filling)
        self._notify()
        try:
            return await work.future
        except asyncio.CancelledError:
            # The caller went away (cancelled, or its deadline passed and gRPC cancelled the
            # call): give its queue slot back now, not when a worker would reach it, so that
            # abandoned requests never make the queue refuse live ones.
            self._discard(work)
            raise

    def _discard(self, work: _Work) -> None:
        # Taken by a worker already: it skips or finishes it (staged on the pool, it leaves
        # the count of queued requests now).
        with contextlib.suppress(ValueError):
            self._pending.remove(work)
        self._notify()

    def _notify(self) -> None:
        """Report the queue's length, once per event loop iteration however many requests
        came and went in it (the gauge's lock and a call per request showed under load)."""
        if self._on_queue_change is not None and not self._reporting:
            self._reporting = True
            asyncio.get_running_loop().call_soon(self._report)

    def _report(self) -> None:
        self._reporting = False
        if self._on_queue_change is not None:
            self._on_queue_change(self.queued)

    # -- workers ---------------------------------------------------------------------------
    def _pool_full(self) -> bool:
        return len(self._in_pool) >= self._instances

    async def _worker(self, staging: bool = False) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if staging:
                while not (self._pending and self._pool_full()):
                    self._staging.clear()
                    await self._staging.wait()
            while not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
            batch = self._take_live(self._pending.popleft())
            if batch and self._batching is not None:
                await self._fill(batch)
            self._notify()
            if not batch:
                continue
            self._active += len(batch)
            try:
                await self._run(loop, batch)
            finally:
                self._active -= len(batch)

    def _take_live(self, work: _Work) -> list[_Work]:
        """[work] if its caller still waits and its deadline has not passed, else []."""
        if work.future.done():  # cancelled while queued
            return []
        if work.deadline is not None and time.monotonic() >= work.deadline:
            waited = time.perf_counter() - work.enqueued
            work.future.set_exception(
                DeadlineExceeded(
                    f"variant {self._name}: deadline passed after {waited * 1e3:.1f} ms in "
                    "the queue, before compute"
                )
            )
            return []
        return [work]

    async def _fill(self, batch: list[_Work]) -> None:
        """Add queued requests that stack with ``batch[0]`` until the batch is full, a
        preferred size is reached with nothing more queued, or the delay since ``batch[0]``
        arrived has passed.

        It sleeps until the delay ends or enough requests are queued to reach the next
        size worth running (``submit`` wakes it): one wake-up per batch, not one per
        arrival."""
        policy = self._batching
        assert policy is not None
        rows = batch[0].rows
        # The delay counts from the first request's arrival (as Triton's does): time it
        # spent queued behind a running execution is time it already waited for company.
        until = batch[0].enqueued + policy.max_queue_delay
        loop = asyncio.get_running_loop()
        while rows < policy.max_batch_size:
            skipped: list[_Work] = []
            while self._pending and rows < policy.max_batch_size:
                w = self._pending.popleft()
                if w.key != batch[0].key or rows + w.rows > policy.max_batch_size:
                    skipped.append(w)
                    continue
                live = self._take_live(w)
                batch.extend(live)
                rows += w.rows if live else 0
            self._pending.extendleft(reversed(skipped))
            if rows >= policy.max_batch_size or rows in policy.preferred_batch_sizes:
                return
            remaining = until - time.perf_counter()
            if remaining <= 0 or skipped:
                return
            # Every request has at least one row: this many more queued requests reach the
            # next preferred size or the maximum.
            self._fill_need = min(
                [p - rows for p in policy.preferred_batch_sizes if p > rows]
                + [policy.max_batch_size - rows]
            )
            waiter = self._filling = loop.create_future()
            timer = loop.call_later(remaining, _wake, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                if self._filling is waiter:  # another instance's worker may fill now
                    self._filling = None

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[_Work]) -> None:
        first = batch[0]
        if len(batch) == 1:
            inputs = first.inputs
        else:
            inputs = {
                name: np.concatenate([w.inputs[name] for w in batch]) for name in first.inputs
            }
        inline = self._cheap(inputs)
        # The batch is worth computing until its most patient caller's deadline.
        deadlines = [w.deadline for w in batch]
        deadline = None if None in deadlines else max(deadlines)  # type: ignore[type-var]
        try:
            if inline:
                started = time.perf_counter()
                result = self._timed_infer(inputs, first.outputs, deadline)
            else:
                self._in_pool[id(batch)] = batch
                if self._pending and self._pool_full():
                    self._staging.set()
                try:
                    started, result = await loop.run_in_executor(
                        self._executor, self._pooled, batch, inputs, deadline
                    )
                finally:
                    del self._in_pool[id(batch)]
                    self._notify()
            if len(batch) > 1:
                parts = self._split(result, batch)
        except _Abandoned:
            return
        except Exception as e:
            error = self._error(e)
            now = time.monotonic()
            for w in batch:
                if not w.future.done():
                    w.future.set_exception(self._late(error, w.deadline, now))
            return
        compute = time.perf_counter() - started
        for w in batch:
            w.timings.queue = started - w.enqueued
        first.timings.execution_rows = sum(w.rows for w in batch)
        for i, w in enumerate(batch):
            w.timings.compute = compute
            if not w.future.done():
                w.future.set_result(result if len(batch) == 1 else parts[i])
        if inline:
            await asyncio.sleep(0)  # let the callers and the network run between executions

    def _run_now(
        self,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None,
        deadline: float | None,
        timings: Timings,
    ) -> dict[str, np.ndarray]:
        """An inline variant with nothing queued or running: compute in the caller's own
        task, skipping the queue and the worker's wake-up (what ``_run`` does, for one)."""
        enqueued = time.perf_counter()
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded(f"variant {self._name}: deadline passed before compute")
        started = time.perf_counter()
        self._active += 1
        try:
            result = self._timed_infer(inputs, outputs, deadline)
        except Exception as e:
            raise self._error(e) from e
        finally:
            self._active -= 1
        timings.queue = started - enqueued  # the deadline check: never queued
        timings.compute = time.perf_counter() - started
        timings.execution_rows = 1
        return result

    def _pooled(
        self, batch: list[_Work], inputs: Mapping[str, np.ndarray], deadline: float | None
    ) -> tuple[float, dict[str, np.ndarray]]:
        """An execution on a pool thread: (its start, its result). It may have waited in the
        pool's queue behind another execution (see ``start``): skipped when every caller
        went away meanwhile, refused when the batch's deadline passed."""
        if all(w.future.done() for w in batch):
            raise _Abandoned
        started = time.perf_counter()
        if deadline is not None and time.monotonic() >= deadline:
            waited = started - batch[0].enqueued
            raise DeadlineExceeded(
                f"variant {self._name}: deadline passed after {waited * 1e3:.1f} ms in "
                "the queue, before compute"
            )
        return started, self._timed_infer(inputs, batch[0].outputs, deadline)

    def _timed_infer(
        self,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None,
        deadline: float | None = None,
    ) -> dict[str, np.ndarray]:
        """One backend execution, on whichever thread runs it; measures its CPU cost when
        the variant may run on the loop."""
        cost = self._inline
        measure = cost is not None and cost.sample()
        started = time.thread_time() if measure else 0.0
        if self._backend.accepts_deadline:
            result = self._backend.infer(inputs, outputs, deadline=deadline)  # type: ignore[call-arg]
        else:
            result = self._backend.infer(inputs, outputs)
        if measure and cost is not None:
            cost.observe(time.thread_time() - started, inputs)
        return result

    def _cheap(self, inputs: Mapping[str, np.ndarray]) -> bool:
        return self._inline is not None and self._inline.cheap(inputs)

    def _split(
        self, result: dict[str, np.ndarray], batch: list[_Work]
    ) -> list[dict[str, np.ndarray]]:
        total = sum(w.rows for w in batch)
        for name, arr in result.items():
            if arr.ndim == 0 or arr.shape[0] != total:
                raise BackendFailed(
                    f"variant {self._name}: output '{name}' has shape {list(arr.shape)} for a "
                    f"batch of {total} rows; a batched model must return one row per input row"
                )
        parts, offset = [], 0
        for w in batch:
            parts.append({n: a[offset : offset + w.rows] for n, a in result.items()})
            offset += w.rows
        return parts

    def _late(self, error: Exception, deadline: float | None, now: float) -> Exception:
        """What a request gets of a failed execution: DeadlineExceeded rather than an
        unreachable backend's Unavailable when its own deadline passed first (e.g. while a
        hung isolated worker ran to its execution timeout)."""
        if isinstance(error, Unavailable) and deadline is not None and now >= deadline:
            return DeadlineExceeded(f"deadline passed during the execution; {error}")
        return error

    def _error(self, e: Exception) -> Exception:
        if isinstance(e, BackendFailed | DeadlineExceeded):
            return e
        if isinstance(e, BackendInputError):
            return InvalidInput(f"variant {self._name}: {e}")
        if isinstance(e, BackendUnreachable):
            return Unavailable(f"variant {self._name}: {e}")
        if isinstance(e, BackendError):
            return BackendFailed(f"variant {self._name}: {e}")
        # A framework raising something its backend did not wrap.
        return BackendFailed(f"variant {self._name}: {type(e).__name__}: {e}")

    async def close(self) -> None:
        """Refuse new work, let queued and running work finish, stop the workers."""
        self._closed = True
        while self._pending or self._active:
            await asyncio.sleep(0.005)
        for w in self._workers:
            w.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown, True)
