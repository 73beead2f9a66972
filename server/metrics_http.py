"""The ``/metrics`` endpoint: Prometheus' text format over HTTP, or HTTPS, with an optional
bearer token.

Used by a single gateway process (server/app.py) and by the ``--workers`` supervisor
(server/workers.py) in place of ``prometheus_client.start_http_server``, which has no token
and does the TLS handshake on its one accepting thread (a client that connects and stays
silent would hold up every scrape). Here each connection gets a thread of its own, and the
handshake runs there, bounded by ``HANDSHAKE_TIMEOUT_S``.

- ``--metrics-tls-cert`` / ``--metrics-tls-key``: HTTPS with that certificate (PEM).
- ``--metrics-token-file``: every request must carry ``Authorization: Bearer <token>``;
  without it, or with another token, the answer is 401 with ``WWW-Authenticate: Bearer``.
  Compared in constant time, never logged.

Both are what a Prometheus scrape config sets (``scheme: https``, ``tls_config``,
``authorization.credentials_file``; docs/metrics.md). The token and the TLS context can be
replaced while the server runs (``set_token``, ``set_tls``): the next request uses them.
"""

from __future__ import annotations

import hmac
import logging
import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.registry import CollectorRegistry

from .auth import read_token
from .settings import ServerSettings

log = logging.getLogger(__name__)

#: Seconds a client may take to complete the TLS handshake before its connection is closed.
HANDSHAKE_TIMEOUT_S = 10.0
REALM = 'Bearer realm="tensorgate metrics"'


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server TLS context for ``cert`` (chain, PEM) and its ``key``. Raises ValueError
    naming the file when they cannot be used."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile=str(cert), keyfile=str(key))
    except (OSError, ssl.SSLError) as e:
        raise ValueError(
            f"--metrics-tls-cert {cert} / --metrics-tls-key {key} cannot be used: {e}"
        ) from None
    return context


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged (one every few seconds, forever)."""


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True
    tls: ssl.SSLContext | None = None

    def finish_request(self, request: Any, client_address: Any) -> None:
        """Runs on the connection's own thread: the TLS handshake happens here."""
        tls = self.tls
        if tls is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(HANDSHAKE_TIMEOUT_S)
        try:
            secure = tls.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError) as e:
            log.debug("metrics: TLS handshake with %s failed: %s", client_address, e)
            return
        try:
            secure.settimeout(None)
            super().finish_request(secure, client_address)
        finally:
            secure.close()


def _family(host: str, port: int) -> socket.AddressFamily:
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    return infos[0][0]


class MetricsServer:
    """``/metrics`` of ``registry`` on ``host:port`` (0: any free port) in daemon threads.
    ``port`` is the port bound. ``close()`` stops it."""

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str,
        port: int,
        *,
        tls: ssl.SSLContext | None = None,
        token: str | None = None,
    ) -> None:
        self._token = token
        self._metrics = make_wsgi_app(registry)

        class Server(_Server):
            address_family = _family(host, port)

        self._httpd = make_server(host, port, self._app, Server, handler_class=_Quiet)
        self._httpd.tls = tls
        self.port: int = self._httpd.server_port
        self.scheme = "https" if tls is not None else "http"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="metrics-http", daemon=True
        )
        self._thread.start()

    def set_token(self, token: str | None) -> None:
        self._token = token

    def set_tls(self, tls: ssl.SSLContext) -> None:
        """New connections use ``tls`` (only for a server started with TLS)."""
        if self._httpd.tls is None:
            raise ValueError("the metrics endpoint was started without TLS")
        self._httpd.tls = tls

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        token = self._token
        if token is not None:
            scheme, _, presented = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                presented.strip().encode(), token.encode()
            ):
                body = b"401 Unauthorized: send 'Authorization: Bearer <token>'\n"
                start_response(
                    "401 Unauthorized",
                    [
                        ("Content-Type", "text/plain; charset=utf-8"),
                        ("Content-Length", str(len(body))),
                        ("WWW-Authenticate", REALM),
                    ],
                )
                return [body]
        return self._metrics(environ, start_response)

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


def start_metrics(registry: CollectorRegistry, settings: ServerSettings) -> MetricsServer | None:
    """The /metrics endpoint ``settings`` ask for (None: ``metrics_port`` is None). Raises
    ValueError naming the file when the token or the TLS files cannot be used."""
    s = settings
    if s.metrics_port is None:
        return None
    if (s.metrics_tls_cert is None) != (s.metrics_tls_key is None):
        raise ValueError("metrics TLS needs both --metrics-tls-cert and --metrics-tls-key")
    tls = None
    if s.metrics_tls_cert is not None and s.metrics_tls_key is not None:
        tls = tls_context(s.metrics_tls_cert, s.metrics_tls_key)
    token = read_token(s.metrics_token_file, None, "--metrics-token-file")
    return MetricsServer(registry, s.metrics_host or s.host, s.metrics_port, tls=tls, token=token)
