"""``tensorgate infer``: call a model once and print its outputs."""

from __future__ import annotations

import json
import sys

import click
import numpy as np

from .options import ClientSecurity, client_security_options
from .tensors import parse_input, random_input


@click.command()
@click.argument("model")
@click.option("--version", "-v", default=None, help="Pin a variant (model_version).")
@click.option(
    "--input",
    "-i",
    "inputs",
    multiple=True,
    metavar="NAME=FILE.npy|JSON",
    help="An input tensor; repeat for several. JSON is cast to the input's datatype.",
)
@click.option(
    "--random",
    "random_inputs",
    is_flag=True,
    help="Fill every input not given with random data of its shape (-1 -> 1).",
)
@click.option("--output", "-o", "outputs", multiple=True, help="Only return these outputs.")
@click.option("--url", default="127.0.0.1:8001", show_default=True, help="Server address.")
@click.option("--timeout", default=30.0, show_default=True, type=float, help="Deadline, seconds.")
@click.option("--json", "as_json", is_flag=True, help="Print the outputs as JSON.")
@client_security_options
def infer(
    model: str,
    version: str | None,
    inputs: tuple[str, ...],
    random_inputs: bool,
    outputs: tuple[str, ...],
    url: str,
    timeout: float,
    as_json: bool,
    security: ClientSecurity,
) -> None:
    """Call MODEL once and print its outputs."""
    from tensorgate.clients import Client, InferenceError

    with Client(url, **security.client_kwargs()) as client:
        try:
            meta = client.model_metadata(model, version, timeout=timeout)
            by_input = {t["name"]: t for t in meta.get("inputs", [])}
            tensors = dict(parse_input(s, by_input) for s in inputs)
            if random_inputs:
                for name, t in by_input.items():
                    tensors.setdefault(name, random_input(t))
            missing = [n for n in by_input if n not in tensors]
            if missing:
                raise click.UsageError(
                    f"missing input(s) {missing}: give --input NAME=... or --random"
                )
            result = client.infer(model, tensors, version=version, timeout=timeout, outputs=outputs)
        except InferenceError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
    if as_json:

        def plain(a: np.ndarray):
            if a.dtype == object:
                return [x.decode("utf-8", "replace") for x in a.reshape(-1)]
            return a.tolist()

        click.echo(
            json.dumps(
                {
                    "model": result.model,
                    "variant": result.variant,
                    "outputs": {k: plain(v) for k, v in result.items()},
                }
            )
        )
        return
    click.echo(f"model {result.model}, served by variant '{result.variant}'")
    with np.printoptions(precision=5, suppress=True, threshold=64, edgeitems=4):
        for name, arr in result.items():
            click.echo(f"{name}: {arr.dtype} {list(arr.shape)}\n{arr}")
