"""``tensorgate convert``: from a trained model to variants that serve and agree with it.

A *source* (``pytorch.PyTorchSource``, ``tensorflow.SavedModelSource``) knows the model's
tensors, runs the original model, and writes each *target* format, in FP32 and in the
reduced precisions it can (``--precision``; a reduced ONNX variant is made from the FP32
ONNX file by ONNX Runtime's tools, ``precision.py``). ``convert`` writes every target it can
into one model directory, with ``config.toml``, runs the variants through the gateway's own
backends on the same samples as the source (``parity``), timing each call, writes
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

from .exporting import ExportFailed, exporter_reason
from .layout import (
    FP32,
    Listed,
    Target,
    check_out,
    config_text,
    publish,
    staging,
    write_parity,
)
from .parity import (
    Comparison,
    OutputMismatch,
    Served,
    Tolerance,
    compare,
    npz_samples,
    random_samples,
    serve_samples,
)
from .precision import DERIVED_ONNX, derive_onnx
from .tensors import TensorDecl

__all__ = ["Conversion", "Outcome", "Source", "convert"]


class Source(Protocol):
    """A trained model in its own framework."""

    framework: str  # "pytorch", "tensorflow"
    source_variant: str  # the variant in the source framework: the default variant
    targets: tuple[str, ...]  # the formats it converts to, --to's default
    precisions: tuple[str, ...]  # the precisions --precision may name
    description: str  # where it came from, for config.toml's header
    inputs: tuple[TensorDecl, ...]
    outputs: tuple[TensorDecl, ...]

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def export(self, target: Target, path: Path) -> str: ...


@dataclass
class Outcome:
    """What became of one target."""

    target: Target
    tolerance: Tolerance
    produced: bool = False
    note: str = ""  # how it was produced ("scripted", "AOTInductor", ...)
    error: str = ""  # why it was not produced, or does not serve
    comparison: Comparison | None = None
    bytes: int | None = None  # the model file's size (a directory's total)
    p50_ms: float | None = None  # median time of one request in the parity run

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

    @property
    def optional(self) -> bool:
        """A reduced precision the framework cannot produce: reported, not a failure."""
        return not self.produced and self.target.precision != FP32

    def as_json(self) -> dict[str, object]:
        """This variant's entry in parity.json."""
        entry: dict[str, object] = {"precision": self.target.precision}
        if self.comparison is not None:
            entry.update(self.comparison.as_json())
        else:
            entry["error"] = self.error if self.produced else f"not produced: {self.error}"
        entry["tolerance"] = self.tolerance.as_json()
        if self.produced:
            entry["bytes"] = self.bytes
            entry["p50_ms"] = self.p50_ms
        return entry


@dataclass
class Conversion:
    """The result of ``convert``: one outcome per target, in ``--to`` order, each format's
    precisions together, FP32 first."""

    out: Path
    outcomes: list[Outcome]
    written: bool = False
    default_variant: str = ""
    samples: int = 0
    parity: dict[str, dict[str, object]] = field(default_factory=dict)

    @property
    def failed(self) -> list[Outcome]:
        """Variants that do not serve or agree, and formats not produced in FP32."""
        return [o for o in self.outcomes if not o.ok and not o.optional]

    @property
    def missing_precisions(self) -> list[str]:
        """Precisions asked for that no format could be produced in."""
        asked = dict.fromkeys(o.target.precision for o in self.outcomes)
        produced = {o.target.precision for o in self.outcomes if o.produced}
        return [p for p in asked if p not in produced]

    def baseline(self, outcome: Outcome) -> Outcome | None:
        """The FP32 variant of ``outcome``'s format, when it was written and timed."""
        for o in self.outcomes:
            if o.target == outcome.target.baseline and o.p50_ms is not None:
                return o
        return None


def _size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def _rollout(model: str, outcome: Outcome) -> str:
    """The command that moves traffic onto a reduced variant, its gates set a little above
    what parity measured (a rollout's default divergence gate is FP32's)."""
    gate = outcome.tolerance.atol
    command = f"tensorgate rollout start {model} --to {outcome.target.variant}"
    c = outcome.comparison
    if c is not None:
        gate = max(gate, float(f"{2 * c.max_abs_diff:.2g}"))
    command += f" --max-abs-diff {gate:g}"
    if c is not None and c.top1_agreement is not None and outcome.tolerance.min_top1:
        command += f" --min-argmax-agreement {outcome.tolerance.min_top1:g}"
    return command


def _listed(model: str, outcomes: Sequence[Outcome]) -> list[Listed]:
    listed = []
    for o in outcomes:
        if o.target.precision == FP32 or not o.produced:
            continue
        about = f"{o.target.precision}: {o.note}"
        if o.comparison is not None:
            top1 = o.comparison.top1_agreement
            about += f"; parity max |diff| {o.comparison.max_abs_diff:.3g}" + (
                f", top-1 {top1:.1%}" if top1 is not None else ""
            )
        listed.append(Listed(o.target.variant, o.target.backend, about, _rollout(model, o)))
    return listed


def _export(source: Source, target: Target, model_dir: Path) -> str:
    """Write one target: a reduced ONNX precision from the FP32 ONNX file, the rest by the
    source. Raises ExportFailed with the reason."""
    path = target.path(model_dir)
    if target.name == "onnx" and target.precision in DERIVED_ONNX:
        try:
            return derive_onnx(target.precision, target.baseline.path(model_dir), path)
        except ExportFailed:
            raise
        except Exception as exc:
            raise ExportFailed(exporter_reason(exc)) from exc
    return source.export(target, path)


def convert(
    source: Source,
    targets: Sequence[Target],
    out: Path,
    *,
    samples: int,
    tolerances: Mapping[str, Tolerance],
    data: Path | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> Conversion:
    """Write ``targets`` of ``source`` as model directory ``out`` and check each against the
    source, a target in precision P by ``tolerances[P]``. ``out`` may hold an earlier
    conversion, which is replaced; anything else there is refused (ValueError), as are
    ``data`` that do not fit the inputs."""
    check_out(out)
    inputs = (
        npz_samples(data, source.inputs, samples)
        if data is not None
        else random_samples(source.inputs, samples)
    )
    result = Conversion(
        out, [Outcome(t, tolerances[t.precision]) for t in targets], samples=len(inputs)
    )
    with staging(out) as model_dir:
        for outcome in result.outcomes:
            target = outcome.target
            path = target.path(model_dir)
            progress(f"{target.variant}: writing {target.variant}/{target.filename}")
            path.parent.mkdir(parents=True)
            try:
                outcome.note = _export(source, target, model_dir)
                outcome.produced = True
                outcome.bytes = _size(path.parent)
            except ExportFailed as exc:
                outcome.error = str(exc)
                shutil.rmtree(path.parent)
        produced = [o for o in result.outcomes if o.produced]
        variants = [o.target.variant for o in produced]
        full = [o.target.variant for o in produced if o.target.precision == FP32]
        if not full:  # reduced variants alone: nothing to be the default, or compare with
            return result
        result.default_variant = source.source_variant if source.source_variant in full else full[0]
        others = [v for v in variants if v != result.default_variant]

        def write_config() -> None:
            (model_dir / "config.toml").write_text(
                config_text(
                    source.inputs,
                    source.outputs,
                    result.default_variant,
                    f"{source.framework} {source.description}",
                    others,
                    _listed(out.name, produced),
                ),
                encoding="utf-8",
            )

        write_config()
        progress(f"parity: {len(inputs)} samples through {', '.join(variants)}")
        references = [source.run(sample) for sample in inputs]
        served = serve_samples(model_dir, variants, inputs)
        names = [d.name for d in source.outputs]
        for outcome in produced:
            got = served[outcome.target.variant]
            if not isinstance(got, Served):
                outcome.error = got.replace(str(model_dir), str(out))  # where it will be
                continue
            outcome.p50_ms = got.p50_ms
            t = outcome.tolerance
            try:
                outcome.comparison = compare(
                    references, got.outputs, names, t.atol, t.rtol,
                    scaled=t.scaled, min_top1=t.min_top1,
                )  # fmt: skip
            except OutputMismatch as exc:
                outcome.error = str(exc)
        write_config()  # now with what parity measured, for the rollout gates
        result.parity = {o.target.variant: o.as_json() for o in result.outcomes}
        write_parity(model_dir, result.parity)
        publish(model_dir, out)
        result.written = True
    return result
