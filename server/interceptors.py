"""The one place where domain errors become gRPC statuses."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from tensorgate.errors import TensorgateError

log = logging.getLogger(__name__)


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


async def _abort_for(exc: Exception, context: grpc.aio.ServicerContext, method: str) -> None:
    await context.abort(*status_of(exc, method))


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turns TensorgateError (and anything unexpected) into a precise gRPC status."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    return await inner(request, context)
                except grpc.aio.AbortError:
                    raise
                except Exception as e:
                    await _abort_for(e, context, method)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None or handler.stream_stream is not None:
            streaming = handler.unary_stream or handler.stream_stream
            factory = (
                grpc.unary_stream_rpc_method_handler
                if handler.unary_stream is not None
                else grpc.stream_stream_rpc_method_handler
            )

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    result = streaming(request, context)
                    if inspect.isawaitable(result):  # a handler that writes via context.write
                        await result
                        return
                    async for item in result:
                        yield item
                except grpc.aio.AbortError:
                    raise
                except Exception as e:
                    await _abort_for(e, context, method)

            return factory(
                stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler
