"""How a client reaches a server: TLS credentials, bearer-token metadata, and the channel.

One place for the Python client, the client-side commands (``infer``, ``bench``,
``routes``, ``health``) and the remote backend, so each reaches a TLS or token-protected
server the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

PemSource = str | Path | bytes


def _pem(value: PemSource | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


def tls_credentials(
    ca: PemSource | None = None, cert: PemSource | None = None, key: PemSource | None = None
) -> grpc.ChannelCredentials:
    """Channel credentials for a TLS server. ``ca``: the CA that signed the server's
    certificate (default: the system's roots); ``cert`` and ``key``: this client's
    certificate and key, for a server that requires mutual TLS. Each is PEM bytes or a path."""
    if (cert is None) != (key is None):
        raise ValueError("a client certificate needs its key, and a key its certificate")
    return grpc.ssl_channel_credentials(
        root_certificates=_pem(ca), private_key=_pem(key), certificate_chain=_pem(cert)
    )


def client_credentials(
    tls: bool = False,
    ca: PemSource | None = None,
    cert: PemSource | None = None,
    key: PemSource | None = None,
) -> grpc.ChannelCredentials | None:
    """TLS credentials when ``tls`` is true or any of ``ca``, ``cert``, ``key`` is given;
    None (plaintext) otherwise."""
    if tls or any(v is not None for v in (ca, cert, key)):
        return tls_credentials(ca, cert, key)
    return None


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata that carries a bearer token (empty without one)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def open_channel(
    target: str,
    credentials: grpc.ChannelCredentials | None = None,
    options: Sequence[tuple[str, Any]] = (),
    *,
    aio: bool = False,
) -> Any:
    """A ``grpc`` (or, with ``aio``, a ``grpc.aio``) channel to ``target``: secure with
    ``credentials``, plaintext without."""
    api: Any = grpc.aio if aio else grpc
    if credentials is not None:
        return api.secure_channel(target, credentials, options=list(options))
    return api.insecure_channel(target, options=list(options))
