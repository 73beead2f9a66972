"""The tensorgate Python client: one class, a synchronous face and an asyncio face.

Each call is written once, as a generator that builds the request, yields it, and turns the
reply into Python values; the two faces differ only in how they drive that generator over
a channel (``grpc`` or ``grpc.aio``)::

    with Client("127.0.0.1:8001") as client:
        result = client.infer("scorer", {"input": x})
        result["output"], result.variant

        result = await client.aio.infer("scorer", {"input": x})

With ``Client(target, stream=True)`` each face sends its ``infer`` calls over a few
long-lived ModelStreamInfer streams, one per channel, instead of a unary call each: the
high-throughput way to call the gateway (``clients/stream.py``). Every other call stays
unary.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Generator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc
import numpy as np
from google.protobuf import json_format
from google.protobuf.message import Message

from tensorgate import codec
from tensorgate.channel import PemSource, auth_metadata, client_credentials, open_channel
from tensorgate.limits import MAX_MESSAGE_BYTES
from tensorgate.protos import grpc_service_pb2 as pb
from tensorgate.protos import grpc_service_pb2_grpc as pb_grpc

from .errors import InferenceError
from .stream import StreamMux, ThreadedStreamMux

VARIANT_METADATA_KEY = "tensorgate-variant"
T = TypeVar("T")
#: Streams (each on a channel and connection of its own) that ``stream=True`` opens per face.
#: One stream carries one message per gRPC operation; a few let both ends batch their
#: socket writes and wake-ups, and spread over the processes of ``serve --workers``.
DEFAULT_STREAMS = 4


class InferResult(dict[str, np.ndarray]):
    """Outputs by name, plus which model variant served them."""

    def __init__(self, outputs: Mapping[str, np.ndarray], model: str, variant: str, id: str):
        super().__init__(outputs)
        self.model = model
        self.variant = variant
        self.id = id


@dataclass
class _Call:
    method: str  # GRPCInferenceService method name
    request: Message
    timeout: float | None = None


# A call: yields one or more _Call, receives (reply, trailing metadata), returns the result.
_Op = Generator[_Call, tuple[Any, dict[str, str]], T]


class _op(Generic[T]):
    """Marks a generator method as a client call; each face binds it to its own driver."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        functools.update_wrapper(self, fn)

    def __get__(self, face: Any, owner: type | None = None) -> Any:
        if face is None:
            return self
        return functools.update_wrapper(functools.partial(face._drive, self.fn, face), self.fn)


def _as_dict(msg: Message) -> dict[str, Any]:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


class _Calls:
    """Every call the client offers, written once."""

    @_op
    def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        version: str | None = None,
        timeout: float | None = None,
        outputs: Iterable[str] = (),
        parameters: Mapping[str, object] | None = None,
        request_id: str = "",
    ) -> _Op[InferResult]:
        """Run ``model`` on ``inputs``; returns {output name: array} with ``.variant`` set.
        ``version`` pins a variant; ``timeout`` (seconds) becomes the call's deadline."""
        request = codec.encode_request(
            model, inputs, version or "", outputs, request_id, parameters
        )
        reply, trailing = yield _Call("ModelInfer", request, timeout)
        variant = reply.model_version or trailing.get(VARIANT_METADATA_KEY, "")
        return InferResult(codec.decode_response(reply), reply.model_name, variant, reply.id)

    @_op
    def is_live(self, timeout: float | None = None) -> _Op[bool]:
        reply, _ = yield _Call("ServerLive", pb.ServerLiveRequest(), timeout)
        return reply.live

    @_op
    def is_ready(self, timeout: float | None = None) -> _Op[bool]:
        reply, _ = yield _Call("ServerReady", pb.ServerReadyRequest(), timeout)
        return reply.ready

    @_op
    def is_model_ready(
        self, model: str, version: str | None = None, timeout: float | None = None
    ) -> _Op[bool]:
        request = pb.ModelReadyRequest(name=model, version=version or "")
        reply, _ = yield _Call("ModelReady", request, timeout)
        return reply.ready

    @_op
    def server_metadata(self, timeout: float | None = None) -> _Op[dict[str, Any]]:
        reply, _ = yield _Call("ServerMetadata", pb.ServerMetadataRequest(), timeout)
        return _as_dict(reply)

    @_op
    def model_metadata(
        self, model: str, version: str | None = None, timeout: float | None = None
    ) -> _Op[dict[str, Any]]:
        request = pb.ModelMetadataRequest(name=model, version=version or "")
        reply, _ = yield _Call("ModelMetadata", request, timeout)
        return _as_dict(reply)

    @_op
    def model_config(
        self, model: str, version: str | None = None, timeout: float | None = None
    ) -> _Op[dict[str, Any]]:
        request = pb.ModelConfigRequest(name=model, version=version or "")
        reply, _ = yield _Call("ModelConfig", request, timeout)
        return _as_dict(reply.config)

    @_op
    def model_statistics(
        self, model: str = "", version: str | None = None, timeout: float | None = None
    ) -> _Op[list[dict[str, Any]]]:
        """ModelStatistics: one dict per model version (every model's when ``model`` is
        empty), as protobuf's JSON mapping writes it (64-bit counts are strings)."""
        request = pb.ModelStatisticsRequest(name=model, version=version or "")
        reply, _ = yield _Call("ModelStatistics", request, timeout)
        return [_as_dict(s) for s in reply.model_stats]

    @_op
    def repository_index(self, timeout: float | None = None) -> _Op[list[dict[str, Any]]]:
        reply, _ = yield _Call("RepositoryIndex", pb.RepositoryIndexRequest(), timeout)
        return [_as_dict(m) for m in reply.models]

    @_op
    def load_model(self, model: str, timeout: float | None = None) -> _Op[None]:
        yield _Call("RepositoryModelLoad", pb.RepositoryModelLoadRequest(model_name=model), timeout)

    @_op
    def unload_model(self, model: str, timeout: float | None = None) -> _Op[None]:
        request = pb.RepositoryModelUnloadRequest(model_name=model)
        yield _Call("RepositoryModelUnload", request, timeout)


def _channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


def _stream_count(stream: bool | int) -> int:
    """How many streams ``stream`` asks for: True ``DEFAULT_STREAMS``, False or 0 none."""
    if stream is True:
        return DEFAULT_STREAMS
    if stream < 0:
        raise ValueError(f"stream must be True, False or a number of streams, not {stream}")
    return int(stream)


def _stream_channels(
    target: str, options: list, credentials: grpc.ChannelCredentials | None
) -> Callable[[], grpc.aio.Channel]:
    """Opens the channels the streams ride on: each with a subchannel pool of its own, so
    that each has its own connection (gRPC shares one among channels to a target)."""
    own = [*options, ("grpc.use_local_subchannel_pool", 1)]
    return lambda: open_channel(target, credentials, own, aio=True)


def _error(e: grpc.RpcError) -> InferenceError:
    return InferenceError(e.code(), e.details() or "")  # type: ignore[attr-defined]


class AsyncFace(_Calls):
    """The asyncio face of a Client: the same calls, awaited."""

    def __init__(
        self,
        target: str,
        metadata: tuple[tuple[str, str], ...],
        options: list,
        credentials: grpc.ChannelCredentials | None = None,
        stream: bool | int = False,
    ) -> None:
        self._channel = open_channel(target, credentials, options, aio=True)
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._metadata = metadata
        streams = _stream_count(stream)
        self._stream = (
            StreamMux(_stream_channels(target, options, credentials), metadata, streams)
            if streams
            else None
        )

    async def _drive(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        op = fn(*args, **kwargs)
        reply: Any = None
        try:
            call = next(op)
            while True:
                if self._stream is not None and call.method == "ModelInfer":
                    reply = await self._stream.infer(call.request, call.timeout)
                    call = op.send((reply, {}))
                    continue
                rpc = getattr(self._stub, call.method)(
                    call.request, timeout=call.timeout, metadata=self._metadata
                )
                try:
                    reply = await rpc
                except grpc.RpcError as e:
                    raise _error(e) from None
                trailing = {k: v for k, v in (await rpc.trailing_metadata() or ())}
                call = op.send((reply, trailing))
        except StopIteration as stop:
            return stop.value

    async def close(self) -> None:
        if self._stream is not None:
            await self._stream.close()
        await self._channel.close()


class Client(_Calls):
    """Synchronous client; ``client.aio`` is the asyncio face over its own aio channel.

    ``metadata`` is sent with every call (e.g. a sticky routing key). ``token`` is sent as
    ``authorization: Bearer <token>``. TLS is used when ``tls`` is true or any of
    ``tls_ca`` (the server's CA; default the system roots), ``tls_cert`` and ``tls_key``
    (this client's certificate, for mutual TLS) is given - as PEM bytes or file paths.

    ``stream=True`` carries ``infer`` over ModelStreamInfer streams instead of a unary call
    each: ``DEFAULT_STREAMS`` per face (this one and ``aio``), one per channel, taken in
    turn; ``stream=N`` opens N. Several times the calls per second from one process under
    concurrency. Calls from many threads or tasks share the streams; each keeps its own
    timeout, errors and result (see ``clients/stream.py``).
    """

    def __init__(
        self,
        target: str = "127.0.0.1:8001",
        *,
        metadata: Mapping[str, str] | None = None,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        tls: bool = False,
        tls_ca: PemSource | None = None,
        tls_cert: PemSource | None = None,
        tls_key: PemSource | None = None,
        token: str | None = None,
        stream: bool | int = False,
    ) -> None:
        self.target = target
        self.stream = stream
        streams = _stream_count(stream)
        self._metadata = tuple((metadata or {}).items()) + auth_metadata(token)
        self._options = _channel_options(max_message_bytes)
        self._credentials = client_credentials(tls, tls_ca, tls_cert, tls_key)
        self._channel = open_channel(target, self._credentials, self._options)
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._aio: AsyncFace | None = None
        self._stream = (
            ThreadedStreamMux(
                _stream_channels(target, self._options, self._credentials),
                self._metadata,
                streams,
            )
            if streams
            else None
        )

    @property
    def aio(self) -> AsyncFace:
        """The asyncio face (created on first use, inside the running event loop)."""
        if self._aio is None:
            self._aio = AsyncFace(
                self.target, self._metadata, self._options, self._credentials, self.stream
            )
        return self._aio

    def _drive(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        op = fn(*args, **kwargs)
        try:
            call = next(op)
            while True:
                if self._stream is not None and call.method == "ModelInfer":
                    call = op.send((self._stream.infer(call.request, call.timeout), {}))
                    continue
                try:
                    reply, rpc = getattr(self._stub, call.method).with_call(
                        call.request, timeout=call.timeout, metadata=self._metadata
                    )
                except grpc.RpcError as e:
                    raise _error(e) from None
                trailing = {k: v for k, v in (rpc.trailing_metadata() or ())}
                call = op.send((reply, trailing))
        except StopIteration as stop:
            return stop.value

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
