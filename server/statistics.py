"""Triton-shaped per-variant statistics for the ModelStatistics RPC.

Fed by the same measurements as the Prometheus histograms (see ``Telemetry``), so the two
views agree. Cumulative counts and nanoseconds, as Triton reports them; kept across
reloads of a model, since clients such as perf_analyzer compute deltas between reads.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from tensorgate.protos import grpc_service_pb2 as pb


@dataclass
class _Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += int(seconds * 1e9)

    def proto(self) -> pb.StatisticDuration:
        return pb.StatisticDuration(count=self.count, ns=self.ns)


@dataclass
class _Batch:
    compute_input: _Duration = field(default_factory=_Duration)
    compute_infer: _Duration = field(default_factory=_Duration)
    compute_output: _Duration = field(default_factory=_Duration)


@dataclass
class VariantStatistics:
    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success: _Duration = field(default_factory=_Duration)
    fail: _Duration = field(default_factory=_Duration)
    queue: _Duration = field(default_factory=_Duration)
    compute_input: _Duration = field(default_factory=_Duration)
    compute_infer: _Duration = field(default_factory=_Duration)
    compute_output: _Duration = field(default_factory=_Duration)
    batches: dict[int, _Batch] = field(default_factory=lambda: defaultdict(_Batch))


#: ModelStatistics version under which named (non-integer) variants are reported together.
#: Triton clients parse versions as integers (perf_analyzer calls std::stoll on them), and
#: Triton's versions start at 1, so 0 collides with no version of a Triton-style repository;
#: a variant directory named "0" is possible here, though (``named_variants_version``).
NAMED_VARIANTS_VERSION = "0"


def named_variants_version(taken: Iterable[str]) -> str:
    """The version the named variants are summed under: ``NAMED_VARIANTS_VERSION``, or when
    a variant directory (or an alias) already answers to it, the smallest integer above it
    that none does, so that neither entry hides the other."""
    used = set(taken)
    version = int(NAMED_VARIANTS_VERSION)
    while str(version) in used:
        version += 1
    return str(version)


def _summed(parts: list[VariantStatistics]) -> VariantStatistics:
    total = VariantStatistics()
    for p in parts:
        total.last_inference_ms = max(total.last_inference_ms, p.last_inference_ms)
        total.inference_count += p.inference_count
        total.execution_count += p.execution_count
        for name in ("success", "fail", "queue", "compute_input", "compute_infer",
                     "compute_output"):  # fmt: skip
            getattr(total, name).count += getattr(p, name).count
            getattr(total, name).ns += getattr(p, name).ns
        for size, b in p.batches.items():
            t = total.batches[size]
            for name in ("compute_input", "compute_infer", "compute_output"):
                getattr(t, name).count += getattr(b, name).count
                getattr(t, name).ns += getattr(b, name).ns
    return total


class Statistics:
    """All variants' statistics; only touched from the event loop thread."""

    def __init__(self) -> None:
        self._variants: dict[tuple[str, str], VariantStatistics] = defaultdict(VariantStatistics)

    def success_many(
        self,
        model: str,
        variant: str,
        *,
        total: float,
        queue: float,
        decode: float,
        compute: float,
        encode: float,
        count: int,
        rows: int,
        executions: list[tuple[int, float, float, float]],
    ) -> None:
        """``count`` successful requests of ``rows`` inference rows in all, with the sums of
        their durations (seconds). ``executions`` has one ``(rows, decode, compute,
        encode)`` per backend execution (a batch) among them, counted once."""
        s = self._variants[(model, variant)]
        s.last_inference_ms = int(time.time() * 1000)
        s.inference_count += rows
        s.success.add(total, count)
        s.queue.add(queue, count)
        s.compute_input.add(decode, count)
        s.compute_infer.add(compute, count)
        s.compute_output.add(encode, count)
        s.execution_count += len(executions)
        for size, b_decode, b_compute, b_encode in executions:
            b = s.batches[size]
            b.compute_input.add(b_decode)
            b.compute_infer.add(b_compute)
            b.compute_output.add(b_encode)

    def failure(self, model: str, variant: str, total: float) -> None:
        self._variants[(model, variant)].fail.add(total)

    def get(self, model: str, variants: Iterable[str]) -> VariantStatistics:
        """The statistics of ``variants`` of ``model``, summed; zeros for unused ones."""
        found = [self._variants[(model, v)] for v in variants if (model, v) in self._variants]
        return found[0] if len(found) == 1 else _summed(found)

    def report(self, models: dict[str, dict[str, tuple[str, ...]]]) -> pb.ModelStatisticsResponse:
        """Statistics for ``{model: {version: (variant, ...)}}``: each version reports the
        sum of its variants (one, or the named variants under ``NAMED_VARIANTS_VERSION``)."""
        out = pb.ModelStatisticsResponse()
        for model, versions in models.items():
            for version, variants in versions.items():
                s = self.get(model, variants)
                out.model_stats.append(
                    pb.ModelStatistics(
                        name=model,
                        version=version,
                        last_inference=s.last_inference_ms,
                        inference_count=s.inference_count,
                        execution_count=s.execution_count,
                        inference_stats=pb.InferStatistics(
                            success=s.success.proto(),
                            fail=s.fail.proto(),
                            queue=s.queue.proto(),
                            compute_input=s.compute_input.proto(),
                            compute_infer=s.compute_infer.proto(),
                            compute_output=s.compute_output.proto(),
                        ),
                        batch_stats=[
                            pb.InferBatchStatistics(
                                batch_size=size,
                                compute_input=b.compute_input.proto(),
                                compute_infer=b.compute_infer.proto(),
                                compute_output=b.compute_output.proto(),
                            )
                            for size, b in sorted(s.batches.items())
                        ],
                    )
                )
        return out
