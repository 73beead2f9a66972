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

    Writes one variant per format into REPO/MODEL with config.toml, runs every variant
    through the backend that serves it on the same inputs as the source model, and writes
    the differences to parity.json. Exit status 1 names each variant that exceeds
    --atol/--rtol, does not serve, or could not be produced (the others are still written).
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
def pytorch(
    source: str,
    inputs: tuple[str, ...],
    out: Path,
    samples: int,
    atol: float,
    rtol: float,
    data: Path | None,
    formats: str,
) -> None:
    """Convert the nn.Module that FUNCTION in FILE.py returns (eval mode)."""
    from tensorgate.server.convert.pytorch import PyTorchSource
    from tensorgate.server.convert.tensors import parse_tensor_decl

    try:
        decls = [parse_tensor_decl(text) for text in inputs]
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--input") from None
    _run(lambda: PyTorchSource(source, decls), formats, out, samples, atol, rtol, data)


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
def tensorflow(
    savedmodel_dir: Path,
    out: Path,
    samples: int,
    atol: float,
    rtol: float,
    data: Path | None,
    formats: str,
) -> None:
    """Convert the serving_default signature of a SavedModel."""
    from tensorgate.server.convert.tensorflow import SavedModelSource

    _run(lambda: SavedModelSource(savedmodel_dir), formats, out, samples, atol, rtol, data)


def _run(
    open_source: Callable[[], Any],
    formats: str,
    out: Path,
    samples: int,
    atol: float,
    rtol: float,
    data: Path | None,
) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # The repository logs why a variant fails to load; the report below says it once.
    logging.basicConfig(level=logging.CRITICAL)
    from tensorgate.server.convert import convert as run_conversion
    from tensorgate.server.convert.layout import check_out, parse_targets

    try:
        check_out(out)
        source = open_source()
        targets = parse_targets(formats, source.targets)
    except ValueError as e:
        raise click.UsageError(str(e)) from None

    def progress(message: str) -> None:
        click.echo(message, err=True)

    try:
        result = run_conversion(
            source, targets, out, samples=samples, atol=atol, rtol=rtol, data=data,
            progress=progress,
        )  # fmt: skip
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    _report(result, atol, rtol)
    if result.failed:
        for o in result.failed:
            name = f"variant '{o.target.variant}' ({o.target.name})"
            click.echo(f"error: {name}: {_why(o, atol, rtol)}", err=True)
        sys.exit(1)


def _why(outcome: Any, atol: float, rtol: float) -> str:
    if outcome.comparison is not None:
        c = outcome.comparison
        return (
            f"exceeds --atol {atol:g} / --rtol {rtol:g} (max |diff| {c.max_abs_diff:.3g}, "
            f"max relative diff {c.max_rel_diff:.3g})"
        )
    return f"{outcome.status}: {outcome.error}"


def _report(result: Any, atol: float, rtol: float) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160)
    table = Table(
        title=f"parity with the source model: {result.samples} samples, "
        f"atol {atol:g}, rtol {rtol:g}",
        title_justify="left",
    )
    table.add_column("variant")
    table.add_column("file")
    for column in ("max |diff|", "max rel diff", "top-1 agreement", "samples"):
        table.add_column(column, justify="right")
    table.add_column("result")
    for o in result.outcomes:
        c = o.comparison
        file = f"{o.target.variant}/{o.target.filename}"
        if c is None:
            why = f"[red]{o.status}[/red]: {escape(o.error)}"
            table.add_row(o.target.variant, file, "", "", "", "", why)
            continue
        top1 = "-" if c.top1_agreement is None else f"{c.top1_agreement:.1%}"
        verdict = "[green]agrees[/green]" if c.passed else "[red]exceeds tolerance[/red]"
        table.add_row(
            o.target.variant,
            escape(file + (f" ({o.note})" if o.note else "")),
            f"{c.max_abs_diff:.3g}",
            f"{c.max_rel_diff:.3g}",
            top1,
            str(c.samples),
            verdict,
        )
    console.print(table)
    if result.written:
        console.print(
            f"wrote {result.out} (default variant '{result.default_variant}'); serve it with: "
            f"tensorgate serve -r {result.out.parent}"
        )
    else:
        console.print("[red]nothing written[/red]: no format could be produced")
