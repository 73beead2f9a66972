"""Options shared by the commands: how a client-side command (``infer``, ``bench``,
``routes``, ``health``) reaches a server that uses TLS or bearer-token auth."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import grpc

from tensorgate.channel import auth_metadata, client_credentials

#: Where `serve` writes its port file and `health` reads it when no flag says (docs/deploy.md).
PORT_FILE_ENV = "TENSORGATE_PORT_FILE"

#: A file that must exist (certificates, keys, token files).
EXISTING_FILE = click.Path(path_type=Path, dir_okay=False, exists=True)


@dataclass(frozen=True)
class ClientSecurity:
    """What the TLS options and ``--token`` asked for."""

    tls: bool = False
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    token: str | None = None

    def credentials(self) -> grpc.ChannelCredentials | None:
        """TLS channel credentials, or None for plaintext."""
        return client_credentials(self.tls, self.ca, self.cert, self.key)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The call metadata that carries the token (empty without one)."""
        return auth_metadata(self.token)

    def client_kwargs(self) -> dict[str, Any]:
        """The security keyword arguments of ``tensorgate.clients.Client``."""
        return {
            "tls": self.tls,
            "tls_ca": self.ca,
            "tls_cert": self.cert,
            "tls_key": self.key,
            "token": self.token,
        }


def _gathered(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Hand the command one ``security: ClientSecurity`` instead of the option values."""

    @functools.wraps(fn)
    def command(
        *args: Any,
        tls: bool,
        tls_ca: Path | None,
        tls_cert: Path | None,
        tls_key: Path | None,
        token: str | None = None,
        **kwargs: Any,
    ) -> Any:
        if (tls_cert is None) != (tls_key is None):
            raise click.UsageError("--tls-cert and --tls-key go together")
        security = ClientSecurity(tls, tls_ca, tls_cert, tls_key, token)
        return fn(*args, security=security, **kwargs)

    return command


def _tls_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--tls-key", type=EXISTING_FILE, help="This client's key (mutual TLS).")(fn)
    fn = click.option(
        "--tls-cert", type=EXISTING_FILE, help="This client's certificate, for mutual TLS (PEM)."
    )(fn)
    fn = click.option(
        "--tls-ca",
        type=EXISTING_FILE,
        help="Use TLS; trust the server certificate this CA signed (PEM).",
    )(fn)
    return click.option("--tls", is_flag=True, help="Use TLS with the system's CA roots.")(fn)


def client_tls_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--tls, --tls-ca, --tls-cert, --tls-key, handed to the command as ``security``."""
    return _tls_options(_gathered(fn))


def client_security_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The TLS options and --token (a bearer token for a server with auth), handed to the
    command as ``security``."""
    fn = click.option(
        "--token",
        envvar="TENSORGATE_TOKEN",
        default=None,
        help="Bearer token for a server with auth (default: $TENSORGATE_TOKEN).",
    )(_gathered(fn))
    return _tls_options(fn)
