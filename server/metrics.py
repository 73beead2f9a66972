"""Prometheus metrics, created on a registry passed in (never module globals).

Label sets are bounded: ``model`` is a model the repository knows (``_unknown`` otherwise),
``variant`` and ``backend`` come from the repository, ``code`` is a gRPC status name.
Histograms are in seconds, with buckets from 50 us to 10 s, so they can be aggregated
across replicas (``sum by (le)``) - which Triton's summaries cannot.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.metrics_core import Metric

from .scheduler import Timings
from .statistics import Statistics

LATENCY_BUCKETS = (
    5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2,
    2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Largest absolute difference between a shadow's outputs and the served ones: 0 (bit-equal),
# float32 rounding between frameworks (~1e-6), up to outright different models.
DIFF_BUCKETS = (0.0, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0)
UNKNOWN_MODEL = "_unknown"

_VARIANT = ("model", "variant", "backend")


class _BeforeCollect:
    """A collector with no metrics of its own: runs ``callback`` when a registry is
    collected (a /metrics scrape), before the collectors registered after it."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.callback: Callable[[], None] | None = None
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        if self.callback is not None:
            self.callback()
        return iter(())


class Metrics:
    """Every metric the gateway exports. One instance per server, on its own registry.

    Under ``serve --workers N`` each worker process creates its own ``Metrics`` with
    ``PROMETHEUS_MULTIPROC_DIR`` set (prometheus-client's multiprocess mode): values go to
    files that the supervisor sums (counters, histograms) or combines per gauge by its
    ``multiprocess_mode``. A single-process server ignores those modes.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # No `*_created` series: they double the exposition and no dashboard uses them.
        disable_created_metrics()
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        # First in the registry, so collected first: brings the metrics up to date.
        self.before_collect = _BeforeCollect(r)
        # CPU seconds, resident memory, open fds, and the Python version, as
        # prometheus-client provides them (process_*, python_info).
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)

        def hist(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, _VARIANT, buckets=LATENCY_BUCKETS, registry=r)

        self.request_duration = hist(
            "tensorgate_request_duration_seconds",
            "End-to-end ModelInfer time at the gateway, from receipt to reply encoded.",
        )
        self.queue_duration = hist(
            "tensorgate_queue_duration_seconds",
            "Time a request waited in its variant's queue before compute.",
        )
        self.compute_duration = hist(
            "tensorgate_compute_duration_seconds", "Backend (framework) compute time."
        )
        self.decode_duration = hist(
            "tensorgate_decode_duration_seconds", "Time to decode a request's input tensors."
        )
        self.encode_duration = hist(
            "tensorgate_encode_duration_seconds", "Time to encode a reply's output tensors."
        )
        self.batch_size = Histogram(
            "tensorgate_batch_size",
            "Rows per backend execution.",
            _VARIANT,
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "tensorgate_requests",
            "ModelInfer requests by final gRPC status code.",
            (*_VARIANT, "code"),
            registry=r,
        )
        self.inferences = Counter(
            "tensorgate_inferences",
            "Inferences (batch rows) computed successfully.",
            _VARIANT,
            registry=r,
        )
        self.inflight = Gauge(
            "tensorgate_inflight_requests",
            "ModelInfer requests being handled now.",
            ("model",),
            registry=r,
            multiprocess_mode="livesum",
        )
        self.queued = Gauge(
            "tensorgate_queued_requests",
            "Requests waiting in a variant's queue.",
            _VARIANT,
            registry=r,
            multiprocess_mode="livesum",
        )
        self.model_ready = Gauge(
            "tensorgate_model_ready",
            "1 when the variant is loaded and serving.",
            _VARIANT,
            registry=r,
            multiprocess_mode="livemin",  # with --workers: 1 only when every worker serves it
        )
        # Routing (server/router.py). Labels are variant names of a loaded model; reason is
        # one of error, unavailable, not_ready, overloaded, circuit_open, timeout.
        self.fallbacks = Counter(
            "tensorgate_fallbacks",
            "Requests passed from one variant to the next: the first failed or was skipped.",
            ("model", "from", "to", "reason"),
            registry=r,
        )
        self.circuit_state = Gauge(
            "tensorgate_circuit_state",
            "A variant's circuit breaker: 0 closed, 1 open, 2 half-open (probing).",
            _VARIANT,
            registry=r,
            multiprocess_mode="livemax",  # with --workers: the worst worker's state
        )
        _SHADOW = ("model", "primary", "shadow")
        self.shadow_requests = Counter(
            "tensorgate_shadow_requests",
            "Requests mirrored to a shadow variant, by outcome: compared, failed, dropped "
            "(queue full or variant not ready).",
            (*_SHADOW, "outcome"),
            registry=r,
        )
        self.shadow_max_abs_diff = Histogram(
            "tensorgate_shadow_max_abs_diff",
            "Per mirrored request, the largest absolute difference between the shadow's "
            "outputs and those of the variant that served (primary).",
            _SHADOW,
            buckets=DIFF_BUCKETS,
            registry=r,
        )
        self.shadow_argmax_agreement = Counter(
            "tensorgate_shadow_argmax_agreement",
            "Rows of 2-D outputs whose arg-max the shadow and the primary agree on "
            "(agree=true) or not (agree=false).",
            (*_SHADOW, "agree"),
            registry=r,
        )
        # Rollouts (server/rollout.py): set by every worker that follows one.
        self.rollout_weight = Gauge(
            "tensorgate_rollout_weight",
            "Percent of a model's unpinned requests a variant gets from the running rollout "
            "(the candidate and the variant it replaces); 100 for the promoted candidate.",
            ("model", "variant"),
            registry=r,
            multiprocess_mode="livemax",
        )
        self.rollout_state = Gauge(
            "tensorgate_rollout_state",
            "1 for a model's rollout's state (shadow, step, promoted, rolled_back), 0 for the "
            "others.",
            ("model", "state"),
            registry=r,
            multiprocess_mode="livemax",
        )


@dataclass(slots=True)
class Trace:
    """What one request went through, filled in as it moves along the pipeline."""

    start: float
    model: str
    variant: str = ""
    backend: str = ""
    rows: int = 1
    decode: float = 0.0
    encode: float = 0.0
    end: float = 0.0
    timings: Timings = field(default_factory=Timings)
    # (from variant, to variant, reason) for each hand-over to a fallback variant.
    fallbacks: list[tuple[str, str, str]] = field(default_factory=list)
    _encode_start: float = 0.0

    def decoded(self) -> None:
        """The request is decoded: the time so far was decode."""
        self.decode = time.perf_counter() - self.start

    def encoding(self) -> None:
        """The reply's encoding starts now."""
        self._encode_start = time.perf_counter()

    def finished(self) -> None:
        """The reply is encoded: the call ends now."""
        self.end = time.perf_counter()
        self.encode = self.end - self._encode_start if self._encode_start else 0.0

    @property
    def labels(self) -> tuple[str, str, str]:
        return (self.model, self.variant, self.backend)


class _VariantSeries:
    """The labelled children that successful requests update, looked up once per
    ``(model, variant, backend)``: ``labels()`` costs a lock and a tuple per call."""

    __slots__ = ("compute", "decode", "encode", "inferences", "ok", "queue", "rows", "total")

    def __init__(self, m: Metrics, labels: tuple[str, str, str]) -> None:
        self.ok = m.requests.labels(*labels, "OK")
        self.total = m.request_duration.labels(*labels)
        self.decode = m.decode_duration.labels(*labels)
        self.encode = m.encode_duration.labels(*labels)
        self.queue = m.queue_duration.labels(*labels)
        self.compute = m.compute_duration.labels(*labels)
        self.inferences = m.inferences.labels(*labels)
        self.rows = m.batch_size.labels(*labels)


def observe_many(histogram: Histogram, values: np.ndarray) -> None:
    """``histogram.observe(v)`` for every value, in one pass: each bucket and the sum are
    incremented once. prometheus-client (pinned) has no public call for this; it keeps a
    labelled histogram as ``_sum`` and one non-cumulative value per upper bound in
    ``_buckets`` (``observe`` increments the first bucket whose bound holds the value),
    which is what this does. tests/test_metrics.py checks it against ``observe``."""
    bounds = histogram._upper_bounds  # type: ignore[attr-defined]
    counts = np.bincount(np.searchsorted(bounds, values, side="left"), minlength=len(bounds))
    buckets = histogram._buckets  # type: ignore[attr-defined]
    for i in np.flatnonzero(counts):
        buckets[i].inc(int(counts[i]))
    histogram._sum.inc(float(values.sum()))  # type: ignore[attr-defined]


def latency_counts(metrics: Metrics, model: str, variant: str, backend: str) -> list[float]:
    """The ``tensorgate_request_duration_seconds`` bucket counts of one variant in this
    process, one per bound of ``LATENCY_BUCKETS`` and +Inf, not cumulative (the layout
    ``observe_many`` writes)."""
    child = metrics.request_duration.labels(model, variant, backend)
    return [b.get() for b in child._buckets]  # type: ignore[attr-defined]


#: How long a request's measurements may wait before they reach the metrics and
#: statistics (see ``Telemetry``).
FLUSH_INTERVAL_S = 0.05


class Telemetry:
    """Feeds requests' measurements to both the Prometheus metrics and the Triton-style
    statistics, so the two always agree.

    A finished request costs one append here; its measurements reach the histograms,
    counters and statistics in a batch, at most ``FLUSH_INTERVAL_S`` later, when someone
    reads them (a /metrics scrape, a ModelStatistics call: ``flush``) or when a server
    stops. Updating nine labelled series per request took ~14 us of a small model's
    ~62 us in-process path (docs/benchmarks.md). Everything here runs on the event loop
    thread; a scrape's thread asks the loop to flush (``flush_from_thread``).
    """

    def __init__(self, metrics: Metrics, statistics: Statistics) -> None:
        self.metrics = metrics
        self.statistics = statistics
        self._series: dict[tuple[str, str, str], _VariantSeries] = {}
        self._done: list[Trace] = []
        # In-flight requests per model, as counted now and as last set on the gauge.
        self.inflight: dict[str, int] = defaultdict(int)
        self._inflight_shown: dict[str, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        metrics.before_collect.callback = self.flush_from_thread

    def succeeded(self, t: Trace) -> None:
        """Count a successful request (after ``left``, which arms the flush)."""
        self._done.append(t)

    def entered(self, model: str) -> None:
        self.inflight[model] += 1
        if self._timer is None:
            self._arm()

    def left(self, model: str) -> None:
        self.inflight[model] -= 1
        if self._timer is None:
            self._arm()

    def failed(self, t: Trace, code: str) -> None:
        self._fallbacks(t)
        self.metrics.requests.labels(*t.labels, code).inc()
        if t.variant:
            self.statistics.failure(t.model, t.variant, time.perf_counter() - t.start)

    def _arm(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a caller outside the server): no batching
            self.flush()
            return
        self._loop = loop
        self._timer = loop.call_later(FLUSH_INTERVAL_S, self.flush)

    def flush(self) -> None:
        """Apply every measurement not yet in the metrics and statistics. Event loop
        thread only (or a process without a running loop)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        done, self._done = self._done, []
        by_series: dict[tuple[str, str, str], list[Trace]] = {}
        for t in done:
            if t.fallbacks:
                self._fallbacks(t)
            by_series.setdefault(t.labels, []).append(t)
        for labels, traces in by_series.items():
            self._apply(labels, traces)
        for model, count in self.inflight.items():
            if self._inflight_shown.get(model) != count:
                self.metrics.inflight.labels(model).set(count)
                self._inflight_shown[model] = count

    def flush_from_thread(self, timeout: float = 1.0) -> None:
        """``flush`` on the event loop, from another thread (the /metrics server's);
        waits at most ``timeout`` seconds for it, then lets the scrape go on. On the loop's
        own thread it flushes at once."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self.flush()
            return
        done = threading.Event()

        def run() -> None:
            try:
                self.flush()
            finally:
                done.set()

        try:
            loop.call_soon_threadsafe(run)
        except RuntimeError:  # the loop closed meanwhile
            return
        done.wait(timeout)

    def _apply(self, labels: tuple[str, str, str], traces: list[Trace]) -> None:
        series = self._series.get(labels)
        if series is None:
            series = self._series[labels] = _VariantSeries(self.metrics, labels)
        columns = np.array(
            [
                (t.end - t.start, t.decode, t.encode, t.timings.queue, t.timings.compute)
                for t in traces
            ],
            dtype=np.float64,
        ).reshape(-1, 5)
        total, decode, encode, queue, compute = columns.T
        series.ok.inc(len(traces))
        observe_many(series.total, total)
        observe_many(series.decode, decode)
        observe_many(series.encode, encode)
        observe_many(series.queue, queue)
        observe_many(series.compute, compute)
        rows = sum(t.rows for t in traces)
        series.inferences.inc(rows)
        # One entry per backend execution (a batch): set on exactly one of its requests.
        executions = [
            (t.timings.execution_rows, t.decode, t.timings.compute, t.encode)
            for t in traces
            if t.timings.execution_rows
        ]
        if executions:
            observe_many(series.rows, np.array([e[0] for e in executions], np.float64))
        model, variant, _ = labels
        self.statistics.success_many(
            model,
            variant,
            total=float(total.sum()),
            queue=float(queue.sum()),
            decode=float(decode.sum()),
            compute=float(compute.sum()),
            encode=float(encode.sum()),
            count=len(traces),
            rows=rows,
            executions=executions,
        )

    def _fallbacks(self, t: Trace) -> None:
        for source, target, reason in t.fallbacks:
            self.metrics.fallbacks.labels(t.model, source, target, reason).inc()
