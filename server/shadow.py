"""Shadow traffic: requests mirrored to other variants after the reply, and the outputs
compared (``compare_outputs``), per (serving variant, shadow variant) pair.

Mirrors run in the background (no caller waits for them), bounded per shadow variant so
that they never crowd out the requests it serves itself; a full shadow drops the mirror.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from tensorgate.errors import Overloaded, Unavailable

from .metrics import Metrics
from .scheduler import Timings

log = logging.getLogger(__name__)

#: Mirrored requests in flight per shadow variant, at most (and at most half its queue).
SHADOW_MAX_INFLIGHT = 32
#: Outputs larger than this (elements) are compared off the event loop.
SHADOW_INLINE_ELEMENTS = 1 << 16
#: A shadow whose worst difference grows beyond this is logged as a warning.
SHADOW_LOG_ABOVE = 1e-4


@dataclass
class ShadowStats:
    """Comparisons of one (serving variant, shadow variant) pair since the model loaded."""

    compared: int = 0
    failed: int = 0
    dropped: int = 0
    worst_abs_diff: float = 0.0
    # The largest difference since a rollout last reset it (the start of its phase).
    window_worst_abs_diff: float = 0.0
    argmax_rows: int = 0
    argmax_agree: int = 0


class Submit(Protocol):
    """A variant's scheduler, as the router uses it (``scheduler.Scheduler``)."""

    def submit(
        self,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None,
        deadline: float | None,
        timings: Timings,
    ) -> Awaitable[dict[str, np.ndarray]]: ...


class ShadowTarget(Protocol):
    """What a mirror reads of the shadow variant (``repository.Variant``)."""

    scheduler: Submit | None

    @property
    def ready(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class Mirror:
    """One request served by ``served``, to be mirrored to shadow variant ``name``."""

    model: str
    served: str
    name: str
    target: ShadowTarget | None  # None: the variant is gone
    stats: ShadowStats  # of the (served, name) pair
    inflight: dict[str, int]  # mirrors in flight per shadow variant of the model
    limit: int  # ...at most this many
    inputs: Mapping[str, np.ndarray]
    wanted: Sequence[str] | None
    outputs: dict[str, np.ndarray]  # what ``served`` answered


class Shadows:
    """Runs mirrored requests in the background and records their comparisons in each
    pair's ``ShadowStats`` and in ``metrics``. Event-loop only."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self._metrics = metrics
        self._tasks: set[asyncio.Task[None]] = set()

    def mirror(self, job: Mirror) -> None:
        """Send ``job`` to its shadow variant in the background, after the reply."""
        task = asyncio.create_task(self._run(job), name=f"shadow-{job.model}-{job.name}")
        self._tasks.add(task)  # keep a reference until it finishes
        task.add_done_callback(self._tasks.discard)

    async def _run(self, job: Mirror) -> None:
        """Run one mirrored request and compare; never raises (no caller is waiting)."""
        m = self._metrics
        model, served, name = job.model, job.served, job.name
        target, stats, inflight, outputs = job.target, job.stats, job.inflight, job.outputs
        labels = (model, served, name)
        scheduler = target.scheduler if target is not None else None
        if (
            target is None
            or scheduler is None
            or not target.ready
            or inflight.get(name, 0) >= job.limit
        ):
            stats.dropped += 1
            if m is not None:
                m.shadow_requests.labels(*labels, "dropped").inc()
            return
        inflight[name] = inflight.get(name, 0) + 1
        try:
            result = await scheduler.submit(job.inputs, job.wanted, None, Timings())
            if sum(a.size for a in outputs.values()) > SHADOW_INLINE_ELEMENTS:
                divergence = await asyncio.to_thread(compare_outputs, outputs, result)
            else:
                divergence = compare_outputs(outputs, result)
        except (Overloaded, Unavailable):
            stats.dropped += 1
            if m is not None:
                m.shadow_requests.labels(*labels, "dropped").inc()
            return
        except Exception as e:
            stats.failed += 1
            if m is not None:
                m.shadow_requests.labels(*labels, "failed").inc()
            log.debug("shadow %s/%s failed: %s", model, name, e)
            return
        finally:
            inflight[name] -= 1
        diff = divergence.max_abs_diff
        stats.compared += 1
        stats.window_worst_abs_diff = max(stats.window_worst_abs_diff, diff)
        stats.argmax_rows += divergence.argmax_rows
        stats.argmax_agree += divergence.argmax_agree
        if m is not None:
            m.shadow_requests.labels(*labels, "compared").inc()
            m.shadow_max_abs_diff.labels(*labels).observe(diff)
            if divergence.argmax_rows:
                m.shadow_argmax_agreement.labels(*labels, "true").inc(divergence.argmax_agree)
                m.shadow_argmax_agreement.labels(*labels, "false").inc(
                    divergence.argmax_rows - divergence.argmax_agree
                )
        if diff > stats.worst_abs_diff:
            stats.worst_abs_diff = diff
            # Logged only when a pair's worst case grows, so the log stays short.
            log.log(
                logging.WARNING if diff > SHADOW_LOG_ABOVE else logging.DEBUG,
                "shadow %s/%s differs from %s by up to %.3g (output '%s', arg-max agrees on "
                "%d of %d rows): the largest difference of this pair so far",
                model,
                name,
                served,
                diff,
                divergence.output,
                divergence.argmax_agree,
                divergence.argmax_rows,
            )


# --- shadow comparison -----------------------------------------------------------------


@dataclass(frozen=True)
class Divergence:
    """How far a shadow's outputs are from the served ones."""

    max_abs_diff: float  # over every element of every output; inf: shapes or values differ
    output: str  # the output where it was largest
    argmax_rows: int  # rows of 2-D outputs compared by arg-max
    argmax_agree: int  # ...of which the arg-max was the same


def compare_outputs(
    served: Mapping[str, np.ndarray], shadow: Mapping[str, np.ndarray]
) -> Divergence:
    """Compare each output in ``served`` with the same output of ``shadow``.

    Numbers are compared as float64 (NaN in both places counts as equal, in one as an
    infinite difference); BYTES outputs are equal or infinitely different. For 2-D numeric
    outputs with more than one column, each row's arg-max is compared as well.
    """
    worst, worst_name = -1.0, ""
    rows = agree = 0
    for name, a in served.items():
        b = shadow.get(name)
        if b is None or a.shape != b.shape:
            diff = math.inf
        elif a.dtype == object or b.dtype == object:
            diff = 0.0 if np.array_equal(a, b) else math.inf
        else:
            x, y = a.astype(np.float64), b.astype(np.float64)
            delta = np.abs(x - y)
            delta[np.isnan(x) & np.isnan(y)] = 0.0
            delta[np.isnan(delta)] = math.inf
            diff = float(delta.max()) if delta.size else 0.0
            if x.ndim == 2 and x.shape[1] > 1:
                rows += x.shape[0]
                agree += int(np.count_nonzero(np.argmax(x, axis=1) == np.argmax(y, axis=1)))
        if diff > worst:
            worst, worst_name = diff, name
    return Divergence(max(worst, 0.0), worst_name, rows, agree)
