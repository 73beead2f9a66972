"""Options shared by the client-side commands (infer, bench): how to reach a server that
uses TLS or bearer-token auth."""

from __future__ import annotations

from pathlib import Path

import click


def client_tls_options(fn):
    """--tls, --tls-ca, --tls-cert, --tls-key: how a command reaches a TLS server."""
    pem = click.Path(path_type=Path, dir_okay=False, exists=True)
    fn = click.option("--tls-key", type=pem, help="This client's key (mutual TLS).")(fn)
    fn = click.option(
        "--tls-cert", type=pem, help="This client's certificate, for mutual TLS (PEM)."
    )(fn)
    fn = click.option(
        "--tls-ca", type=pem, help="Use TLS; trust the server certificate this CA signed (PEM)."
    )(fn)
    return click.option("--tls", is_flag=True, help="Use TLS with the system's CA roots.")(fn)


def client_security_options(fn):
    """The TLS options and --token (a bearer token for a server with auth)."""
    fn = click.option(
        "--token",
        envvar="TENSORGATE_TOKEN",
        default=None,
        help="Bearer token for a server with auth (default: $TENSORGATE_TOKEN).",
    )(fn)
    return client_tls_options(fn)


def client_security(
    tls: bool, tls_ca: Path | None, tls_cert: Path | None, tls_key: Path | None
) -> dict[str, object]:
    """The TLS keyword arguments of ``Client`` from those options (checked)."""
    if (tls_cert is None) != (tls_key is None):
        raise click.UsageError("--tls-cert and --tls-key go together")
    return {"tls": tls, "tls_ca": tls_ca, "tls_cert": tls_cert, "tls_key": tls_key}
