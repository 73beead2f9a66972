"""The ``tensorgate`` command: serve, demo, infer."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path

import click
import numpy as np

from tensorgate.datatypes import by_name
from tensorgate.limits import MAX_MESSAGE_BYTES

from .cli_options import client_security, client_security_options, client_tls_options

#: Where `serve` writes its port file and `health` reads it when no flag says (docs/deploy.md).
PORT_FILE_ENV = "TENSORGATE_PORT_FILE"


def default_demo_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tensorgate" / "demo"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tensorgate")
def main() -> None:
    """tensorgate: one Open Inference Protocol gRPC gateway for TorchScript, SavedModel and ONNX."""


@main.command()
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
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="Serve gRPC over TLS with this certificate chain (PEM); needs --tls-key.",
)
@click.option(
    "--tls-key",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="The private key of --tls-cert (PEM).",
)
@click.option(
    "--tls-client-ca",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="Mutual TLS: require client certificates signed by this CA (PEM).",
)
@click.option(
    "--auth-token-file",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="Require 'authorization: Bearer <token>' with the token in this file for "
    "inference RPCs. Default: $TENSORGATE_AUTH_TOKEN when set, else no auth.",
)
@click.option(
    "--admin-token-file",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
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
    log_level: str,
) -> None:
    """Serve every model in a repository over gRPC."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from .app import serve as run
    from .settings import ServerSettings

    if repository is None:
        repository = default_demo_dir()
        click.echo(f"no --repository given: serving the demo repository in {repository}", err=True)
        _write_demo(repository)
    if not repository.is_dir():
        raise click.BadParameter(f"{repository} is not a directory", param_hint="--repository")
    if (tls_cert is None) != (tls_key is None):
        raise click.UsageError("TLS needs both --tls-cert and --tls-key")
    if tls_client_ca is not None and tls_cert is None:
        raise click.UsageError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    from .auth import ADMIN_TOKEN_ENV, INFERENCE_TOKEN_ENV, read_token

    try:
        auth_token = read_token(auth_token_file, INFERENCE_TOKEN_ENV, "--auth-token-file")
        admin_token = read_token(admin_token_file, ADMIN_TOKEN_ENV, "--admin-token-file")
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    settings = ServerSettings(
        repository=repository,
        host=host,
        port=port,
        metrics_port=None if metrics_port < 0 else metrics_port,
        metrics_host=metrics_host,
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
        port_file=port_file,
        require_models=require_models,
    )
    if workers == 0:
        from .workers import available_cores

        workers = available_cores()
    if workers > 1:
        from .workers import Supervisor

        sys.exit(Supervisor(settings, workers, log_level).run())
    from tensorgate.errors import TensorgateError

    try:
        asyncio.run(run(settings))
    except TensorgateError as e:  # the repository cannot be served as it is (e.g. half-written)
        raise click.ClickException(str(e)) from None


@main.command()
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
def demo(directory: Path) -> None:
    """Write the demo model repository to DIRECTORY (models are generated, not downloaded)."""
    logging.basicConfig(level="INFO", format="%(levelname)s %(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    _write_demo(directory)
    for p in sorted(directory.rglob("*")):
        if p.is_file() and "variables" not in p.parts and p.name != ".complete":
            click.echo(p.relative_to(directory))


def _write_demo(directory: Path) -> None:
    from .demo import write_demo_repository

    try:
        write_demo_repository(directory)
    except OSError as e:  # the message says what is wrong with DIRECTORY
        raise click.ClickException(e.strerror or str(e)) from None


def _parse_input(spec: str, meta: dict[str, dict]) -> tuple[str, np.ndarray]:
    name, sep, value = spec.partition("=")
    if not sep:
        raise click.BadParameter(f"'{spec}': use NAME=FILE.npy or NAME=JSON", param_hint="--input")
    tensor = meta.get(name)
    if tensor is None:
        raise click.BadParameter(
            f"the model has no input '{name}'; inputs: {list(meta)}", param_hint="--input"
        )
    dt = by_name(tensor["datatype"])
    if value.endswith(".npy"):
        arr = np.load(value, allow_pickle=False)
    else:
        try:
            data = json.loads(value)
        except json.JSONDecodeError as e:
            raise click.BadParameter(
                f"{name}: not a .npy file or JSON: {e}", param_hint="--input"
            ) from None
        if dt.name == "BYTES":
            arr = np.array(data, dtype=object)
            arr = np.vectorize(lambda s: s.encode() if isinstance(s, str) else s, otypes=[object])(
                arr
            )
        else:
            arr = np.array(data, dtype=dt.numpy)
    return name, arr


def _random_input(tensor: dict) -> np.ndarray:
    dt = by_name(tensor["datatype"])
    shape = [1 if int(d) < 0 else int(d) for d in tensor.get("shape", [])]
    rng = np.random.default_rng()
    if dt.name == "BYTES":
        return np.array([b"tensorgate"] * int(np.prod(shape)), dtype=object).reshape(shape)
    if dt.name == "BOOL":
        return rng.integers(0, 2, shape).astype(bool)
    if dt.numpy.kind in "iu":
        return rng.integers(0, 10, shape).astype(dt.numpy)
    return rng.standard_normal(shape).astype(dt.numpy)


@main.command()
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
    tls: bool,
    tls_ca: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    token: str | None,
) -> None:
    """Call MODEL once and print its outputs."""
    from tensorgate.clients import Client, InferenceError

    security = client_security(tls, tls_ca, tls_cert, tls_key)
    with Client(url, token=token, **security) as client:
        try:
            meta = client.model_metadata(model, version, timeout=timeout)
            by_input = {t["name"]: t for t in meta.get("inputs", [])}
            tensors = dict(_parse_input(s, by_input) for s in inputs)
            if random_inputs:
                for name, t in by_input.items():
                    tensors.setdefault(name, _random_input(t))
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


@main.command()
@click.option(
    "--metrics-url",
    default="http://127.0.0.1:8002/metrics",
    show_default=True,
    help="The gateway's Prometheus endpoint.",
)
@click.option(
    "--interval",
    default=2.0,
    show_default=True,
    type=float,
    help="Seconds between the two scrapes each figure is computed over.",
)
@click.option("--once", is_flag=True, help="Print one table and exit (no live view).")
@click.option("--json", "as_json", is_flag=True, help="With --once: print JSON rows.")
def top(metrics_url: str, interval: float, once: bool, as_json: bool) -> None:
    """Live per-model, per-backend requests/s, errors, latency percentiles, queue vs compute."""
    from dataclasses import asdict

    from rich.console import Console
    from rich.live import Live

    from . import top as view

    console = Console(width=None if sys.stdout.isatty() else 160)
    try:
        before = view.scrape(metrics_url)
        if once:
            time.sleep(interval)
            data = view.rows(before, view.scrape(metrics_url))
            if as_json:
                click.echo(json.dumps([asdict(r) for r in data]))
            else:
                console.print(view.table(data, f"tensorgate {metrics_url} ({interval:g} s)"))
            return
        with Live(console=console, auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                after = view.scrape(metrics_url)
                title = f"tensorgate {metrics_url} (every {interval:g} s, Ctrl-C to quit)"
                live.update(view.table(view.rows(before, after), title), refresh=True)
                before = after
    except KeyboardInterrupt:
        pass
    except OSError as e:
        click.echo(f"error: cannot read {metrics_url}: {e}", err=True)
        sys.exit(1)


@main.command()
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
    tls: bool,
    tls_ca: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
) -> None:
    """Ask a server's grpc.health.v1 service; exit 0 when SERVING, 1 otherwise.

    The container HEALTHCHECK runs this (with the image's $TENSORGATE_PORT_FILE, so it
    follows any --port); Kubernetes probes ask the same service natively.
    """
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tensorgate.clients.client import tls_credentials

    if url is None:
        url = f"127.0.0.1:{_served_port(port_file) if port_file is not None else 8001}"
    request = health_pb2.HealthCheckRequest(service=service)
    if tls or tls_ca or tls_cert or tls_key:
        channel = grpc.secure_channel(url, tls_credentials(tls_ca, tls_cert, tls_key))
    else:
        channel = grpc.insecure_channel(url)
    with channel:
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


from .bench import bench  # noqa: E402 - the load generator lives in its own module
from .routes_cli import routes  # noqa: E402 - the admin commands live in their own module

main.add_command(routes)
main.add_command(bench)


if __name__ == "__main__":
    main()
