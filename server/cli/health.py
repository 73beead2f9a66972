"""``tensorgate health``: ask a server's grpc.health.v1 service."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .options import PORT_FILE_ENV, ClientSecurity, client_tls_options


@click.command()
@click.option(
    "--url",
    default=None,
    help="Server address. Default: 127.0.0.1 on the port in --port-file, else 127.0.0.1:8001.",
)
@click.option(
    "--port-file",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar=PORT_FILE_ENV,
    help="The port file `serve --port-file` wrote: ask the port the server serves on. "
    f"Default: ${PORT_FILE_ENV} when set.",
)
@click.option(
    "--service",
    default="",
    show_default=True,
    help='Health service to ask for: "" is the whole server, a model name that model.',
)
@click.option("--timeout", default=3.0, show_default=True, type=float, help="Deadline, seconds.")
@client_tls_options
def health(
    url: str | None,
    port_file: Path | None,
    service: str,
    timeout: float,
    security: ClientSecurity,
) -> None:
    """Ask a server's grpc.health.v1 service; exit 0 when SERVING, 1 otherwise.

    The container HEALTHCHECK runs this (with the image's $TENSORGATE_PORT_FILE, so it
    follows any --port); Kubernetes probes ask the same service natively.
    """
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tensorgate.channel import open_channel

    if url is None:
        url = f"127.0.0.1:{_served_port(port_file) if port_file is not None else 8001}"
    request = health_pb2.HealthCheckRequest(service=service)
    with open_channel(url, security.credentials()) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=timeout)
        except grpc.RpcError as e:
            click.echo(f"{e.code().name}: {e.details()}")  # type: ignore[attr-defined]
            sys.exit(1)
    click.echo(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
    sys.exit(0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1)


def _served_port(port_file: Path) -> int:
    """The gRPC port in a server's port file; exit 1 (unhealthy) while there is none."""
    try:
        return int(json.loads(port_file.read_text())["grpc_port"])
    except FileNotFoundError:
        click.echo(f"NOT_STARTED: no port file {port_file} yet (the server writes it once serving)")
    except (OSError, ValueError, KeyError, TypeError) as e:
        click.echo(f"UNKNOWN: cannot read the gRPC port from {port_file}: {e}")
    sys.exit(1)
