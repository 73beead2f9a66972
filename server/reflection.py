"""Server reflection that also answers for method symbols (``package.Service.Method``).

grpcio-reflection looks every symbol up with ``DescriptorPool.FindFileContainingSymbol``.
With protobuf's upb backend (the default since protobuf 4) that lookup knows messages,
enums, services and fields, but not a service's methods, so ``grpcurl describe
inference.GRPCInferenceService.ModelInfer`` answered "Symbol not found" for every service.
A method lives in the file of its service, so this servicer asks for the service instead
and echoes the client's own request back, as the protocol wants.

grpcio-reflection ships only the v1alpha protos, while the gateway serves
``grpc.reflection.v1`` too (grpcurl asks v1 first): ``register_v1_descriptor`` adds the v1
file to the pool, so that the listed v1 service can be described like every other.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable

from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2

V1_PACKAGE = "grpc.reflection.v1"
V1_FILE = "grpc/reflection/v1/reflection.proto"


def register_v1_descriptor(pool: descriptor_pool.DescriptorPool) -> None:
    """Add ``grpc.reflection.v1``'s file to ``pool`` unless it holds one already.

    v1 is v1alpha under another package name (the same messages, fields and numbers), so
    the file is v1alpha's descriptor with the package renamed.
    """
    try:
        pool.FindFileContainingSymbol(f"{V1_PACKAGE}.ServerReflection")
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    alpha = proto.package
    proto.name, proto.package = V1_FILE, V1_PACKAGE
    # Type references are fully qualified (".grpc.reflection.v1alpha.X"): move them too.
    for message in proto.message_type:
        for field in message.field:
            if field.type_name.startswith(f".{alpha}."):
                field.type_name = f".{V1_PACKAGE}." + field.type_name[len(alpha) + 2 :]
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(f".{alpha}.", f".{V1_PACKAGE}.", 1)
            method.output_type = method.output_type.replace(f".{alpha}.", f".{V1_PACKAGE}.", 1)
    proto.options.Clear()  # language options name the v1alpha packages
    pool.Add(proto)


def containing_symbol(pool: descriptor_pool.DescriptorPool, symbol: str) -> str:
    """A symbol whose file is the file of ``symbol``: the service for a method the pool
    cannot look up itself, else ``symbol`` unchanged (unknown ones stay unknown)."""
    try:
        pool.FindFileContainingSymbol(symbol)
        return symbol
    except KeyError:
        pass
    service_name, _, method = symbol.rpartition(".")
    try:
        service = pool.FindServiceByName(service_name)
    except KeyError:
        return symbol
    return service_name if method in service.methods_by_name else symbol


class MethodAwareReflectionServicer(reflection.aio.ReflectionServicer):
    """grpc_reflection's asyncio servicer, resolving method symbols to their service's
    file. Serves ``grpc.reflection.v1alpha`` and, registered under that name too,
    ``grpc.reflection.v1`` (the same messages)."""

    def __init__(
        self, service_names: Iterable[str], pool: descriptor_pool.DescriptorPool | None = None
    ) -> None:
        self._symbols_pool = pool if pool is not None else descriptor_pool.Default()
        register_v1_descriptor(self._symbols_pool)
        super().__init__(service_names, pool=self._symbols_pool)

    async def ServerReflectionInfo(
        self,
        request_iterator: AsyncIterable[reflection_pb2.ServerReflectionRequest],
        context: object,
    ) -> AsyncIterator[reflection_pb2.ServerReflectionResponse]:
        # The base servicer answers each request in order, once: pair answers with the
        # requests as the client sent them.
        originals: deque[reflection_pb2.ServerReflectionRequest] = deque()

        async def resolved() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
            async for request in request_iterator:
                originals.append(request)
                if request.HasField("file_containing_symbol"):
                    symbol = containing_symbol(self._symbols_pool, request.file_containing_symbol)
                    if symbol != request.file_containing_symbol:
                        request = reflection_pb2.ServerReflectionRequest(
                            host=request.host, file_containing_symbol=symbol
                        )
                yield request

        async for response in super().ServerReflectionInfo(resolved(), context):
            response.original_request.CopyFrom(originals.popleft())
            yield response
