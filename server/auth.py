"""Bearer-token authentication for the gRPC port, as one ``grpc.aio`` server interceptor.

Two tokens, each optional, each checked on its own RPCs only:

- the **inference token** (``--auth-token-file`` / ``TENSORGATE_AUTH_TOKEN``) for
  ``inference.GRPCInferenceService`` (ModelInfer, ModelStreamInfer, metadata, readiness,
  statistics);
- the **admin token** (``--admin-token-file`` / ``TENSORGATE_ADMIN_TOKEN``) for what changes
  or reveals the deployment: the repository RPCs (RepositoryIndex, RepositoryModelLoad,
  RepositoryModelUnload) and the ``tensorgate.admin.v1`` service. When no admin token is
  set, those RPCs take the inference token instead, so turning on inference auth never
  leaves model loading open.

Health (``grpc.health.v1``) and server reflection stay open: probes and tools must work
without credentials, and neither reveals more than the service names.

Clients send ``authorization: Bearer <token>`` metadata. A missing or wrong token is
UNAUTHENTICATED; tokens are compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from tensorgate.errors import TensorgateError
from tensorgate.protos import admin_pb2
from tensorgate.protos import grpc_service_pb2 as pb

from .interceptors import status_of

INFERENCE_TOKEN_ENV = "TENSORGATE_AUTH_TOKEN"
ADMIN_TOKEN_ENV = "TENSORGATE_ADMIN_TOKEN"

_INFERENCE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
#: Methods that need the admin token: they load, unload or list models, or change routing.
ADMIN_METHODS = frozenset(
    f"/{_INFERENCE}/{m}"
    for m in ("RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload")
)
ADMIN_PREFIXES = tuple(f"/{s.full_name}/" for s in admin_pb2.DESCRIPTOR.services_by_name.values())
#: Methods open to everyone: health checks and server reflection.
OPEN_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


class Unauthenticated(TensorgateError):
    """The call carries no token, or not the one its RPC needs."""

    code = grpc.StatusCode.UNAUTHENTICATED


def read_token(path: Path | None, env: str, what: str) -> str | None:
    """The token in file ``path`` (surrounding whitespace removed), else in environment
    variable ``env``, else None. Raises ValueError for an empty or unreadable token."""
    if path is not None:
        try:
            token = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{what} file {path} cannot be read: {e}") from None
        if not token:
            raise ValueError(f"{what} file {path} is empty")
        return token
    value = os.environ.get(env)
    if value is None:
        return None
    if not value.strip():
        raise ValueError(f"environment variable {env} is set but empty")
    return value.strip()


@dataclass(frozen=True)
class TokenPolicy:
    """Which token each RPC needs. ``None`` tokens are not required."""

    inference_token: str | None = None
    admin_token: str | None = None

    @property
    def enabled(self) -> bool:
        return self.inference_token is not None or self.admin_token is not None

    def required(self, method: str) -> tuple[str, str] | None:
        """(token, which) that ``method`` (a full '/service/Method' path) needs, or None."""
        if method.startswith(OPEN_PREFIXES):
            return None
        if method in ADMIN_METHODS or method.startswith(ADMIN_PREFIXES):
            if self.admin_token is not None:
                return self.admin_token, "admin token"
            if self.inference_token is not None:
                return self.inference_token, "token"
            return None
        if self.inference_token is not None:
            return self.inference_token, "token"
        return None

    def refusal(
        self, method: str, metadata: Sequence[tuple[str, Any]] | None
    ) -> Unauthenticated | None:
        """Why a call of ``method`` with ``metadata`` is refused, or None when it may go on."""
        needed = self.required(method)
        if needed is None:
            return None
        token, which = needed
        presented = bearer_token(metadata)
        if presented is None:
            return Unauthenticated(
                f"this call needs the server's {which}: send metadata "
                "'authorization: Bearer <token>'"
            )
        if not _matches(presented, token):
            return Unauthenticated(f"the bearer token is not the {which}")
        return None


def bearer_token(metadata: Sequence[tuple[str, Any]] | None) -> str | None:
    """The token of the ``authorization: Bearer <token>`` entry, if there is one."""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def _matches(presented: str, expected: str) -> bool:
    return hmac.compare_digest(presented.encode("utf-8"), expected.encode("utf-8"))


def _refusal(handler: grpc.RpcMethodHandler, error: Unauthenticated) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that refuses with ``error``'s status. It
    takes the request undecoded: no work for a stranger."""
    status = status_of(error, "auth")

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(*status)

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await context.abort(*status)
        yield  # an async generator, as a streaming handler must be

    serializer = handler.response_serializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary, None, serializer)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(stream, None, serializer)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(unary, None, serializer)
    return grpc.stream_stream_rpc_method_handler(stream, None, serializer)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without the token their RPC needs (see the module docstring).

    Installed only when a token is configured: without one, calls pay nothing for it.
    """

    def __init__(self, policy: TokenPolicy) -> None:
        self.policy = policy

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        refused = self.policy.refusal(
            handler_call_details.method, handler_call_details.invocation_metadata
        )
        return handler if refused is None else _refusal(handler, refused)
