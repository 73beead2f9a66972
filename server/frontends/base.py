"""What a front end is given (``Services``) and what it must do (``FrontEnd``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..admin import RoutingAdminServicer
from ..auth import TokenPolicy
from ..servicer import InferenceServicer
from ..settings import ServerSettings


@dataclass
class Services:
    """What a front end serves: the one implementation of each service, shared by both."""

    settings: ServerSettings
    inference: InferenceServicer
    admin: RoutingAdminServicer
    tokens: TokenPolicy


class FrontEnd(Protocol):
    """One gRPC server: binds ``settings.host:port`` (SO_REUSEPORT with ``--workers``),
    serves ``Services`` plus grpc.health.v1 and server reflection, and drains on ``stop``."""

    #: "python" or "native", as logged at start-up.
    name: str
    #: The bound gRPC port, once started.
    port: int

    async def start(self) -> None:
        """Bind and serve. Raises OSError when the port cannot be bound, ValueError for TLS
        settings that do not fit together."""

    async def set_health(self, service: str, serving: bool) -> None:
        """grpc.health.v1 status of ``service`` ("" is the server itself)."""

    async def enter_graceful_shutdown(self) -> None:
        """Every health entry NOT_SERVING from now on, whatever is set later."""

    def end_streams(self) -> None:
        """The drain begins: each open ModelStreamInfer ends (OK) once nothing is in flight
        on it."""

    async def stop(self, grace: float) -> None:
        """Stop accepting (GOAWAY, port closed) and let calls in flight finish, for at most
        ``grace`` seconds; then cancel what is left. Returns once stopped."""

    async def wait(self) -> None:
        """Return when the server has stopped."""

    def reload_tls(self, cert_pem: bytes, key_pem: bytes, client_ca_pem: bytes | None) -> None:
        """New TLS handshakes use this certificate chain, private key and client CA (PEM,
        already checked: server/credentials.py); open connections and their calls go on.
        Called on the event loop, only when the port was started with TLS."""
