"""Which variant serves a request, and where it goes when that variant fails.

A small strategy with its random source and clock injected, so that every decision can be
unit-tested without a server (``tests/test_routing.py``):

- **Pinning**: a request whose ``model_version`` names a variant goes to that variant only.
- **Weights**: otherwise, with ``[routing] weights``, each request draws a variant with those
  odds; a variant without a positive weight gets no unpinned traffic. Without weights the
  model's default variant serves (``Model.default_variant``).
- **Sticky keys**: a request carrying the ``sticky_key`` (an OIP request parameter, or a gRPC
  metadata entry of that name) is placed by weighted rendezvous hashing instead of a draw:
  each variant scores ``-weight / ln(u)``, ``u`` a uniform hash of (model, key, variant),
  and the highest score wins. The same key always reaches the same variant while the
  weights stay the same; when they change, only the keys that must move, move.
- **Fallback**: the variants to try, in order, when the chosen one fails
  (``RoutePolicy.fallbacks_for``); a ``CircuitBreaker`` per variant skips one that keeps
  failing and probes it again after a cool-down.
- **Shadow**: a fraction of requests is mirrored to other variants after the reply, and the
  outputs compared (``compare_outputs``).

``Router.infer`` owns a request's whole route: it plans it under one policy snapshot, runs
the attempts through the variants' schedulers, and mirrors it to shadows after the reply.
Run-time state (the current policy, breakers, counters) is the router's own: a
``RouteState`` per loaded model, touched only from the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import random
import re
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from types import MappingProxyType
from typing import Protocol

import numpy as np

from tensorgate.errors import (
    BackendFailed,
    DeadlineExceeded,
    ModelNotReady,
    Overloaded,
    TensorgateError,
    Unavailable,
)
from tensorgate.inference import InferenceRequest

from .config import RoutingConfig
from .metrics import Metrics
from .scheduler import Retired, Timings

log = logging.getLogger(__name__)

#: Mirrored requests in flight per shadow variant, at most (and at most half its queue).
SHADOW_MAX_INFLIGHT = 32
#: Outputs larger than this (elements) are compared off the event loop.
SHADOW_INLINE_ELEMENTS = 1 << 16
#: A shadow whose worst difference grows beyond this is logged as a warning.
SHADOW_LOG_ABOVE = 1e-4

DEFAULT_BREAKER_FAILURES = 5
DEFAULT_BREAKER_COOLDOWN_S = 10.0

# A sticky key is looked up as a gRPC metadata key, which gRPC lower-cases.
_KEY = re.compile(r"^[a-z0-9][a-z0-9_.\-]*$")


class RouteError(ValueError):
    """A routing setting that cannot be served. ``field`` is its dotted name below
    ``[routing]``; the message says what is wrong and how to fix it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


# --- the policy ----------------------------------------------------------------------


@dataclass(frozen=True)
class ShadowPolicy:
    variants: tuple[str, ...]
    fraction: float


@dataclass(frozen=True)
class RoutePolicy:
    """One model's routing settings, immutable: a change replaces the whole policy, so a
    request routed under the old one finishes under it."""

    weights: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    sticky_key: str | None = None
    shadow: ShadowPolicy | None = None
    # Either a list that every variant falls back to, in order (skipping itself), or a
    # table of per-variant chains, followed transitively. At most one is non-empty.
    fallback: tuple[str, ...] = ()
    fallback_by_variant: Mapping[str, tuple[str, ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    breaker_failures: int = DEFAULT_BREAKER_FAILURES
    breaker_cooldown_s: float = DEFAULT_BREAKER_COOLDOWN_S
    # Seconds a variant may take before the request moves on to its next fallback.
    attempt_timeout_s: float | None = None

    @property
    def weighted(self) -> bool:
        """Whether unpinned requests are split by weight (else: the default variant)."""
        return any(w > 0 for w in self.weights.values())

    def share(self, variant: str) -> float:
        """The fraction of unpinned requests ``variant`` is meant to receive."""
        total = sum(w for w in self.weights.values() if w > 0)
        return max(self.weights.get(variant, 0.0), 0.0) / total if total else 0.0

    def fallbacks_for(self, primary: str) -> tuple[str, ...]:
        """The variants to try, in order, after ``primary`` fails."""
        if self.fallback:
            return tuple(v for v in self.fallback if v != primary)
        order: list[str] = []

        def walk(variant: str) -> None:
            # Depth first: a fallback's own fallbacks come before the next sibling.
            for nxt in self.fallback_by_variant.get(variant, ()):
                if nxt != primary and nxt not in order:
                    order.append(nxt)
                    walk(nxt)

        walk(primary)
        return tuple(order)


def make_policy(
    *,
    weights: Mapping[str, float] | None = None,
    sticky_key: str | None = None,
    shadow: ShadowPolicy | None = None,
    fallback: Iterable[str] | Mapping[str, Iterable[str]] = (),
    breaker_failures: int = DEFAULT_BREAKER_FAILURES,
    breaker_cooldown_s: float = DEFAULT_BREAKER_COOLDOWN_S,
    attempt_timeout_s: float | None = None,
) -> RoutePolicy:
    """A RoutePolicy from plain values (not yet validated: see ``validate_policy``)."""
    by_variant: dict[str, tuple[str, ...]] = {}
    chain: tuple[str, ...] = ()
    if isinstance(fallback, Mapping):
        by_variant = {k: tuple(v) for k, v in fallback.items()}
    else:
        chain = tuple(fallback)
    return RoutePolicy(
        weights=MappingProxyType({k: float(v) for k, v in (weights or {}).items()}),
        sticky_key=sticky_key or None,
        shadow=shadow,
        fallback=chain,
        fallback_by_variant=MappingProxyType(by_variant),
        breaker_failures=breaker_failures,
        breaker_cooldown_s=breaker_cooldown_s,
        attempt_timeout_s=attempt_timeout_s,
    )


def policy_from_config(cfg: RoutingConfig | None) -> RoutePolicy:
    """The policy a ``[routing]`` table describes (defaults when there is none)."""
    if cfg is None:
        return RoutePolicy()
    if cfg.weights is not None and not cfg.weights:
        raise RouteError(
            "weights",
            "is empty; give each variant that should take unpinned traffic a weight, e.g. "
            "weights = { torch = 90, tf = 10 }, or remove the field to send unpinned "
            "requests to the default variant",
        )
    shadow = None
    if cfg.shadow is not None:
        shadow = ShadowPolicy(tuple(cfg.shadow.variants), cfg.shadow.fraction)
    return make_policy(
        weights=cfg.weights,
        sticky_key=cfg.sticky_key,
        shadow=shadow,
        fallback=cfg.fallback,
        breaker_failures=cfg.breaker_failures,
        breaker_cooldown_s=cfg.breaker_cooldown_s,
        attempt_timeout_s=cfg.attempt_timeout_ms / 1e3 if cfg.attempt_timeout_ms else None,
    )


def validate_policy(policy: RoutePolicy, variants: Iterable[str]) -> RoutePolicy:
    """Check ``policy`` against the model's variant names; return it unchanged.

    Used both when a model loads (errors become ConfigErrors naming config.toml) and by
    the admin API's SetRoute. Raises RouteError naming the field and the fix.
    """
    known = list(variants)
    listed = f"the model's variants are {sorted(known)}"

    def check_known(name: str, fld: str) -> None:
        if name not in known:
            raise RouteError(fld, f"unknown variant '{name}'; {listed}")

    for name, weight in policy.weights.items():
        check_known(name, "weights")
        if not math.isfinite(weight) or weight < 0:
            raise RouteError(
                f"weights.{name}",
                f"weight {weight} is not allowed; use a number >= 0 (0: no unpinned traffic)",
            )
    if policy.weights and not policy.weighted:
        raise RouteError(
            "weights",
            "every weight is 0, so no variant would take unpinned requests; give at least one "
            "variant a positive weight, or remove the weights to use the default variant",
        )
    if policy.sticky_key is not None and (
        not _KEY.match(policy.sticky_key) or policy.sticky_key.startswith("grpc-")
    ):
        raise RouteError(
            "sticky_key",
            f"'{policy.sticky_key}' cannot be a gRPC metadata key; use lower-case letters, "
            "digits, '_', '-' and '.' (not starting with 'grpc-'), e.g. \"user\"",
        )
    if policy.shadow is not None:
        if not policy.shadow.variants:
            raise RouteError(
                "shadow.variants", "is empty; name the variants to mirror to, or remove shadow"
            )
        _check_unique(policy.shadow.variants, "shadow.variants")
        for name in policy.shadow.variants:
            check_known(name, "shadow.variants")
        fraction = policy.shadow.fraction
        if not (math.isfinite(fraction) and 0.0 <= fraction <= 1.0):
            raise RouteError(
                "shadow.fraction",
                f"{fraction} is not a fraction; use a number from 0 to 1 (0.1: one request "
                "in ten is mirrored)",
            )
    if policy.fallback and policy.fallback_by_variant:
        raise RouteError("fallback", "give either a list or a table of variants, not both")
    _check_unique(policy.fallback, "fallback")
    for name in policy.fallback:
        check_known(name, "fallback")
    for name, chain in policy.fallback_by_variant.items():
        check_known(name, "fallback")
        _check_unique(chain, f"fallback.{name}")
        for nxt in chain:
            check_known(nxt, f"fallback.{name}")
            if nxt == name:
                raise RouteError(
                    f"fallback.{name}",
                    f"variant '{name}' names itself; a variant cannot be its own fallback: "
                    "remove it from its list",
                )
    cycle = _find_cycle(policy.fallback_by_variant)
    if cycle:
        raise RouteError(
            "fallback",
            f"the fallbacks form a cycle ({' -> '.join(cycle)}); fallbacks are followed "
            "from one variant to the next, so break the cycle, or use a list, e.g. "
            f"fallback = {list(dict.fromkeys(cycle))}, for variants that back each other up",
        )
    if policy.breaker_failures < 1:
        raise RouteError(
            "breaker_failures",
            f"{policy.breaker_failures}: use 1 or more consecutive failures to open a circuit",
        )
    if not (math.isfinite(policy.breaker_cooldown_s) and policy.breaker_cooldown_s >= 0):
        raise RouteError(
            "breaker_cooldown_s",
            f"{policy.breaker_cooldown_s}: use a number of seconds >= 0",
        )
    return policy


def _check_unique(names: Sequence[str], fld: str) -> None:
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise RouteError(fld, f"variant(s) {twice} listed more than once; list each once")


def _find_cycle(graph: Mapping[str, Sequence[str]]) -> list[str]:
    """A cycle in ``graph`` as [a, b, ..., a], or [] when there is none."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str]:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return []
        for nxt in graph.get(node, ()):
            found = visit(nxt, [*path, node])
            if found:
                return found
        done.add(node)
        return []

    for start in sorted(graph):
        found = visit(start, [])
        if found:
            return found
    return []


# --- choosing a variant ----------------------------------------------------------------


def hash_uniform(*parts: str) -> float:
    """A uniform number in the open interval (0, 1), the same for the same parts in every
    process (unlike ``hash()``)."""
    digest = hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") + 0.5) / 2.0**64


def rendezvous_score(key: str, variant: str, weight: float, salt: str = "") -> float:
    """Weighted rendezvous score: the variant with the highest score takes the key.

    ``-ln(u)`` of a uniform ``u`` is exponential, so ``-weight / ln(u)`` wins with
    probability ``weight / sum(weights)``, and raising one weight only moves keys to that
    variant (lowering it, only away from it).
    """
    return -weight / math.log(hash_uniform(salt, key, variant))


def choose_variant(
    weights: Mapping[str, float],
    key: str | None,
    rng: random.Random,
    salt: str = "",
) -> str:
    """A variant with positive weight: by rendezvous hash of ``key`` when there is one,
    else drawn from ``rng`` with the weights as odds. Raises ValueError when no weight is
    positive."""
    candidates = sorted((v, w) for v, w in weights.items() if w > 0)
    if not candidates:
        raise ValueError("no variant has a positive weight")
    if key is not None:
        return max(candidates, key=lambda vw: (rendezvous_score(key, vw[0], vw[1], salt), vw[0]))[0]
    x = rng.random() * sum(w for _, w in candidates)
    for variant, weight in candidates:
        x -= weight
        if x < 0:
            return variant
    return candidates[-1][0]  # rounding at the top end


def routing_key(request: InferenceRequest, sticky_key: str | None) -> str | None:
    """The request's sticky key: the OIP request parameter of that name, else the gRPC
    metadata entry; None when the request carries neither (or no sticky key is set)."""
    if not sticky_key:
        return None
    value = request.parameters.get(sticky_key)
    if value is None:
        value = request.metadata.get(sticky_key)
    if value is None or value == "":
        return None
    return str(value)


# --- circuit breaker -------------------------------------------------------------------


class CircuitState(IntEnum):
    """Exported as the ``tensorgate_circuit_state`` gauge value."""

    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


class CircuitBreaker:
    """One variant's breaker: opens after ``failure_threshold`` consecutive failures, lets
    one probe through once ``cooldown`` seconds have passed (half-open), closes on the
    probe's success and opens again on its failure. Any success closes it.

    Every ``allow()`` that returned True must be followed by exactly one of ``success()``,
    ``failure()`` or ``release()`` (an outcome that says nothing about the variant's health,
    such as a full queue or a cancelled call). Event-loop only; not thread-safe.
    """

    def __init__(
        self,
        failure_threshold: int = DEFAULT_BREAKER_FAILURES,
        cooldown: float = DEFAULT_BREAKER_COOLDOWN_S,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[CircuitState], None] | None = None,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.cooldown = cooldown
        self.state = CircuitState.CLOSED
        self.consecutive_failures = 0
        self.opened_at = 0.0
        self._clock = clock
        self._on_change = on_change
        self._probing = False

    def allow(self) -> bool:
        """Whether a request may try this variant now (when there is somewhere else to go)."""
        if self.state is CircuitState.CLOSED:
            return True
        if self.state is CircuitState.OPEN:
            if self._clock() - self.opened_at < self.cooldown:
                return False
            self._set(CircuitState.HALF_OPEN)
        if self._probing:  # one probe at a time
            return False
        self._probing = True
        return True

    def success(self) -> None:
        self._probing = False
        self.consecutive_failures = 0
        self._set(CircuitState.CLOSED)

    def failure(self) -> None:
        self._probing = False
        self.consecutive_failures += 1
        if self.state is CircuitState.HALF_OPEN or (
            self.state is CircuitState.CLOSED
            and self.consecutive_failures >= self.failure_threshold
        ):
            self.opened_at = self._clock()
            self._set(CircuitState.OPEN)

    def release(self) -> None:
        self._probing = False

    def retry_in(self) -> float:
        """Seconds until an open circuit lets a probe through (0 when not open)."""
        if self.state is not CircuitState.OPEN:
            return 0.0
        return max(0.0, self.cooldown - (self._clock() - self.opened_at))

    def _set(self, state: CircuitState) -> None:
        if state is not self.state:
            self.state = state
            if self._on_change is not None:
                self._on_change(state)


# --- run-time state of one loaded model --------------------------------------------------


@dataclass
class VariantCounts:
    served: int = 0  # requests this variant answered
    as_fallback: int = 0  # ...of which after another variant failed or was skipped
    failed: int = 0  # attempts that failed on this variant


@dataclass
class ShadowStats:
    """Comparisons of one (serving variant, shadow variant) pair since the model loaded."""

    compared: int = 0
    failed: int = 0
    dropped: int = 0
    worst_abs_diff: float = 0.0
    argmax_rows: int = 0
    argmax_agree: int = 0


class RouteState:
    """The live routing of one loaded model: its policy (replaced whole by the admin API),
    a breaker and counters per variant. A reload starts a new one from config.toml."""

    def __init__(
        self,
        variants: Iterable[str],
        policy: RoutePolicy,
        clock: Callable[[], float] = time.monotonic,
        on_circuit_change: Callable[[str, CircuitState], None] | None = None,
    ) -> None:
        self.policy = policy
        self.overridden = False  # changed at run time since the model loaded
        self.breakers: dict[str, CircuitBreaker] = {}
        self.counts: dict[str, VariantCounts] = {}
        for name in variants:
            self.breakers[name] = CircuitBreaker(
                policy.breaker_failures,
                policy.breaker_cooldown_s,
                clock,
                None if on_circuit_change is None else _bind(on_circuit_change, name),
            )
            self.counts[name] = VariantCounts()
        self.shadow_stats: dict[tuple[str, str], ShadowStats] = {}
        self.shadow_inflight: dict[str, int] = {}

    def set_policy(self, policy: RoutePolicy) -> None:
        """Swap in a validated policy. Requests already routed finish under the one they
        were planned with (``Plan.policy``)."""
        self.policy = policy
        self.overridden = True
        for breaker in self.breakers.values():
            breaker.failure_threshold = policy.breaker_failures
            breaker.cooldown = policy.breaker_cooldown_s

    def shadow(self, primary: str, shadow: str) -> ShadowStats:
        return self.shadow_stats.setdefault((primary, shadow), ShadowStats())


def _bind(fn: Callable[[str, CircuitState], None], variant: str) -> Callable[[CircuitState], None]:
    return lambda state: fn(variant, state)


# --- what the router routes over ----------------------------------------------------------


class Submit(Protocol):
    """A variant's scheduler, as the router uses it (``scheduler.Scheduler``)."""

    def submit(
        self,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None,
        deadline: float | None,
        timings: Timings,
    ) -> Awaitable[dict[str, np.ndarray]]: ...


class RoutedVariant(Protocol):
    """What the router reads of one variant (``repository.Variant``)."""

    name: str
    backend_name: str
    reason: str
    scheduler: Submit | None

    @property
    def ready(self) -> bool: ...


class RoutedModel(Protocol):
    """What the router reads of one loaded model (``repository.Model``). A reload makes a
    new object, and with it new route state."""

    name: str
    policy: RoutePolicy  # from config.toml, validated at load

    @property
    def variants(self) -> Mapping[str, RoutedVariant]: ...

    @property
    def shadow_limit(self) -> int: ...

    def default_variant(self) -> RoutedVariant | None: ...

    # The variant a model_version pins (its name or integer alias); raises ModelNotFound.
    def variant(self, version: str) -> RoutedVariant: ...


class Attempts(Protocol):
    """Where the router records what a request went through (``metrics.Trace``)."""

    variant: str
    backend: str
    timings: Timings
    fallbacks: list[tuple[str, str, str]]


@dataclass(frozen=True, slots=True)
class Plan:
    """Where one request goes: ``primary`` first, then ``fallbacks`` in order, all under
    the one ``policy`` it was planned with."""

    primary: str
    fallbacks: tuple[str, ...] = ()
    pinned: bool = False
    policy: RoutePolicy = field(default_factory=RoutePolicy)

    @property
    def candidates(self) -> tuple[str, ...]:
        return (self.primary, *self.fallbacks)


class Router:
    """Routes requests: plans them, runs the plan's attempts through the variants'
    schedulers (fallback, circuit breakers, attempt timeouts), and mirrors them to shadows.

    ``rng`` and ``clock`` are injected so that tests can make every decision deterministic;
    ``on_circuit_change(model, variant, backend, state)`` is told of every breaker
    transition, and ``metrics`` receives the shadow comparisons (both exported by the
    gateway). Route state is the router's own, one ``RouteState`` per loaded model; it is
    touched only from the event loop.
    """

    def __init__(
        self,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_circuit_change: Callable[[str, str, str, CircuitState], None] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._rng = rng if rng is not None else random.Random()
        self._clock = clock
        self._on_circuit_change = on_circuit_change
        self._metrics = metrics
        # model name -> (the loaded model object, its state). A reload replaces the object,
        # so its state starts afresh from the new config.toml.
        self._states: dict[str, tuple[weakref.ref[RoutedModel], RouteState]] = {}
        self._shadow_tasks: set[asyncio.Task[None]] = set()

    def state(self, model: RoutedModel) -> RouteState:
        """The model's routing state, created from its config on first use."""
        entry = self._states.get(model.name)
        if entry is not None and entry[0]() is model:
            return entry[1]
        notify = self._on_circuit_change
        backends = {v.name: v.backend_name for v in model.variants.values()}
        name = model.name

        def changed(variant: str, state: CircuitState) -> None:
            if notify is not None:
                notify(name, variant, backends[variant], state)

        state = RouteState(list(model.variants), model.policy, self._clock, changed)
        self._states[name] = (weakref.ref(model), state)
        for variant in model.variants:
            changed(variant, CircuitState.CLOSED)
        return state

    def plan(self, model: RoutedModel, request: InferenceRequest) -> Plan:
        """Where ``request`` goes, under the model's current policy. Raises ModelNotFound
        for an unknown pinned version and ModelNotReady when the model has no weights and
        no ready variant."""
        policy = self.state(model).policy
        if request.version:
            return Plan(model.variant(request.version).name, (), pinned=True, policy=policy)
        if policy.weighted:
            key = routing_key(request, policy.sticky_key)
            primary = choose_variant(policy.weights, key, self._rng, salt=model.name)
        else:
            default = model.default_variant()
            if default is None:
                raise ModelNotReady(f"model '{model.name}' has no ready variant")
            primary = default.name
        return Plan(primary, policy.fallbacks_for(primary), policy=policy)

    def shadows(self, policy: RoutePolicy, served: str) -> tuple[str, ...]:
        """The variants to mirror a request served by ``served`` to: all of the policy's
        shadows but ``served``, for a ``fraction`` of requests (one draw per request, so the
        shadows see the same requests and can be compared with each other too)."""
        shadow = policy.shadow
        if shadow is None or shadow.fraction <= 0 or self._rng.random() >= shadow.fraction:
            return ()
        return tuple(v for v in shadow.variants if v != served)

    async def infer(
        self,
        model: RoutedModel,
        request: InferenceRequest,
        inputs: Mapping[str, np.ndarray],
        wanted: Sequence[str] | None,
        deadline: float | None,
        attempts: Attempts,
    ) -> tuple[str, dict[str, np.ndarray]]:
        """Serve validated ``inputs``: plan, try the plan's variants in order until one
        answers, then mirror to shadows. Returns (the variant that served, its outputs).

        ``attempts`` names the last variant tried and records each hand-over. Raises the
        last variant's error (its message lists what happened before), DeadlineExceeded
        when no time is left to fall back, ModelNotFound / ModelNotReady from planning, and
        ``Retired`` untouched (the model was unloaded or replaced under the request).
        Invalid input, cancellation and an expired deadline are never retried."""
        plan = self.plan(model, request)
        state = self.state(model)
        candidates = plan.candidates
        earlier: list[str] = []
        for i, name in enumerate(candidates):
            last = i == len(candidates) - 1
            variant = model.variants[name]
            attempts.variant, attempts.backend = name, variant.backend_name
            breaker = state.breakers[name]
            error: TensorgateError
            scheduler = variant.scheduler
            if not variant.ready or scheduler is None:
                reason = "not_ready"
                error = ModelNotReady(
                    f"model '{model.name}' version '{name}' is not ready: "
                    f"{variant.reason or 'not loaded'}"
                )
            elif not last and not breaker.allow():
                # An open circuit only diverts traffic when there is somewhere to go: the
                # last candidate is always tried, since a likely failure beats a certain one.
                reason = "circuit_open"
                error = Unavailable(
                    f"variant {model.name}/{name}: circuit open after "
                    f"{breaker.consecutive_failures} consecutive failures, next probe in "
                    f"{breaker.retry_in():.1f} s"
                )
            else:
                asked = not last  # allow() was called: an outcome must be reported
                if i > 0 and deadline is not None and time.monotonic() >= deadline:
                    if asked:
                        breaker.release()
                    raise DeadlineExceeded(
                        f"model '{model.name}': the deadline passed before fallback variant "
                        f"'{name}' could be tried; {'; '.join(earlier)}"
                    )
                attempt = scheduler.submit(inputs, wanted, deadline, attempts.timings)
                limit = None if last else plan.policy.attempt_timeout_s
                try:
                    outputs = await (
                        asyncio.wait_for(attempt, limit) if limit is not None else attempt
                    )
                except TimeoutError:
                    # Only our own attempt limit raises this: the caller's deadline is the
                    # scheduler's (DeadlineExceeded). Cancelling the attempt frees its queue
                    # slot, or lets its result be dropped if it is computing.
                    breaker.failure()
                    state.counts[name].failed += 1
                    reason = "timeout"
                    error = Unavailable(
                        f"variant {model.name}/{name} did not answer within the "
                        f"{limit * 1e3:g} ms attempt timeout"
                    )
                except (BackendFailed, Unavailable) as e:
                    if isinstance(e, Retired):
                        if asked:
                            breaker.release()
                        raise
                    breaker.failure()
                    state.counts[name].failed += 1
                    reason, error = ("error" if isinstance(e, BackendFailed) else "unavailable"), e
                except Overloaded as e:
                    # A full queue says nothing about the variant's health: spill over to
                    # the fallback without counting a failure.
                    if asked:
                        breaker.release()
                    reason, error = "overloaded", e
                except BaseException:
                    if asked:
                        breaker.release()
                    raise
                else:
                    breaker.success()
                    counts = state.counts[name]
                    counts.served += 1
                    counts.as_fallback += i > 0
                    shadows = self.shadows(plan.policy, name)
                    if shadows:
                        self._mirror(model, state, name, shadows, inputs, wanted, outputs)
                    return name, outputs
            if last:
                if earlier:
                    error.args = (f"{error}; before that: {'; '.join(earlier)}",)
                raise error
            attempts.fallbacks.append((name, candidates[i + 1], reason))
            earlier.append(f"{name}: {reason}: {error}")
        raise AssertionError("unreachable")

    # -- shadows -----------------------------------------------------------------------------
    def _mirror(
        self,
        model: RoutedModel,
        state: RouteState,
        served: str,
        shadows: tuple[str, ...],
        inputs: Mapping[str, np.ndarray],
        wanted: Sequence[str] | None,
        outputs: dict[str, np.ndarray],
    ) -> None:
        """Send the request to each shadow variant in the background, after the reply."""
        for name in shadows:
            task = asyncio.create_task(
                self._shadow(model, state, served, name, inputs, wanted, outputs),
                name=f"shadow-{model.name}-{name}",
            )
            self._shadow_tasks.add(task)  # keep a reference until it finishes
            task.add_done_callback(self._shadow_tasks.discard)

    async def _shadow(
        self,
        model: RoutedModel,
        state: RouteState,
        served: str,
        name: str,
        inputs: Mapping[str, np.ndarray],
        wanted: Sequence[str] | None,
        outputs: dict[str, np.ndarray],
    ) -> None:
        """Run one mirrored request and compare; never raises (no caller is waiting)."""
        stats = state.shadow(served, name)
        m = self._metrics
        labels = (model.name, served, name)
        variant = model.variants.get(name)
        # Mirrors may take at most half of the shadow's queue, so that they can never
        # crowd out the requests that variant serves itself.
        limit = max(1, min(SHADOW_MAX_INFLIGHT, model.shadow_limit))
        scheduler = variant.scheduler if variant is not None else None
        if (
            variant is None
            or scheduler is None
            or not variant.ready
            or state.shadow_inflight.get(name, 0) >= limit
        ):
            stats.dropped += 1
            if m is not None:
                m.shadow_requests.labels(*labels, "dropped").inc()
            return
        state.shadow_inflight[name] = state.shadow_inflight.get(name, 0) + 1
        try:
            result = await scheduler.submit(inputs, wanted, None, Timings())
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
            log.debug("shadow %s/%s failed: %s", model.name, name, e)
            return
        finally:
            state.shadow_inflight[name] -= 1
        diff = divergence.max_abs_diff
        stats.compared += 1
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
                model.name,
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
