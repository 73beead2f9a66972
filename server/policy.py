"""One model's routing settings and the pure choice of a variant.

``RoutePolicy`` is what ``[routing]`` in config.toml (or the admin API's SetRoute)
describes, immutable: a change replaces the whole policy. ``validate_policy`` checks one
against the model's variants; ``choose_variant`` picks a variant by weight, or by weighted
rendezvous hashing of a sticky key (see ``router``'s module doc for the rules).
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType

from tensorgate.inference import InferenceRequest

from .breaker import DEFAULT_BREAKER_COOLDOWN_S, DEFAULT_BREAKER_FAILURES
from .config import RoutingConfig

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
    # fallbacks_for's answers, by primary (not part of the policy's value).
    _fallbacks: dict[str, tuple[str, ...]] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    @cached_property  # the policy is immutable; asked once per request
    def weighted(self) -> bool:
        """Whether unpinned requests are split by weight (else: the default variant)."""
        return any(w > 0 for w in self.weights.values())

    def share(self, variant: str) -> float:
        """The fraction of unpinned requests ``variant`` is meant to receive."""
        total = sum(w for w in self.weights.values() if w > 0)
        return max(self.weights.get(variant, 0.0), 0.0) / total if total else 0.0

    def fallbacks_for(self, primary: str) -> tuple[str, ...]:
        """The variants to try, in order, after ``primary`` fails (worked out once per
        primary: the policy is immutable)."""
        known = self._fallbacks.get(primary)
        if known is None:
            known = self._fallbacks[primary] = self._walk_fallbacks(primary)
        return known

    def _walk_fallbacks(self, primary: str) -> tuple[str, ...]:
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
