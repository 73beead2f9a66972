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

The policy's tokens are replaced in place when the token files change
(server/credentials.py, ``TokenPolicy.replace``): the interceptor asks the policy once per
call, so a call is judged by the tokens in force when it arrives, and calls already accepted
are never revisited.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
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


def parse_token(data: bytes, path: Path, what: str) -> str:
    """The token in the contents ``data`` of file ``path`` (surrounding whitespace removed).
    Raises ValueError naming the file when it is not UTF-8 or holds no token."""
    try:
        token = data.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} file {path} cannot be read: {e}") from None
    if not token:
        raise ValueError(f"{what} file {path} is empty")
    return token


def read_token(path: Path | None, env: str | None, what: str) -> str | None:
    """The token in file ``path``, else in environment variable ``env``, else None. Raises
    ValueError for an empty or unreadable token."""
    if path is not None:
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ValueError(f"{what} file {path} cannot be read: {e}") from None
        return parse_token(data, path, what)
    if env is None:
        return None
    value = os.environ.get(env)
    if value is None:
        return None
    if not value.strip():
        raise ValueError(f"environment variable {env} is set but empty")
    return value.strip()


class TokenPolicy:
    """Which token each RPC needs. ``None`` tokens are not required.

    One object for the life of the server: ``replace`` swaps its tokens in place, so every
    front end that holds it follows a reload.
    """

    def __init__(self, inference_token: str | None = None, admin_token: str | None = None):
        # One tuple, replaced in one assignment: a call sees the old pair or the new one.
        self._tokens = (inference_token, admin_token)
        self._listeners: list[Callable[[], None]] = []

    @property
    def inference_token(self) -> str | None:
        return self._tokens[0]

    @property
    def admin_token(self) -> str | None:
        return self._tokens[1]

    @property
    def enabled(self) -> bool:
        return self._tokens != (None, None)

    def replace(self, other: TokenPolicy) -> None:
        """Take ``other``'s tokens from the next call on (a reload), then tell the listeners."""
        self._tokens = other._tokens
        for listener in self._listeners:
            listener()

    def on_replace(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` after each ``replace``: for a holder that copies a token out
        (e.g. into a native server) instead of asking the policy per call."""
        self._listeners.append(listener)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TokenPolicy) and self._tokens == other._tokens

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:  # never print the tokens
        inference, admin = ("<set>" if t is not None else None for t in self._tokens)
        return f"TokenPolicy(inference_token={inference}, admin_token={admin})"

    def required(self, method: str) -> tuple[str, str] | None:
        """(token, which) that ``method`` (a full '/service/Method' path) needs, or None."""
        inference, admin = self._tokens
        if method.startswith(OPEN_PREFIXES):
            return None
        if method in ADMIN_METHODS or method.startswith(ADMIN_PREFIXES):
            if admin is not None:
                return admin, "admin token"
            if inference is not None:
                return inference, "token"
            return None
        if inference is not None:
            return inference, "token"
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
    The policy's tokens may be replaced at any time (a reload); each call reads them once.
    """

    def __init__(self, policy: TokenPolicy) -> None:
        self.policy = policy

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        # The tokens of now: a rotation while the handler is looked up does not refuse a call
        # that carried the credentials in force when it was made.
        refused = self.policy.refusal(
            handler_call_details.method, handler_call_details.invocation_metadata
        )
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return handler if refused is None else _refusal(handler, refused)
