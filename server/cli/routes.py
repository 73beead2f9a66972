"""``tensorgate routes``: show and change a running gateway's routing (the admin API)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import click
import grpc

from tensorgate.channel import open_channel

from .options import ClientSecurity, client_security_options

DEFAULT_URL = "127.0.0.1:8001"
CIRCUIT = {0: "closed", 1: "OPEN", 2: "half-open"}


@dataclass(frozen=True)
class _Target:
    """Where the admin calls go and how: address, TLS credentials, auth metadata."""

    url: str
    credentials: grpc.ChannelCredentials | None = None
    metadata: tuple[tuple[str, str], ...] = ()

    def at(self, url: str | None) -> _Target:
        return replace(self, url=url) if url else self


@contextmanager
def _stub(target: _Target) -> Iterator[object]:
    from tensorgate.protos import admin_pb2_grpc

    with open_channel(target.url, target.credentials) as channel:
        yield admin_pb2_grpc.RoutingAdminStub(channel)


def _call(fn, request, timeout: float, target: _Target):
    try:
        return fn(request, timeout=timeout, metadata=target.metadata)
    except grpc.RpcError as e:
        click.echo(f"error: {e.code().name}: {e.details()}", err=True)  # type: ignore[attr-defined]
        sys.exit(1)


def _fallback_text(spec) -> str:
    if spec.fallback.variants:
        return f"[{', '.join(spec.fallback.variants)}]"
    if spec.fallback.by_variant:
        return "; ".join(
            f"{k} -> {', '.join(v.variants)}" for k, v in sorted(spec.fallback.by_variant.items())
        )
    return "none"


def render(routes) -> list[object]:
    """Rich renderables for a GetRoutesResponse: per model a line of its settings, a table of
    its variants, and a table of its shadow comparisons when there are any."""
    from rich.table import Table
    from rich.text import Text

    tables: list[object] = []
    for m in routes.models:
        spec = m.route
        shadow = (
            f"{', '.join(spec.shadow.variants)} ({spec.shadow.fraction:.0%} of requests)"
            if spec.shadow.variants
            else "none"
        )
        settings = (
            f"split: {'by weight' if spec.weights else f'default variant {m.default_variant!r}'}"
            f" · sticky key: {spec.sticky_key or 'none'} · shadow: {shadow}"
            f" · fallback: {_fallback_text(spec)} · breaker: {spec.breaker_failures} failures,"
            f" {spec.breaker_cooldown_s:g} s cool-down"
            + (" · changed at run time" if m.overridden else "")
        )
        tables.append(Text.assemble("\n", (m.model, "bold"), "  ", settings))
        table = Table()
        for column in ("variant", "backend", "ready", "weight", "share", "circuit"):
            table.add_column(column)
        for column in ("served", "as fallback", "failed"):
            table.add_column(column, justify="right")
        for v in m.variants:
            circuit = CIRCUIT.get(v.circuit, str(v.circuit))
            if v.circuit == 1:
                circuit += f" ({v.consecutive_failures} failures, probe in {v.next_probe_s:.1f} s)"
            weight = spec.weights.get(v.name)
            table.add_row(
                f"{v.name} (version {v.version})" if v.version else v.name,
                v.backend,
                "yes" if v.ready else "[red]no[/red]",
                "-" if weight is None else f"{weight:g}",
                f"{v.share:.0%}",
                circuit,
                str(v.served),
                str(v.served_as_fallback),
                str(v.failed),
            )
        tables.append(table)
        for v in m.variants:
            if v.reason:
                tables.append(Text(f"{v.name}: {v.reason}", style=None if v.ready else "red"))
        if m.shadow_comparisons:
            comparisons = Table(title=f"{m.model}: shadow comparisons", title_justify="left")
            for column in ("primary", "shadow"):
                comparisons.add_column(column)
            for column in ("compared", "failed", "dropped", "worst |diff|", "arg-max agrees"):
                comparisons.add_column(column, justify="right")
            for c in m.shadow_comparisons:
                agree = f"{c.argmax_agree / c.argmax_rows:.1%}" if c.argmax_rows else "-"
                comparisons.add_row(
                    c.primary,
                    c.shadow,
                    str(c.compared),
                    str(c.failed),
                    str(c.dropped),
                    f"{c.worst_abs_diff:.3g}",
                    agree,
                )
            tables.append(comparisons)
    return tables


def _show(target: _Target, model: str, as_json: bool, timeout: float) -> None:
    from google.protobuf import json_format
    from rich.console import Console

    from tensorgate.protos import admin_pb2 as apb

    with _stub(target) as stub:
        request = apb.GetRoutesRequest(model=model)
        routes = _call(stub.GetRoutes, request, timeout, target)  # type: ignore[attr-defined]
    if as_json:
        click.echo(
            json.dumps(
                json_format.MessageToDict(
                    routes,
                    preserving_proto_field_name=True,
                    always_print_fields_with_no_presence=True,
                )
            )
        )
        return
    console = Console(width=None if sys.stdout.isatty() else 160)
    for table in render(routes):
        console.print(table)


_url = click.option(
    "--url", default=None, help=f"Server address (default: the group's --url, {DEFAULT_URL})."
)
_timeout = click.option("--timeout", default=10.0, show_default=True, type=float)
_json = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")


@click.group(invoke_without_command=True)
@click.option("--url", default=DEFAULT_URL, show_default=True, help="Server address.")
@_json
@client_security_options
@click.pass_context
def routes(
    ctx: click.Context,
    url: str,
    as_json: bool,
    security: ClientSecurity,
) -> None:
    """Show every model's routing on a running server: weights, sticky key, shadow,
    fallback, and per variant its circuit and how many requests it served.

    Changes made with `routes set` last until the model is reloaded or the server
    restarts: the model's config.toml stays the source of truth.
    """
    ctx.obj = _Target(url, security.credentials(), security.metadata())
    if ctx.invoked_subcommand is None:
        _show(ctx.obj, "", as_json, 10.0)


@routes.command()
@click.argument("model", required=False, default="")
@_url
@_json
@_timeout
@click.pass_obj
def show(target: _Target, model: str, url: str | None, as_json: bool, timeout: float) -> None:
    """Show the routing of MODEL (default: every model)."""
    _show(target.at(url), model, as_json, timeout)


def _pairs(values: tuple[str, ...], option: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or not name or not rest:
            raise click.BadParameter(f"'{value}': use NAME=VALUE", param_hint=option)
        out[name] = rest
    return out


@routes.command(name="set")
@click.argument("model")
@click.option(
    "--weight",
    "-w",
    "weights",
    multiple=True,
    metavar="VARIANT=WEIGHT",
    help="Repeat for each variant that takes unpinned traffic; the others get none.",
)
@click.option("--no-weights", is_flag=True, help="Send unpinned requests to the default variant.")
@click.option("--sticky-key", default=None, help="Request parameter / gRPC metadata key.")
@click.option("--no-sticky-key", is_flag=True, help="Stop sticky routing.")
@click.option(
    "--shadow",
    default=None,
    metavar="VARIANT[,VARIANT...]:FRACTION",
    help="Mirror FRACTION of requests to these variants, e.g. onnx:0.1.",
)
@click.option("--no-shadow", is_flag=True, help="Stop mirroring.")
@click.option(
    "--fallback",
    "fallbacks",
    multiple=True,
    metavar="VARIANT | FROM=TO[,TO...]",
    help="Repeat: VARIANT builds one list every variant falls back to, in order; "
    "FROM=TO,... gives FROM its own chain.",
)
@click.option("--no-fallback", is_flag=True, help="Stop falling back to other variants.")
@click.option("--breaker-failures", type=click.IntRange(1), default=None)
@click.option("--breaker-cooldown", type=click.FloatRange(0), default=None, help="Seconds.")
@_url
@_json
@_timeout
@click.pass_obj
def set_route(
    target: _Target,
    model: str,
    weights: tuple[str, ...],
    no_weights: bool,
    sticky_key: str | None,
    no_sticky_key: bool,
    shadow: str | None,
    no_shadow: bool,
    fallbacks: tuple[str, ...],
    no_fallback: bool,
    breaker_failures: int | None,
    breaker_cooldown: float | None,
    url: str | None,
    as_json: bool,
    timeout: float,
) -> None:
    """Change MODEL's routing on a running server; what is not given stays as it is.

    \b
    tensorgate routes set scorer --weight torch=90 --weight tf=10
    tensorgate routes set scorer --shadow onnx:0.1 --fallback tf --fallback torch
    tensorgate routes set scorer --no-shadow --no-weights
    """
    from tensorgate.protos import admin_pb2 as apb

    request = apb.SetRouteRequest(model=model)
    spec = request.route
    mask: list[str] = []
    if weights and no_weights:
        raise click.UsageError("give --weight or --no-weights, not both")
    if weights or no_weights:
        mask.append("weights")
        for name, value in _pairs(weights, "--weight").items():
            try:
                spec.weights[name] = float(value)
            except ValueError:
                raise click.BadParameter(
                    f"'{name}={value}': the weight must be a number", param_hint="--weight"
                ) from None
    if sticky_key is not None or no_sticky_key:
        mask.append("sticky_key")
        spec.sticky_key = "" if no_sticky_key else sticky_key or ""
    if shadow is not None and no_shadow:
        raise click.UsageError("give --shadow or --no-shadow, not both")
    if shadow is not None or no_shadow:
        mask.append("shadow")
        if shadow is not None:
            names, sep, fraction = shadow.rpartition(":")
            try:
                spec.shadow.fraction = float(fraction)
            except ValueError:
                sep = ""
            if not sep or not names:
                raise click.BadParameter(
                    f"'{shadow}': use VARIANT[,VARIANT...]:FRACTION, e.g. onnx:0.1",
                    param_hint="--shadow",
                )
            spec.shadow.variants.extend(n for n in names.split(",") if n)
    if fallbacks and no_fallback:
        raise click.UsageError("give --fallback or --no-fallback, not both")
    if fallbacks or no_fallback:
        mask.append("fallback")
        chains = [f for f in fallbacks if "=" in f]
        if chains and len(chains) != len(fallbacks):
            raise click.UsageError(
                "--fallback: give either variants (one list) or FROM=TO,... chains, not both"
            )
        if chains:
            for name, targets in _pairs(fallbacks, "--fallback").items():
                spec.fallback.by_variant[name].variants.extend(t for t in targets.split(",") if t)
        else:
            spec.fallback.variants.extend(fallbacks)
    if breaker_failures is not None:
        mask.append("breaker_failures")
        spec.breaker_failures = breaker_failures
    if breaker_cooldown is not None:
        mask.append("breaker_cooldown_s")
        spec.breaker_cooldown_s = breaker_cooldown
    if not mask:
        raise click.UsageError("nothing to change: give --weight, --shadow, --fallback, ...")
    request.update_mask.paths.extend(mask)
    with _stub(target.at(url)) as stub:
        reply = _call(stub.SetRoute, request, timeout, target)  # type: ignore[attr-defined]
    if as_json:
        from google.protobuf import json_format

        click.echo(
            json.dumps(
                json_format.MessageToDict(
                    reply.route,
                    preserving_proto_field_name=True,
                    always_print_fields_with_no_presence=True,
                )
            )
        )
        return
    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 160)
    for table in render(apb.GetRoutesResponse(models=[reply.route])):
        console.print(table)
