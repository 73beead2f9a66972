"""What the repository holds: a ``Model`` (one name, one route over its variants) and its
``Variant``s (a model file served by one backend), with the rules for their names and
versions."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from tensorgate.backends import Backend, BackendOptions
from tensorgate.errors import InvalidInput, ModelNotFound

from .config import ModelConfig
from .policy import RoutePolicy
from .scheduler import Scheduler
from .signature import ModelSignature
from .statistics import named_variants_version

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class State(StrEnum):
    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"
    LOADING = "LOADING"


def is_version(name: str) -> bool:
    """Whether a variant name (or a ``model_version``) is an integer version: "3" is, "onnx"
    is not. Triton's clients parse versions as integers."""
    return name.isdigit()


@dataclass
class Variant:
    """One variant of a model: a model file served by one backend."""

    model: str
    name: str
    backend_name: str
    platform: str
    path: Path
    state: State = State.LOADING
    reason: str = ""
    backend: Backend | None = None
    options: BackendOptions = field(default_factory=BackendOptions)  # as loaded
    scheduler: Scheduler | None = None

    @property
    def ready(self) -> bool:
        return self.state is State.READY

    @property
    def is_version(self) -> bool:
        return is_version(self.name)


@dataclass
class Model:
    """A model name: one route over one or more variants sharing one signature."""

    name: str
    directory: Path
    config: ModelConfig = field(default_factory=ModelConfig)
    variants: dict[str, Variant] = field(default_factory=dict)  # in documented order
    signature: ModelSignature | None = None
    reason: str = ""  # why the model as a whole failed
    policy: RoutePolicy = field(default_factory=RoutePolicy)  # [routing], validated
    # Integer model_versions of named variants ([variants.NAME] version = N): "3" -> "onnx".
    aliases: dict[str, str] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        if self.signature is None:
            return False
        for v in self.variants.values():  # noqa: SIM110 - a loop: any() costs more, per request
            if v.state is State.READY:
                return True
        return False

    def ready_variants(self) -> Iterator[Variant]:
        return (v for v in self.variants.values() if v.ready)

    def alias(self, variant: str) -> str | None:
        """The integer version a named variant also answers to, if config.toml gives one."""
        return next((a for a, v in self.aliases.items() if v == variant), None)

    def pinnable_versions(self) -> list[str]:
        """Every ``model_version`` that pins a ready variant: names, then integer aliases."""
        return [name for v in self.ready_variants() for name in self.versions(v.name)]

    def integer_versions(self, variant: Variant | None = None) -> list[int]:
        """The integer versions (directories and aliases) a Triton client may pin: of
        ``variant``, or of every ready variant."""
        served = [variant] if variant is not None else list(self.ready_variants())
        return [int(n) for v in served for n in self.versions(v.name) if is_version(n)]

    def statistics_versions(self) -> dict[str, tuple[str, ...]]:
        """What an unpinned ModelStatistics lists, {version: the variants it sums}: integer
        versions and aliased variants (under their integer) one by one, and the other
        named variants together under version "0", or the next integer no variant uses
        when "0" is a variant directory (Triton's clients parse versions as integers)."""
        versions: dict[str, tuple[str, ...]] = {}
        named: list[str] = []
        for name in self.variants:
            alias = name if is_version(name) else self.alias(name)
            if alias is None:
                named.append(name)
            else:
                versions[alias] = (name,)
        if named:
            versions[named_variants_version(versions)] = tuple(named)
        return versions

    def versions(self, variant: str) -> list[str]:
        """Every ``model_version`` that pins ``variant``: its name, then its alias."""
        alias = self.alias(variant)
        return [variant] if alias is None else [variant, alias]

    def default_variant(self) -> Variant | None:
        """Where an unpinned request goes while no routing is configured: the config's
        ``default_variant`` when ready, else the first ready variant in documented order
        (newest integer version first, then named variants alphabetically)."""
        if self.config.default_variant:
            v = self.variants.get(self.config.default_variant)
            if v is not None and v.ready:
                return v
        return next(self.ready_variants(), None)

    @property
    def shadow_limit(self) -> int:
        """Mirrored requests a shadow variant may hold at once: half its queue, so that
        mirrors can never crowd out the requests it serves itself."""
        return self.config.instances.max_queue_size // 2

    def variant(self, version: str) -> Variant:
        """The variant a request's ``model_version`` pins: the variant of that name, or the
        one whose ``[variants.NAME] version`` is that integer. The one place an alias is
        resolved. Raises ModelNotFound when neither exists."""
        v = self.variants.get(version) or self.variants.get(self.aliases.get(version, ""))
        if v is None:
            raise ModelNotFound(self.name, version)
        return v

    @property
    def platform(self) -> str:
        """The platform an unpinned request is served by (its default variant's)."""
        v = self.default_variant() or next(iter(self.variants.values()), None)
        return v.platform if v is not None else ""

    @property
    def backend_name(self) -> str:
        v = self.default_variant() or next(iter(self.variants.values()), None)
        return v.backend_name if v is not None else ""


def variant_order(names: list[str]) -> list[str]:
    """Integer versions newest first, then other names alphabetically."""
    versions = sorted((n for n in names if is_version(n)), key=int, reverse=True)
    return versions + sorted(n for n in names if not is_version(n))


def check_model_name(name: str) -> str:
    """A model name must be one plain path component (no '/', '..', hidden names)."""
    if not NAME.match(name) or name in (".", ".."):
        raise InvalidInput(
            f"invalid model name '{name}': use letters, digits, '_', '-' and '.', "
            "starting with a letter or digit"
        )
    return name
