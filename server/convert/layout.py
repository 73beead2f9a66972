"""What ``tensorgate convert`` writes: one variant directory per target, ``config.toml`` and
``parity.json``, put into place only once complete.

A conversion is written into a hidden directory beside ``--out`` (the repository scanner
ignores hidden names, so a server polling the repository never sees half a model), checked
there, and renamed to ``--out`` at the end.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from .tensors import TensorDecl

FP32 = "fp32"
#: Every precision ``--precision`` may name, in the order variants are written.
PRECISIONS = (FP32, "fp16", "bf16", "int8")


@dataclass(frozen=True)
class Target:
    """A format ``--to`` may name, and where its variant lives in the model directory."""

    name: str  # as --to spells it
    variant: str  # the variant directory
    filename: str  # the model file (or directory) inside it
    backend: str  # the tensorgate backend that serves it
    precision: str = FP32  # the model's arithmetic inside; inputs and outputs keep theirs

    def path(self, model_dir: Path) -> Path:
        return model_dir / self.variant / self.filename

    @property
    def baseline(self) -> Target:
        """The FP32 variant of the same format: what a reduced precision is set against."""
        return TARGETS[self.name]

    def in_precision(self, precision: str) -> Target:
        """This format in ``precision``: variant ``<variant>-<precision>`` (FP32 keeps the
        plain name)."""
        if precision == FP32:
            return self.baseline
        return replace(self.baseline, variant=f"{self.variant}-{precision}", precision=precision)


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("torchscript", "torch", "model.pt", "torchscript"),
        Target("pt2", "pt2", "model.pt2", "torch_export"),
        Target("onnx", "onnx", "model.onnx", "onnxruntime"),
        Target("savedmodel", "tf", "model.savedmodel", "tf_savedmodel"),
        Target("tflite", "tflite", "model.tflite", "litert"),
    )
}

#: The file that marks a directory as written by ``tensorgate convert``.
PARITY_FILE = "parity.json"


def parse_targets(text: str, allowed: Iterable[str]) -> list[Target]:
    """``--to`` (comma-separated) as targets, in the order given. Raises ValueError naming
    the formats this source converts to."""
    allowed = list(allowed)
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError(f"name at least one format: {','.join(allowed)}")
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise ValueError(f"cannot convert to {', '.join(unknown)}; choose from {','.join(allowed)}")
    return [TARGETS[n] for n in dict.fromkeys(names)]


def parse_precisions(text: str, allowed: Sequence[str]) -> list[str]:
    """``--precision`` (comma-separated) as precisions, FP32 always first: it is the default
    variant and what the reduced ones are measured against. Raises ValueError naming the
    precisions this source converts to."""
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise ValueError(
            f"cannot convert to precision {', '.join(unknown)}; choose from {','.join(allowed)}"
        )
    return [p for p in PRECISIONS if p == FP32 or p in names]


def with_precisions(targets: Sequence[Target], precisions: Sequence[str]) -> list[Target]:
    """Every format in every precision, grouped by format, FP32 first (a reduced ONNX variant
    is made from the FP32 file)."""
    return [t.in_precision(p) for t in targets for p in precisions]


@dataclass(frozen=True)
class Listed:
    """A reduced-precision variant as config.toml lists it."""

    variant: str
    backend: str
    about: str  # one line: how it was made, and what parity measured
    rollout: str  # the ``tensorgate rollout start`` command that moves traffic onto it


def config_text(
    inputs: Iterable[TensorDecl],
    outputs: Iterable[TensorDecl],
    default_variant: str,
    source: str,
    shadow_candidates: list[str],
    listed: Sequence[Listed] = (),
) -> str:
    """config.toml for the converted model: its tensors and default variant, (as a comment)
    the ``[routing]`` shadow that keeps comparing the new variants on live traffic, and a
    ``[variants.NAME]`` table per reduced-precision variant with the rollout command that
    moves traffic onto it (commented: a person decides when)."""
    # Written by hand rather than by a TOML library: these few keys read best as a person
    # writes them (one-line shapes), and json.dumps quotes a name as TOML does.
    lines = [
        f"# Written by tensorgate convert from {source}; see docs/convert.md.",
        f"default_variant = {json.dumps(default_variant)}",
        "",
    ]
    for kind, tensors in (("input", inputs), ("output", outputs)):
        for t in tensors:
            lines += [
                f"[[{kind}]]",
                f"name = {json.dumps(t.name)}",
                f'datatype = "{t.datatype}"',
                f"shape = [{', '.join(map(str, t.shape))}]",
                "",
            ]
    if shadow_candidates:
        variants = ", ".join(f'"{v}"' for v in shadow_candidates)
        lines += [
            "# Mirror a fraction of live requests to the new variants and compare their",
            "# outputs with the default variant's (tensorgate routes shows the comparisons):",
            "# [routing]",
            f"# shadow = {{ variants = [{variants}], fraction = 0.1 }}",
            "",
        ]
    if listed:
        lines += [
            "# Reduced-precision variants: served, and pinned by model_version, but never the",
            "# default. Move traffic onto one in gated steps with the rollout command under it",
            "# (it shadows, then shifts weight in steps, and restores the routing on a breach).",
        ]
    for item in listed:
        lines += [
            f"[variants.{json.dumps(item.variant)}]",
            f"backend = {json.dumps(item.backend)}",
            f"# {item.about}",
            f"# {item.rollout}",
            "",
        ]
    return "\n".join(lines).rstrip("\n") + "\n"


def write_parity(model_dir: Path, report: dict[str, dict[str, object]]) -> Path:
    path = model_dir / PARITY_FILE
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return path


def check_out(out: Path) -> None:
    """Refuse an ``--out`` that holds anything but an earlier conversion (which is replaced)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory REPO/MODEL")
    if out.is_dir() and any(out.iterdir()) and not (out / PARITY_FILE).is_file():
        raise ValueError(
            f"--out {out} exists and was not written by tensorgate convert (no {PARITY_FILE}); "
            "remove it or choose another directory"
        )


@contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A hidden scratch model directory beside ``out``, named as ``out``, removed at exit.

    Its parent serves as a repository root of its own, so the converted model can be loaded
    exactly as a server loads it before it is put in place with ``publish``.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix=f".{out.name}.converting-", dir=out.parent))
    try:
        model_dir = root / out.name
        model_dir.mkdir()
        yield model_dir
    finally:
        shutil.rmtree(root, ignore_errors=True)


def publish(model_dir: Path, out: Path) -> None:
    """Put a staged model directory at ``out``, replacing an earlier conversion there."""
    previous = None
    if out.exists():
        previous = out.with_name(f".{out.name}.replaced-{model_dir.parent.name[-8:]}")
        out.rename(previous)
    model_dir.rename(out)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
