"""``tensorgate convert``: a trained model to served variants, checked against it."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

_OUT_HELP = (
    "The model directory to write, inside a model repository (REPO/MODEL). An earlier "
    "conversion there is replaced; any other existing directory is refused."
)


def _parity_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--out and the parity options both sources share."""
    for option in reversed(
        [
            click.option(
                "--out",
                required=True,
                metavar="REPO/MODEL",
                type=click.Path(path_type=Path, file_okay=False),
                help=_OUT_HELP,
            ),
            click.option(
                "--samples",
                default=64,
                show_default=True,
                type=click.IntRange(1),
                help="Inputs every variant is compared on.",
            ),
            click.option(
                "--atol",
                default=1e-4,
                show_default=True,
                type=click.FloatRange(0),
                help="Absolute tolerance: a variant agrees when |variant - source| <= "
                "atol + rtol * |source| for every output element.",
            ),
            click.option(
                "--rtol",
                default=1e-3,
                show_default=True,
                type=click.FloatRange(0),
                help="Relative tolerance (see --atol).",
            ),
            click.option(
                "--tolerance",
                "tolerance",
                default="",
                metavar="PRECISION=T,...",
                help="Tolerance T per reduced precision, e.g. int8=0.1,fp16=0.02: a variant "
                "agrees when |variant - source| <= T x max(1, max |source|) for every output "
                "and the arg-max agrees on 99 % of rows. Defaults fp16=0.01, bf16=0.01, "
                "int8=0.05; fp32=T sets --atol.",
            ),
            click.option(
                "--data",
                type=click.Path(path_type=Path, dir_okay=False, exists=True),
                metavar="FILE.npz",
                help="Compare on these inputs (one array per input name; the first --samples "
                "of them) instead of random ones.",
            ),
        ]
    ):
        fn = option(fn)
    return fn


@click.group()
def convert() -> None:
    """Convert a trained model into served variants and check that they agree with it.

    Writes one variant per format and precision into REPO/MODEL with config.toml, runs
    every variant through the backend that serves it on the same inputs as the source
    model, and writes the differences, sizes and latencies to parity.json. Exit status 1
    names each variant that exceeds its tolerance, does not serve, or could not be produced
    in FP32 (the others are still written); a reduced precision that a format cannot be
    produced in is reported with the framework's reason.
    """


@convert.command()
@click.argument("source", metavar="FILE.py:FUNCTION")
@click.option(
    "--input",
    "inputs",
    multiple=True,
    required=True,
    metavar="NAME:DATATYPE:SHAPE",
    help="An input, in forward()'s order; repeat for each. SHAPE is comma-separated, -1 for "
    "a dynamic dimension: input:FP32:-1,64.",
)
@_parity_options
@click.option(
    "--to",
    "formats",
    default="torchscript,pt2,onnx",
    show_default=True,
    help="Formats to write: torchscript (torch/model.pt), pt2 (pt2/model.pt2, AOTInductor), "
    "onnx (onnx/model.onnx, the dynamo exporter).",
)
@click.option(
    "--precision",
    "precisions",
    default="fp32",
    show_default=True,
    help="Precisions to write each format in: fp32, fp16, bf16, int8. A reduced one is "
    "variant FORMAT-PRECISION (torch-bf16, pt2-bf16, onnx-int8...); fp32 is always written.",
)
def pytorch(source: str, inputs: tuple[str, ...], **settings: Any) -> None:
    """Convert the nn.Module that FUNCTION in FILE.py returns (eval mode)."""
    from tensorgate.server.convert.pytorch import PyTorchSource
    from tensorgate.server.convert.tensors import parse_tensor_decl

    try:
        decls = [parse_tensor_decl(text) for text in inputs]
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--input") from None
    _run(lambda: PyTorchSource(source, decls), **settings)


@convert.command()
@click.argument(
    "savedmodel_dir",
    metavar="SAVEDMODEL_DIR",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
)
@_parity_options
@click.option(
    "--to",
    "formats",
    default="savedmodel,tflite,onnx",
    show_default=True,
    help="Formats to write: savedmodel (tf/model.savedmodel/), tflite (tflite/model.tflite, "
    "LiteRT), onnx (onnx/model.onnx, tf2onnx).",
)
@click.option(
    "--precision",
    "precisions",
    default="fp32",
    show_default=True,
    help="Precisions to write each format in: fp32, fp16, int8 (tflite-fp16, tflite-int8, "
    "onnx-fp16, onnx-int8); fp32 is always written.",
)
@click.option(
    "--calibration",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    metavar="FILE.npz",
    help="Inputs (as --data) that calibrate full-integer tflite-int8; without it tflite-int8 "
    "is dynamic-range quantized.",
)
def tensorflow(savedmodel_dir: Path, calibration: Path | None, **settings: Any) -> None:
    """Convert the serving_default signature of a SavedModel."""
    from tensorgate.server.convert.parity import npz_samples
    from tensorgate.server.convert.tensorflow import SavedModelSource

    if calibration is not None and "int8" not in settings["precisions"].lower():
        raise click.UsageError("--calibration calibrates tflite-int8: add --precision int8")

    def open_source() -> SavedModelSource:
        source = SavedModelSource(savedmodel_dir)
        if calibration is not None:
            source.calibration = npz_samples(calibration, source.inputs, _CALIBRATION_SAMPLES)
        return source

    _run(open_source, **settings)


#: At most this many samples of --calibration are used (TFLite's guidance: 100-500).
_CALIBRATION_SAMPLES = 500


def _run(
    open_source: Callable[[], Any],
    *,
    formats: str,
    precisions: str,
    out: Path,
    samples: int,
    atol: float,
    rtol: float,
    tolerance: str,
    data: Path | None,
) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # The repository logs why a variant fails to load; the report below says it once.
    logging.basicConfig(level=logging.CRITICAL)
    from tensorgate.server.convert import convert as run_conversion
    from tensorgate.server.convert.layout import (
        check_out,
        parse_precisions,
        parse_targets,
        with_precisions,
    )
    from tensorgate.server.convert.parity import parse_tolerances

    try:
        tolerances = parse_tolerances(tolerance, atol, rtol)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--tolerance") from None
    try:
        check_out(out)
        source = open_source()
        targets = parse_targets(formats, source.targets)
        wanted = parse_precisions(precisions, source.precisions)
    except ValueError as e:
        raise click.UsageError(str(e)) from None

    def progress(message: str) -> None:
        click.echo(message, err=True)

    try:
        result = run_conversion(
            source, with_precisions(targets, wanted), out, samples=samples,
            tolerances=tolerances, data=data, progress=progress,
        )  # fmt: skip
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    _report(result)
    for o in result.outcomes:
        if o.optional:
            click.echo(f"note: {_name(o)}: not produced: {o.error}", err=True)
    for o in result.failed:
        click.echo(f"error: {_name(o)}: {_why(o)}", err=True)
    for precision in result.missing_precisions:
        click.echo(f"error: no format could be produced in {precision}", err=True)
    if result.failed or result.missing_precisions:
        sys.exit(1)


def _name(outcome: Any) -> str:
    target = outcome.target
    kind = target.name if target.precision == "fp32" else f"{target.name}, {target.precision}"
    return f"variant '{target.variant}' ({kind})"


def _why(outcome: Any) -> str:
    c, t = outcome.comparison, outcome.tolerance
    if c is None:
        return f"{outcome.status}: {outcome.error}"
    measured = f"max |diff| {c.max_abs_diff:.3g}, max relative diff {c.max_rel_diff:.3g}"
    if c.top1_agreement is not None:
        measured += f", top-1 agreement {c.top1_agreement:.1%}"
    if outcome.target.precision == "fp32":
        return f"exceeds --atol {t.atol:g} / --rtol {t.rtol:g} ({measured})"
    return f"exceeds the {outcome.target.precision} tolerance, {t} ({measured})"


_TIMES = "\N{MULTIPLICATION SIGN}"


def _ratio(base: float, value: float, more: str, less: str) -> str:
    """``3.1x smaller`` (base / value >= 1) or ``1.2x larger``, with a multiplication sign."""
    if value <= 0 or base <= 0:
        return ""
    ratio = base / value
    if ratio >= 1:
        return f"{ratio:.1f}{_TIMES} {more}"
    return f"{1 / ratio:.1f}{_TIMES} {less}"


def _glance(result: Any, outcome: Any) -> str | None:
    """``int8 (onnx-int8 against onnx): 3.1x smaller, 1.8x faster, top-1 99.6 %`` for a
    reduced variant, set against the FP32 variant of its format."""
    base = result.baseline(outcome)
    if outcome.target.precision == "fp32" or base is None or outcome.p50_ms is None:
        return None
    parts = [
        _ratio(base.bytes, outcome.bytes, "smaller", "larger"),
        _ratio(base.p50_ms, outcome.p50_ms, "faster", "slower"),
    ]
    c = outcome.comparison
    if c is not None and c.top1_agreement is not None:
        parts.append(f"top-1 {c.top1_agreement * 100:.1f} %")
    return (
        f"{outcome.target.precision} ({outcome.target.variant} against {base.target.variant}): "
        f"{', '.join(p for p in parts if p)}"
    )


def _size(n: int | None) -> str:
    if n is None:
        return ""
    if n < 1024:
        return f"{n} B"
    return f"{n / 1024:.1f} KiB" if n < 1024**2 else f"{n / 1024**2:.1f} MiB"


def _report(result: Any) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200)
    table = Table(
        title=f"parity with the source model: {result.samples} samples",
        title_justify="left",
    )
    table.add_column("variant")
    table.add_column("precision")
    table.add_column("file")
    for column in ("max |diff|", "max rel diff", "top-1 agreement", "size", "p50 ms"):
        table.add_column(column, justify="right")
    table.add_column("result")
    for o in result.outcomes:
        c = o.comparison
        file = f"{o.target.variant}/{o.target.filename}"
        size = _size(o.bytes)
        p50 = "" if o.p50_ms is None else f"{o.p50_ms:.3f}"
        if c is None:
            why = f"[red]{o.status}[/red]: {escape(o.error)}"
            table.add_row(o.target.variant, o.target.precision, file, "", "", "", size, p50, why)
            continue
        top1 = "-" if c.top1_agreement is None else f"{c.top1_agreement:.1%}"
        verdict = "[green]agrees[/green]" if c.passed else "[red]exceeds tolerance[/red]"
        table.add_row(
            o.target.variant,
            o.target.precision,
            escape(file + (f" ({o.note})" if o.note else "")),
            f"{c.max_abs_diff:.3g}",
            f"{c.max_rel_diff:.3g}",
            top1,
            size,
            p50,
            verdict,
        )
    console.print(table)
    for precision in dict.fromkeys(o.target.precision for o in result.outcomes):
        t = next(o.tolerance for o in result.outcomes if o.target.precision == precision)
        console.print(f"{precision} judged by {t}", highlight=False)
    for o in result.outcomes:
        line = _glance(result, o)
        if line is not None:
            console.print(line, highlight=False)
    if result.written:
        console.print(
            f"wrote {result.out} (default variant '{result.default_variant}'); serve it with: "
            f"tensorgate serve -r {result.out.parent}"
        )
    else:
        console.print("[red]nothing written[/red]: no format could be produced")
