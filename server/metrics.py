"""Prometheus metrics, created on a registry passed in (never module globals).

Label sets are bounded: ``model`` is a model the repository knows (``_unknown`` otherwise),
``variant`` and ``backend`` come from the repository, ``code`` is a gRPC status name.
Histograms are in seconds, with buckets from 50 us to 10 s, so they can be aggregated
across replicas (``sum by (le)``) - which Triton's summaries cannot.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)

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


@dataclass
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
    """The labelled children one successful request updates, looked up once per
    ``(model, variant, backend)``: ``labels()`` costs a lock and a tuple per call, and a
    request made eight of them (a fifth of the pipeline's CPU for a small model)."""

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


class Telemetry:
    """Feeds one request's measurements to both the Prometheus metrics and the
    Triton-style statistics, so the two always agree."""

    def __init__(self, metrics: Metrics, statistics: Statistics) -> None:
        self.metrics = metrics
        self.statistics = statistics
        # Label sets are bounded (models x variants x backends), so this cache is too.
        self._series: dict[tuple[str, str, str], _VariantSeries] = {}

    def succeeded(self, t: Trace) -> None:
        if t.fallbacks:
            self._fallbacks(t)
        labels = t.labels
        series = self._series.get(labels)
        if series is None:
            series = self._series[labels] = _VariantSeries(self.metrics, labels)
        total = t.end - t.start
        series.ok.inc()
        series.total.observe(total)
        series.decode.observe(t.decode)
        series.encode.observe(t.encode)
        series.queue.observe(t.timings.queue)
        series.compute.observe(t.timings.compute)
        series.inferences.inc(t.rows)
        if t.timings.execution_rows:  # this request's execution is counted once, here
            series.rows.observe(t.timings.execution_rows)
        self.statistics.success(
            t.model,
            t.variant,
            total=total,
            queue=t.timings.queue,
            decode=t.decode,
            compute=t.timings.compute,
            encode=t.encode,
            rows=t.rows,
            execution_rows=t.timings.execution_rows,
        )

    def failed(self, t: Trace, code: str) -> None:
        self._fallbacks(t)
        self.metrics.requests.labels(*t.labels, code).inc()
        if t.variant:
            self.statistics.failure(t.model, t.variant, time.perf_counter() - t.start)

    def _fallbacks(self, t: Trace) -> None:
        for source, target, reason in t.fallbacks:
            self.metrics.fallbacks.labels(t.model, source, target, reason).inc()
