"""``tensorgate health``: ask a server's grpc.health.v1 service."""

from __future__ import annotations

import sys

import click

from .options import ClientSecurity, client_tls_options


@click.command()
@click.option("--url", default="127.0.0.1:8001", show_default=True, help="Server address.")
@click.option(
    "--service",
    default="",
    show_default=True,
    help='Health service to ask for: "" is the whole server, a model name that model.',
)
@click.option("--timeout", default=3.0, show_default=True, type=float, help="Deadline, seconds.")
@client_tls_options
def health(
    url: str,
    service: str,
    timeout: float,
    security: ClientSecurity,
) -> None:
    """Ask a server's grpc.health.v1 service; exit 0 when SERVING, 1 otherwise.

    The container HEALTHCHECK runs this; Kubernetes probes ask the same service natively.
    """
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tensorgate.clients.channel import open_channel

    request = health_pb2.HealthCheckRequest(service=service)
    with open_channel(url, security.credentials()) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=timeout)
        except grpc.RpcError as e:
            click.echo(f"{e.code().name}: {e.details()}")  # type: ignore[attr-defined]
            sys.exit(1)
    click.echo(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
    sys.exit(0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1)
