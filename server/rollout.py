"""What a rollout is and how it judges: its settings, the numbers of one window, the gates,
and the routing of each phase. Pure, so that every rule is unit-tested without a server;
``rollouts.py`` runs rollouts inside the server with these.

A rollout moves a model's unpinned traffic from one variant (``from``) to a candidate
(``to``) in phases: **shadow** (the candidate gets mirrored requests only), then each
**step** (the candidate's weight is the step's percentage, ``from`` has the rest), then
**promoted**. A phase ends once it has lasted its seconds and gathered ``min_requests``
(comparisons in the shadow phase, requests answered by the candidate in a step). The
gates are judged over the current phase's window on every tick; the first breach ends
the rollout as **rolled_back** (see ``docs/rollouts.md``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from itertools import pairwise
from types import MappingProxyType

from pydantic import BaseModel, ConfigDict

from tensorgate.errors import InvalidInput

from .metrics import LATENCY_BUCKETS
from .policy import RoutePolicy, ShadowPolicy

DEFAULT_STEPS = (5.0, 25.0, 50.0, 100.0)
#: Fractions (arg-max agreement, p99 ratio, error rate) are judged once their window holds
#: this many requests (or ``min_requests``, when that is smaller): a handful of requests
#: says nothing about a p99. The largest difference is judged from the first comparison.
JUDGE_AFTER = 100

SHADOW, STEP, PROMOTED, ROLLED_BACK = "shadow", "step", "promoted", "rolled_back"
STATES = (SHADOW, STEP, PROMOTED, ROLLED_BACK)
RUNNING = (SHADOW, STEP)


class Settings(BaseModel):
    """A rollout's settings (``tensorgate rollout start``'s options)."""

    model_config = ConfigDict(frozen=True)

    steps: tuple[float, ...] = DEFAULT_STEPS
    step_seconds: float = 60.0
    min_requests: int = 200
    shadow_fraction: float = 1.0
    shadow_seconds: float = 60.0
    max_abs_diff: float = 1e-4
    min_argmax_agreement: float | None = None
    max_p99_ratio: float = 1.25
    max_error_rate: float = 0.001

    def check(self) -> Settings:
        """Raise InvalidInput naming the setting and the fix; return self when all hold."""
        steps = list(self.steps)
        if not steps:
            raise InvalidInput("steps: give at least one, e.g. 5,25,50,100 (percent)")
        if any(not (1 <= s <= 100) for s in steps) or any(b <= a for a, b in pairwise(steps)):
            raise InvalidInput(
                f"steps {','.join(f'{s:g}' for s in steps)}: each is the candidate's weight in "
                "percent, from 1 to 100, each larger than the one before, e.g. 5,25,50,100"
            )

        def at_least(name: str, value: float, low: float, hint: str) -> None:
            if not (math.isfinite(value) and value >= low):
                raise InvalidInput(f"{name} {value:g}: use {hint}")

        at_least("step_seconds", self.step_seconds, 0.0, "a number of seconds >= 0")
        at_least("shadow_seconds", self.shadow_seconds, 0.0, "a number of seconds >= 0")
        at_least("min_requests", self.min_requests, 1, "a count >= 1")
        at_least("max_abs_diff", self.max_abs_diff, 0.0, "a difference >= 0")
        at_least("max_p99_ratio", self.max_p99_ratio, 1e-9, "a ratio > 0, e.g. 1.25")
        fractions = {
            "shadow_fraction": self.shadow_fraction,
            "max_error_rate": self.max_error_rate,
            "min_argmax_agreement": self.min_argmax_agreement,
        }
        for name, value in fractions.items():
            if value is not None and not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise InvalidInput(f"{name} {value:g}: use a fraction from 0 to 1")
        if self.shadow_fraction <= 0:
            raise InvalidInput(
                "shadow_fraction 0: the candidate's outputs must be compared; use a fraction "
                "above 0 (1.0 mirrors every request)"
            )
        return self

    @property
    def judge_after(self) -> int:
        return min(JUDGE_AFTER, self.min_requests)


# --- the numbers of one window --------------------------------------------------------


class VariantWindow(BaseModel):
    requests: int = 0  # answered
    errors: int = 0  # failed attempts
    # tensorgate_request_duration_seconds bucket counts (not cumulative; +Inf last).
    buckets: list[float] = []

    def plus(self, other: VariantWindow) -> VariantWindow:
        n = max(len(self.buckets), len(other.buckets))
        a, b = self.buckets or [0.0] * n, other.buckets or [0.0] * n
        return VariantWindow(
            requests=self.requests + other.requests,
            errors=self.errors + other.errors,
            buckets=[x + y for x, y in zip(a, b, strict=True)],
        )


class Window(BaseModel):
    """What a phase saw so far, in one process or summed over every worker."""

    variants: dict[str, VariantWindow] = {}
    compared: int = 0  # shadow comparisons between the candidate and another variant
    mirror_errors: int = 0  # requests mirrored to the candidate that failed there
    max_abs_diff: float = 0.0
    argmax_rows: int = 0
    argmax_agree: int = 0
    workers: int = 1

    def plus(self, other: Window) -> Window:
        names = dict.fromkeys([*self.variants, *other.variants])
        empty = VariantWindow()
        return Window(
            variants={
                n: self.variants.get(n, empty).plus(other.variants.get(n, empty)) for n in names
            },
            compared=self.compared + other.compared,
            mirror_errors=self.mirror_errors + other.mirror_errors,
            max_abs_diff=max(self.max_abs_diff, other.max_abs_diff),
            argmax_rows=self.argmax_rows + other.argmax_rows,
            argmax_agree=self.argmax_agree + other.argmax_agree,
            workers=self.workers + other.workers,
        )

    def of(self, variant: str) -> VariantWindow:
        return self.variants.get(variant, VariantWindow())


def quantile(
    q: float, buckets: Sequence[float], bounds: Sequence[float] = LATENCY_BUCKETS
) -> float:
    """The ``q`` quantile of a histogram, as Prometheus's ``histogram_quantile`` estimates
    it: linear within the bucket that holds it; the largest finite bound when it falls in
    +Inf. 0 for an empty histogram."""
    total = sum(buckets)
    if total <= 0:
        return 0.0
    rank, seen = q * total, 0.0
    for i, count in enumerate(buckets):
        if count and seen + count >= rank:
            if i >= len(bounds):
                return float(bounds[-1])
            low = bounds[i - 1] if i > 0 else 0.0
            return low + (bounds[i] - low) * (rank - seen) / count
        seen += count
    return float(bounds[-1])


# --- the gates ------------------------------------------------------------------------


class Gate(BaseModel):
    name: str
    limit: float
    judged: bool = False  # enough numbers in the window to judge
    value: float = 0.0
    ok: bool = True


def judge(
    settings: Settings,
    window: Window,
    candidate: str,
    source: str,
) -> list[Gate]:
    """The gates over ``window``. The p99 ratio needs both variants' requests in the same
    window, so the shadow phase and a step of 100 % (``source`` gets none) do not judge it."""
    n = settings.judge_after
    gates = [
        Gate(
            name="max_abs_diff",
            limit=settings.max_abs_diff,
            judged=window.compared > 0,
            value=window.max_abs_diff,
            ok=window.max_abs_diff <= settings.max_abs_diff,
        )
    ]
    if settings.min_argmax_agreement is not None:
        agreement = window.argmax_agree / window.argmax_rows if window.argmax_rows else 1.0
        gates.append(
            Gate(
                name="min_argmax_agreement",
                limit=settings.min_argmax_agreement,
                judged=window.argmax_rows >= n,
                value=agreement,
                ok=agreement >= settings.min_argmax_agreement,
            )
        )
    cand, src = window.of(candidate), window.of(source)
    src_p99 = quantile(0.99, src.buckets)
    ratio = quantile(0.99, cand.buckets) / src_p99 if src_p99 else 0.0
    gates.append(
        Gate(
            name="max_p99_ratio",
            limit=settings.max_p99_ratio,
            judged=cand.requests >= n and src.requests >= n and src_p99 > 0,
            value=ratio,
            ok=ratio <= settings.max_p99_ratio,
        )
    )
    errors = cand.errors + window.mirror_errors
    attempts = cand.requests + cand.errors + window.compared + window.mirror_errors
    rate = errors / attempts if attempts else 0.0
    gates.append(
        Gate(
            name="max_error_rate",
            limit=settings.max_error_rate,
            judged=attempts >= n,
            value=rate,
            ok=rate <= settings.max_error_rate,
        )
    )
    return gates


def breach(gates: Sequence[Gate]) -> Gate | None:
    """The first judged gate that does not hold."""
    return next((g for g in gates if g.judged and not g.ok), None)


def phase_done(
    settings: Settings, state: str, elapsed: float, window: Window, candidate: str
) -> bool:
    if state == SHADOW:
        return elapsed >= settings.shadow_seconds and window.compared >= settings.min_requests
    return (
        elapsed >= settings.step_seconds and window.of(candidate).requests >= settings.min_requests
    )


# --- the routing of each phase ---------------------------------------------------------


def phase_policy(
    base: RoutePolicy, state: str, weight: float, source: str, candidate: str, fraction: float
) -> RoutePolicy:
    """The routing while a rollout is in ``state`` at ``weight`` percent, built on the one
    before it (``base``: its sticky key, fallbacks and breaker settings stay).

    The shadow phase keeps the split as it was and mirrors to the candidate; a step splits
    unpinned requests ``source``/``candidate`` and mirrors each to the other, so that the
    comparison runs through every step. The rollout's shadow replaces the model's own."""
    if state == SHADOW:
        return replace(base, shadow=ShadowPolicy((candidate,), fraction))
    weights = {source: 100.0 - weight, candidate: weight}
    return replace(
        base,
        weights=MappingProxyType(weights),
        shadow=ShadowPolicy((candidate, source), fraction),
    )


def promoted_policy(base: RoutePolicy) -> RoutePolicy:
    """The routing once the candidate is the default variant: ``base`` without weights."""
    return replace(base, weights=MappingProxyType({}))


def share(policy: RoutePolicy, variant: str, default: str | None) -> float:
    """The percent of unpinned requests ``variant`` gets under ``policy``."""
    if policy.weighted:
        return 100.0 * policy.share(variant)
    return 100.0 if variant == default else 0.0


def serving_now(
    policy: RoutePolicy, default: str | None, order: Mapping[str, object]
) -> str | None:
    """The variant an unpinned request goes to now: the largest weight (the first in the
    model's order on a tie), else the default variant."""
    if policy.weighted:
        return max(order, key=lambda v: policy.weights.get(v, 0.0))
    return default


# --- what GetRollout answers --------------------------------------------------------


class VariantStatus(BaseModel):
    name: str
    weight: float = 0.0
    requests: int = 0
    errors: int = 0
    p99_ms: float = 0.0


class Status(BaseModel):
    """What GetRollout answers (the fields of ``admin.proto``'s ``Rollout``)."""

    model: str
    id: str
    to_variant: str
    from_variant: str
    state: str
    step: int = 0
    weight: float = 0.0
    started: float = 0.0  # wall clock, for every worker
    phase_started: float = 0.0
    variants: list[VariantStatus] = []
    compared: int = 0
    max_abs_diff: float = 0.0
    argmax_agreement: float = 1.0
    gates: list[Gate] = []
    reason: str = ""
    message: str = ""
    settings: Settings
    workers: int = 1
