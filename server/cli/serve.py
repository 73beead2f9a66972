"""``tensorgate serve``: serve every model in a repository over gRPC."""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

import click

from tensorgate.limits import MAX_MESSAGE_BYTES

from .demo import write_demo
from .options import EXISTING_FILE, PORT_FILE_ENV


def default_demo_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tensorgate" / "demo"


@click.command()
@click.option(
    "--repository",
    "-r",
    type=click.Path(path_type=Path, file_okay=False),
    help="Model repository (MODEL/VARIANT/<file>). Default: the built-in demo, "
    "generated on first use.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address for gRPC.")
@click.option(
    "--port",
    default=8001,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="gRPC port (0: any free port).",
)
@click.option(
    "--metrics-port",
    default=8002,
    show_default=True,
    type=click.IntRange(-1, 65535),
    help="Prometheus /metrics port (0: any free port, -1: off).",
)
@click.option("--metrics-host", default=None, help="Address for /metrics (default: --host).")
@click.option(
    "--metrics-tls-cert",
    type=EXISTING_FILE,
    help="Serve /metrics over HTTPS with this certificate chain (PEM); needs --metrics-tls-key.",
)
@click.option(
    "--metrics-tls-key", type=EXISTING_FILE, help="The private key of --metrics-tls-cert."
)
@click.option(
    "--metrics-token-file",
    type=EXISTING_FILE,
    help="Require 'Authorization: Bearer <token>' with the token in this file for /metrics "
    "(401 without it).",
)
@click.option(
    "--drain-timeout",
    default=30.0,
    show_default=True,
    type=float,
    help="Seconds accepted calls may take to finish after SIGTERM.",
)
@click.option(
    "--max-message-bytes",
    default=MAX_MESSAGE_BYTES,
    show_default=True,
    type=int,
    help="Largest gRPC message accepted or sent.",
)
@click.option(
    "--max-inflight",
    type=click.IntRange(1),
    default=None,
    help="Inference requests in flight at once, server-wide; beyond: RESOURCE_EXHAUSTED "
    "at once. Default: no limit besides each model's queue.",
)
@click.option(
    "--max-tensor-elements",
    type=click.IntRange(1),
    default=1 << 31,
    show_default=True,
    help="Largest tensor accepted, in elements; beyond: INVALID_ARGUMENT.",
)
@click.option(
    "--poll-interval",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Poll the repository every SECONDS: load new model directories, unload removed "
    "ones, reload changed ones. Default: no polling (repository RPCs only).",
)
@click.option(
    "--tls-cert",
    type=EXISTING_FILE,
    help="Serve gRPC over TLS with this certificate chain (PEM); needs --tls-key. Token and "
    "TLS files are re-read when they change and on SIGHUP (docs/security.md).",
)
@click.option(
    "--tls-key",
    type=EXISTING_FILE,
    help="The private key of --tls-cert (PEM).",
)
@click.option(
    "--tls-client-ca",
    type=EXISTING_FILE,
    help="Mutual TLS: require client certificates signed by this CA (PEM).",
)
@click.option(
    "--auth-token-file",
    type=EXISTING_FILE,
    help="Require 'authorization: Bearer <token>' with the token in this file for "
    "inference RPCs. Default: $TENSORGATE_AUTH_TOKEN when set, else no auth.",
)
@click.option(
    "--admin-token-file",
    type=EXISTING_FILE,
    help="The token the repository RPCs and the admin service need (default: "
    "$TENSORGATE_ADMIN_TOKEN, else the inference token, else none).",
)
@click.option(
    "--port-file",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar=PORT_FILE_ENV,
    help="Write {'grpc_port', 'metrics_port'} as JSON here once serving (`tensorgate "
    f"health` reads it). Default: ${PORT_FILE_ENV} when set (the image sets it).",
)
@click.option(
    "--require-models",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="Report health NOT_SERVING while fewer than N models are ready (at start-up and "
    "after unloads). 0: an empty repository is healthy.",
)
@click.option(
    "--workers",
    "-w",
    default=1,
    show_default=True,
    type=click.IntRange(0),
    help="Server processes sharing the port (SO_REUSEPORT), each with its own models, "
    "under one supervisor that restarts them and serves /metrics for all; 0: one per core.",
)
@click.option(
    "--event-loop",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "uvloop", "asyncio"]),
    help="The asyncio event loop: uvloop (4-12 % less CPU per request) or the standard "
    "one; auto: uvloop when installed.",
)
@click.option(
    "--front-end",
    default="auto",
    show_default=True,
    envvar="TENSORGATE_FRONT_END",
    type=click.Choice(["auto", "native", "python"]),
    help="The gRPC front end: native (the Rust extension tensorgate_native: tonic, tokio) or "
    "python (grpc.aio); auto: native when the extension is installed. Both serve the same "
    "pipeline and wire surface (docs/architecture.md).",
)
@click.option(
    "--log-level",
    default="INFO",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
)
def serve(
    repository: Path | None,
    host: str,
    port: int,
    metrics_port: int,
    metrics_host: str | None,
    metrics_tls_cert: Path | None,
    metrics_tls_key: Path | None,
    metrics_token_file: Path | None,
    drain_timeout: float,
    max_message_bytes: int,
    max_inflight: int | None,
    max_tensor_elements: int,
    poll_interval: float | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    tls_client_ca: Path | None,
    auth_token_file: Path | None,
    admin_token_file: Path | None,
    port_file: Path | None,
    require_models: int,
    workers: int,
    event_loop: str,
    front_end: str,
    log_level: str,
) -> None:
    """Serve every model in a repository over gRPC."""
    # SIGHUP reloads the credential files once the server runs (server/credentials.py); while
    # it starts, it must not end the process (the default action).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from ..app import serve as run
    from ..settings import ServerSettings

    if repository is None:
        repository = default_demo_dir()
        click.echo(f"no --repository given: serving the demo repository in {repository}", err=True)
        write_demo(repository)
    if not repository.is_dir():
        raise click.BadParameter(f"{repository} is not a directory", param_hint="--repository")
    if (tls_cert is None) != (tls_key is None):
        raise click.UsageError("TLS needs both --tls-cert and --tls-key")
    if tls_client_ca is not None and tls_cert is None:
        raise click.UsageError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    if (metrics_tls_cert is None) != (metrics_tls_key is None):
        raise click.UsageError("metrics TLS needs both --metrics-tls-cert and --metrics-tls-key")
    from ..auth import ADMIN_TOKEN_ENV, INFERENCE_TOKEN_ENV, read_token

    try:
        auth_token = read_token(auth_token_file, INFERENCE_TOKEN_ENV, "--auth-token-file")
        admin_token = read_token(admin_token_file, ADMIN_TOKEN_ENV, "--admin-token-file")
        read_token(metrics_token_file, None, "--metrics-token-file")
        if metrics_tls_cert is not None and metrics_tls_key is not None:
            from ..metrics_http import tls_context

            tls_context(metrics_tls_cert, metrics_tls_key)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    from ..eventloop import resolve
    from ..frontends import resolve as resolve_front_end

    try:
        resolve(event_loop)
        resolve_front_end(front_end)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    settings = ServerSettings(
        repository=repository,
        host=host,
        port=port,
        metrics_port=None if metrics_port < 0 else metrics_port,
        metrics_host=metrics_host,
        metrics_tls_cert=metrics_tls_cert,
        metrics_tls_key=metrics_tls_key,
        metrics_token_file=metrics_token_file,
        drain_timeout=drain_timeout,
        max_message_bytes=max_message_bytes,
        max_inflight=max_inflight,
        max_tensor_elements=max_tensor_elements,
        poll_interval=poll_interval,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_client_ca=tls_client_ca,
        auth_token=auth_token,
        admin_token=admin_token,
        auth_token_file=auth_token_file,
        admin_token_file=admin_token_file,
        port_file=port_file,
        require_models=require_models,
        event_loop=event_loop,
        front_end=front_end,
    )
    if workers == 0:
        from ..workers import available_cores

        workers = available_cores()
    if workers > 1:
        from ..workers import Supervisor

        sys.exit(Supervisor(settings, workers, log_level).run())
    from tensorgate.errors import TensorgateError

    from ..eventloop import run as run_on_loop

    try:
        run_on_loop(run(settings), settings.event_loop)
    except TensorgateError as e:  # the repository cannot be served as it is (e.g. half-written)
        raise click.ClickException(str(e)) from None
