"""``tensorgate convert``: from a trained model to variants that serve and agree with it.

A *source* (``pytorch.PyTorchSource``, ``tensorflow.SavedModelSource``) knows the model's
tensors, runs the original model, and writes each *target* format. ``convert`` writes every
target it can into one model directory, with ``config.toml``, runs the variants through the
gateway's own backends on the same samples as the source (``parity``), writes
``parity.json`` and puts the directory in place. A target that cannot be produced is
reported with the exporter's reason; the others are still written.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from .exporting import ExportFailed
from .layout import Target, check_out, config_text, publish, staging, write_parity
from .parity import Comparison, OutputMismatch, compare, npz_samples, random_samples, serve_samples
from .tensors import TensorDecl

__all__ = ["Conversion", "Outcome", "Source", "convert"]


class Source(Protocol):
    """A trained model in its own framework."""

    framework: str  # "pytorch", "tensorflow"
    source_variant: str  # the variant in the source framework: the default variant
    targets: tuple[str, ...]  # the formats it converts to, --to's default
    description: str  # where it came from, for config.toml's header
    inputs: tuple[TensorDecl, ...]
    outputs: tuple[TensorDecl, ...]

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def export(self, target: Target, path: Path) -> str: ...


@dataclass
class Outcome:
    """What became of one target."""

    target: Target
    produced: bool = False
    note: str = ""  # how it was produced ("scripted", "AOTInductor", ...)
    error: str = ""  # why it was not produced, or does not serve
    comparison: Comparison | None = None

    @property
    def ok(self) -> bool:
        return self.comparison is not None and self.comparison.passed

    @property
    def status(self) -> str:
        if not self.produced:
            return "not produced"
        if self.comparison is None:
            return "does not serve"
        return "agrees" if self.comparison.passed else "exceeds tolerance"


@dataclass
class Conversion:
    """The result of ``convert``: one outcome per target, in ``--to`` order."""

    out: Path
    outcomes: list[Outcome]
    written: bool = False
    default_variant: str = ""
    samples: int = 0
    parity: dict[str, dict[str, object]] = field(default_factory=dict)

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]


def convert(
    source: Source,
    targets: Sequence[Target],
    out: Path,
    *,
    samples: int,
    atol: float,
    rtol: float,
    data: Path | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> Conversion:
    """Write ``targets`` of ``source`` as model directory ``out`` and check each against the
    source. ``out`` may hold an earlier conversion, which is replaced; anything else there
    is refused (ValueError), as are ``data`` that do not fit the inputs."""
    check_out(out)
    inputs = (
        npz_samples(data, source.inputs, samples)
        if data is not None
        else random_samples(source.inputs, samples)
    )
    result = Conversion(out, [Outcome(t) for t in targets], samples=len(inputs))
    with staging(out) as model_dir:
        for outcome in result.outcomes:
            target = outcome.target
            path = target.path(model_dir)
            progress(f"{target.name}: writing {target.variant}/{target.filename}")
            path.parent.mkdir(parents=True)
            try:
                outcome.note = source.export(target, path)
                outcome.produced = True
            except ExportFailed as exc:
                outcome.error = str(exc)
                shutil.rmtree(path.parent)
        produced = [o for o in result.outcomes if o.produced]
        if not produced:
            return result
        variants = [o.target.variant for o in produced]
        result.default_variant = (
            source.source_variant if source.source_variant in variants else variants[0]
        )
        (model_dir / "config.toml").write_text(
            config_text(
                source.inputs,
                source.outputs,
                result.default_variant,
                f"{source.framework} {source.description}",
                [v for v in variants if v != result.default_variant],
            ),
            encoding="utf-8",
        )
        progress(f"parity: {len(inputs)} samples through {', '.join(variants)}")
        references = [source.run(sample) for sample in inputs]
        served = serve_samples(model_dir, variants, inputs)
        names = [d.name for d in source.outputs]
        for outcome in produced:
            got = served[outcome.target.variant]
            if isinstance(got, str):
                outcome.error = got.replace(str(model_dir), str(out))  # where it will be
                continue
            try:
                outcome.comparison = compare(references, got, names, atol, rtol)
            except OutputMismatch as exc:
                outcome.error = str(exc)
        result.parity = {
            o.target.variant: o.comparison.as_json()
            if o.comparison
            else {"error": o.error if o.produced else f"not produced: {o.error}"}
            for o in result.outcomes
        }
        write_parity(model_dir, result.parity)
        publish(model_dir, out)
        result.written = True
    return result
