"""``tensorgate rollout``: start, follow and abort a rollout that the server runs
(docs/rollouts.md)."""

from __future__ import annotations

import json
import sys
import time

import click
import grpc

from .options import ClientSecurity, client_security_options
from .routes import DEFAULT_URL, _stub, _Target

#: How often --wait and --watch ask the server.
POLL_S = 1.0
#: Exit statuses of `start --wait` (and `status` of an ended rollout).
PROMOTED, ROLLED_BACK, USAGE = 0, 1, 2

_url = click.option("--url", default=DEFAULT_URL, show_default=True, help="Server address.")
_timeout = click.option("--timeout", default=10.0, show_default=True, type=float)


def _target(url: str, security: ClientSecurity) -> _Target:
    return _Target(url, security.credentials(), security.metadata())


def _steps(ctx: click.Context, param: click.Parameter, value: str | None) -> list[float]:
    if value is None:
        return []
    try:
        return [float(s) for s in value.split(",") if s.strip()]
    except ValueError:
        raise click.BadParameter(f"'{value}': use percentages, e.g. 5,25,50,100") from None


def _rpc(method, request, timeout: float, target: _Target, refused: int = ROLLED_BACK):
    try:
        return method(request, timeout=timeout, metadata=target.metadata)
    except grpc.RpcError as e:
        click.echo(f"error: {e.code().name}: {e.details()}", err=True)  # type: ignore[attr-defined]
        sys.exit(refused)


def _json(rollout) -> str:
    from google.protobuf import json_format

    return json.dumps(
        json_format.MessageToDict(
            rollout, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
    )


def render(r) -> list[object]:
    """Rich renderables for a Rollout: a summary line, the variants' numbers in the current
    phase's window, and the gates."""
    from rich.table import Table
    from rich.text import Text

    s = r.settings
    phase = {
        "shadow": f"shadow ({s.shadow_fraction:.0%} mirrored to {r.to_variant})",
        "step": f"step {r.step} of {len(s.steps)}",
    }.get(r.state, r.state)
    color = {"promoted": "green", "rolled_back": "red"}.get(r.state, "yellow")
    head = Text.assemble(
        (r.model, "bold"),
        f"  rollout {r.id}: {r.from_variant} -> {r.to_variant} · ",
        (phase, f"bold {color}"),
        f" · {r.to_variant} at {r.weight:g} % · {r.elapsed_s:.0f} s",
        f" (phase {r.phase_elapsed_s:.0f} s)" if r.state in ("shadow", "step") else "",
        f" · {r.workers} worker(s)" if r.workers > 1 else "",
    )
    variants = Table(title="this phase", title_justify="left")
    variants.add_column("variant")
    for column in ("weight %", "requests", "errors", "p99 ms"):
        variants.add_column(column, justify="right")
    for v in r.variants:
        p99 = f"{v.p99_ms:.2f}" if v.requests else "-"
        variants.add_row(v.name, f"{v.weight:g}", str(v.requests), str(v.errors), p99)
    divergence = Text(
        f"shadow: {r.compared} comparisons, max |diff| {r.max_abs_diff:.3g}, "
        f"arg-max agreement {r.argmax_agreement:.1%}"
    )
    gates = Table(title="gates", title_justify="left")
    for column in ("gate", "value", "limit", "verdict"):
        gates.add_column(column)
    for g in r.gates:
        verdict = (
            "[green]holds[/green]"
            if g.judged and g.ok
            else "[red]BREACHED[/red]"
            if g.judged
            else "[dim]gathering[/dim]"
        )
        gates.add_row(g.name, f"{g.value:.4g}", f"{g.limit:g}", verdict)
    out: list[object] = [head, variants, divergence, gates]
    if r.message:
        out.append(Text(r.message, style=color))
    return out


def _print(rollout, as_json: bool) -> None:
    if as_json:
        click.echo(_json(rollout))
        return
    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 160)
    for part in render(rollout):
        console.print(part)


def _ended(rollout) -> int | None:
    return {"promoted": PROMOTED, "rolled_back": ROLLED_BACK}.get(rollout.state)


@click.group()
def rollout() -> None:
    """Move a model's traffic to another variant in stages, run by the server, while the
    shadow comparison, latency and error gates hold; back at once when one breaks."""


@rollout.command()
@click.argument("model")
@click.option("--to", "to_variant", required=True, help="The candidate variant.")
@click.option(
    "--from", "from_variant", default="", help="The variant it replaces (default: serving now)."
)
@click.option(
    "--steps", callback=_steps, default=None, help="Candidate weights in percent [5,25,50,100]."
)
@click.option("--step-seconds", type=float, default=None, help="Seconds per step [60].")
@click.option(
    "--min-requests", type=int, default=None, help="Per phase: compared / answered [200]."
)
@click.option("--shadow-fraction", type=float, default=None, help="Of requests mirrored [1.0].")
@click.option("--shadow-seconds", type=float, default=None, help="Shadow phase seconds [60].")
@click.option("--max-abs-diff", type=float, default=None, help="Shadow divergence limit [1e-4].")
@click.option(
    "--min-argmax-agreement", type=float, default=None, help="Arg-max agreement, 0-1 [off]."
)
@click.option(
    "--max-p99-ratio", type=float, default=None, help="Candidate p99 / --from p99 [1.25]."
)
@click.option("--max-error-rate", type=float, default=None, help="Candidate errors [0.001].")
@click.option("--wait", is_flag=True, help="Follow it: exit 0 promoted, 1 rolled back.")
@_url
@_timeout
@client_security_options
def start(
    model: str,
    to_variant: str,
    from_variant: str,
    steps: list[float],
    wait: bool,
    url: str,
    timeout: float,
    security: ClientSecurity,
    **gates: float | int | None,
) -> None:
    """Start rolling MODEL over to the variant --to.

    \b
    tensorgate rollout start scorer --to onnx-int8 --wait
    tensorgate rollout start scorer --to onnx --steps 10,50,100 --step-seconds 300
    """
    from tensorgate.protos import admin_pb2 as apb

    request = apb.StartRolloutRequest(
        model=model,
        to_variant=to_variant,
        from_variant=from_variant,
        steps=steps,
        **{k: v for k, v in gates.items() if v is not None},
    )
    target = _target(url, security)
    with _stub(target) as stub:
        started = _rpc(stub.StartRollout, request, timeout, target, refused=USAGE)  # type: ignore[attr-defined]
        if not wait:
            _print(started, as_json=False)
            return
        click.echo(f"rollout {started.id} of {model}: {started.message}")
        shown = (started.state, started.step)
        while True:
            time.sleep(POLL_S)
            current = _rpc(
                stub.GetRollout,  # type: ignore[attr-defined]
                apb.GetRolloutRequest(model=model),
                timeout,
                target,
            )
            if current.id != started.id:  # a newer one: ours ended and was replaced
                sys.exit(ROLLED_BACK)
            if (current.state, current.step) != shown:
                shown = (current.state, current.step)
                click.echo(f"rollout {current.id} of {model}: {current.message}")
            code = _ended(current)
            if code is not None:
                _print(current, as_json=False)
                sys.exit(code)


@rollout.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@click.option("--watch", is_flag=True, help="Refresh every second until the rollout ends.")
@_url
@_timeout
@client_security_options
def status(
    model: str, as_json: bool, watch: bool, url: str, timeout: float, security: ClientSecurity
) -> None:
    """Show MODEL's rollout: phase, step, weight, requests and p99 per variant, divergence,
    and each gate's value against its limit."""
    from tensorgate.protos import admin_pb2 as apb

    target = _target(url, security)
    request = apb.GetRolloutRequest(model=model)
    with _stub(target) as stub:
        current = _rpc(stub.GetRollout, request, timeout, target)  # type: ignore[attr-defined]
        if not watch:
            _print(current, as_json)
            return
        if as_json:
            while True:
                click.echo(_json(current))
                if _ended(current) is not None:
                    return
                time.sleep(POLL_S)
                current = _rpc(stub.GetRollout, request, timeout, target)  # type: ignore[attr-defined]
        from rich.console import Group
        from rich.live import Live

        with Live(Group(*render(current)), refresh_per_second=4) as live:
            while _ended(current) is None:
                time.sleep(POLL_S)
                current = _rpc(stub.GetRollout, request, timeout, target)  # type: ignore[attr-defined]
                live.update(Group(*render(current)))


@rollout.command()
@click.argument("model")
@_url
@_timeout
@client_security_options
def abort(model: str, url: str, timeout: float, security: ClientSecurity) -> None:
    """Stop MODEL's running rollout: its routing goes back to what it was before."""
    from tensorgate.protos import admin_pb2 as apb

    target = _target(url, security)
    with _stub(target) as stub:
        ended = _rpc(
            stub.AbortRollout,  # type: ignore[attr-defined]
            apb.AbortRolloutRequest(model=model),
            timeout,
            target,
        )
    _print(ended, as_json=False)
