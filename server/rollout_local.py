"""A rollout as one process applies it: the phase's routing on top of the routing from
before, and the numbers of the phase's window (``rollouts.py`` leads and follows)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import tomlkit

from .metrics import Metrics, latency_counts
from .model import Model
from .repository import Repository
from .rollout import (
    PROMOTED,
    ROLLED_BACK,
    STEP,
    Status,
    VariantWindow,
    Window,
    phase_policy,
    promoted_policy,
    share,
)
from .router import RouteState
from .writelock import holding


@dataclass(frozen=True)
class _Variant:
    served: int
    failed: int
    buckets: list[float]  # request duration histogram counts


@dataclass(frozen=True)
class _Pair:
    compared: int
    failed: int
    rows: int
    agree: int


class Meter:
    """One process's numbers for the current phase: its counters now minus at the phase's
    start (``begin``)."""

    def __init__(
        self, metrics: Metrics, model: Model, state: RouteState, pair: tuple[str, str]
    ) -> None:
        self.metrics, self.model, self.state, self.pair = metrics, model, state, pair
        self._variants: dict[str, _Variant] = {}
        self._pairs: dict[tuple[str, str], _Pair] = {}

    def _now(self) -> tuple[dict[str, _Variant], dict[tuple[str, str], _Pair]]:
        variants = {}
        for name in self.pair:
            counts = self.state.counts[name]
            backend = self.model.variants[name].backend_name
            buckets = latency_counts(self.metrics, self.model.name, name, backend)
            variants[name] = _Variant(counts.served, counts.failed, buckets)
        pairs = {
            key: _Pair(s.compared, s.failed, s.argmax_rows, s.argmax_agree)
            for key, s in self.state.shadow_stats.items()
            if self.pair[1] in key  # the candidate served or was mirrored to
        }
        return variants, pairs

    def begin(self) -> None:
        source, candidate = self.pair
        for key in ((source, candidate), (candidate, source)):
            self.state.shadow(*key).window_worst_abs_diff = 0.0
        self._variants, self._pairs = self._now()

    def window(self) -> Window:
        variants, pairs = self._now()
        w = Window()
        for name, current in variants.items():
            start = self._variants.get(name, _Variant(0, 0, [0.0] * len(current.buckets)))
            w.variants[name] = VariantWindow(
                requests=current.served - start.served,
                errors=current.failed - start.failed,
                buckets=[a - b for a, b in zip(current.buckets, start.buckets, strict=True)],
            )
        candidate = self.pair[1]
        for key, now in pairs.items():
            before = self._pairs.get(key, _Pair(0, 0, 0, 0))
            w.compared += now.compared - before.compared
            if key[1] == candidate:  # mirrors to the candidate that failed there
                w.mirror_errors += now.failed - before.failed
            w.argmax_rows += now.rows - before.rows
            w.argmax_agree += now.agree - before.agree
            w.max_abs_diff = max(w.max_abs_diff, self.state.shadow_stats[key].window_worst_abs_diff)
        return w


class LocalRollout:
    """A rollout as one process applies it: the model, its routing from before, its meter."""

    def __init__(
        self, metrics: Metrics, model: Model, state: RouteState, source: str, candidate: str
    ) -> None:
        self.model, self.state = model, state
        self.base, self.base_overridden = state.policy, state.overridden
        self.source, self.candidate = source, candidate
        self.meter = Meter(metrics, model, state, (source, candidate))
        self.applied: tuple[str, int] | None = None

    def apply(self, status: Status) -> None:
        """Route as ``status`` says, once per phase; a new phase starts a new window."""
        key = (status.state, status.step)
        if key == self.applied:
            return
        self.applied = key
        if status.state == ROLLED_BACK:
            self.state.set_policy(self.base)
            self.state.overridden = self.base_overridden
        elif status.state == PROMOTED:
            config = self.model.config.model_copy(update={"default_variant": self.candidate})
            self.model.config = config
            self.model.policy = promoted_policy(self.model.policy)
            self.state.set_policy(promoted_policy(self.base))
            self.state.overridden = self.base_overridden
        else:
            fraction = status.settings.shadow_fraction
            self.state.set_policy(
                phase_policy(
                    self.base, status.state, status.weight, self.source, self.candidate, fraction
                )
            )
            self.meter.begin()

    def weights(self, status: Status) -> tuple[float, float]:
        """The percent of unpinned requests (source, candidate) get now."""
        if status.state == STEP:
            return 100.0 - status.weight, status.weight
        if status.state == PROMOTED:
            return 0.0, 100.0
        default = self.model.default_variant()
        name = default.name if default is not None else None
        return share(self.base, self.source, name), share(self.base, self.candidate, name)

    def replaced(self, repository: Repository) -> bool:
        """Whether the model was reloaded or unloaded (its routing is config.toml's again)."""
        return repository.models.get(self.model.name) is not self.model


def write_json(path: Path, data: object) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def write_default_variant(directory: Path, variant: str) -> None:
    """Make ``variant`` the default in ``directory/config.toml`` and drop ``[routing]
    weights``, keeping every other line and comment, under the repository's write lock
    (a polling server never reads half of it)."""
    path = directory / "config.toml"
    with holding(directory.parent):
        doc = (
            tomlkit.parse(path.read_text(encoding="utf-8")) if path.exists() else tomlkit.document()
        )
        doc["default_variant"] = variant
        routing = doc.get("routing")
        if routing is not None and "weights" in routing:
            del routing["weights"]
        tmp = path.with_name(f".config.toml.{os.getpid()}.tmp")
        tmp.write_text(tomlkit.dumps(doc), encoding="utf-8")
        tmp.replace(path)
