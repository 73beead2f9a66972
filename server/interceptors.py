"""The one place where domain errors become gRPC statuses.

``status_of`` maps an exception to a status. ``map_errors`` applies it to every RPC method
of a servicer, once, when the server is built: a unary call aborts with the status; a
streamed request answers with it in ``error_message`` (``servicer.ModelStreamInfer``).
Wrapping the methods at start-up, rather than a ``grpc.aio.ServerInterceptor``, keeps the
per-call path free: an interceptor runs a coroutine and builds a method handler for every
call (docs/benchmarks.md, "Where a request's time goes").
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.descriptor import ServiceDescriptor

from tensorgate.errors import TensorgateError

log = logging.getLogger(__name__)

S = TypeVar("S")


def status_of(exc: Exception, method: str) -> tuple[grpc.StatusCode, str]:
    """The gRPC status a failed call answers with: a domain error's own code and message,
    anything unexpected INTERNAL (and logged). Unary calls abort with it; a streamed
    request answers with it in ``error_message`` while its stream goes on."""
    if isinstance(exc, TensorgateError):
        return exc.code, str(exc)
    if isinstance(exc, NotImplementedError):
        return grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented"
    log.error("unexpected error in %s", method, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


def map_errors(servicer: S, service: ServiceDescriptor) -> S:
    """Make each of ``service``'s methods on ``servicer`` answer an exception with its
    status (``status_of``). Call before registering the servicer; returns it."""
    for method in service.methods:
        handler = getattr(servicer, method.name)
        if inspect.isasyncgenfunction(handler):
            wrapped = _streaming(handler, method.name)
        else:
            wrapped = _unary(handler, method.name)
        setattr(servicer, method.name, wrapped)
    return servicer


def _unary(handler: Callable[..., Any], name: str) -> Callable[..., Any]:
    @functools.wraps(handler)
    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await handler(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            await context.abort(*status_of(e, name))

    return unary


def _streaming(handler: Callable[..., Any], name: str) -> Callable[..., Any]:
    @functools.wraps(handler)
    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for reply in handler(request, context):
                yield reply
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            await context.abort(*status_of(e, name))

    return streaming
