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

The pieces live beside it: the settings and the pure choice in ``policy.py``, the breaker
in ``breaker.py``, mirroring and comparison in ``shadow.py``.

``Router.infer`` owns a request's whole route: it plans it under one policy snapshot, runs
the attempts through the variants' schedulers, and mirrors it to shadows after the reply.
Run-time state (the current policy, breakers, counters) is the router's own: a
``RouteState`` per loaded model, touched only from the event loop.
"""

from __future__ import annotations

import asyncio
import random
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
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

from .breaker import CircuitBreaker, CircuitState
from .metrics import Metrics
from .policy import RoutePolicy, choose_variant, routing_key
from .scheduler import Retired, Timings
from .shadow import SHADOW_MAX_INFLIGHT, Mirror, Shadows, ShadowStats, Submit

# --- run-time state of one loaded model --------------------------------------------------


@dataclass
class VariantCounts:
    served: int = 0  # requests this variant answered
    as_fallback: int = 0  # ...of which after another variant failed or was skipped
    failed: int = 0  # attempts that failed on this variant


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


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs a call per field
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
        self._shadows = Shadows(metrics)
        # model name -> (the loaded model object, its state). A reload replaces the object,
        # so its state starts afresh from the new config.toml.
        self._states: dict[str, tuple[weakref.ref[RoutedModel], RouteState]] = {}

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
        # Mirrors may take at most half of the shadow's queue, so that they can never
        # crowd out the requests that variant serves itself.
        limit = max(1, min(SHADOW_MAX_INFLIGHT, model.shadow_limit))
        for name in shadows:
            self._shadows.mirror(
                Mirror(
                    model.name,
                    served,
                    name,
                    model.variants.get(name),
                    state.shadow(served, name),
                    state.shadow_inflight,
                    limit,
                    inputs,
                    wanted,
                    outputs,
                )
            )
