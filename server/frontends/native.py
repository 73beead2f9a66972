"""The native front end: ``tensorgate_native``'s Rust server (tonic, tokio) in front of the
same servicers as the grpcio front end.

Rust owns HTTP/2, TLS, deadlines, message limits, health, reflection, ServerLive and
ServerReady, and decodes ModelInfer. Everything else reaches Python through one queue, in
ticks: Rust threads push calls without the GIL and make an eventfd readable; the asyncio
loop (``add_reader``) takes everything that arrived in one ``take()``, starts a task per
call, and hands the finished results back with one ``complete()`` per loop iteration.

- ``infer``: ModelInfer (unary or one request of a ModelStreamInfer stream), as the request
  tuple of NATIVE_SPEC.md, to ``InferenceServicer.serve`` (the grpcio front end's path too);
  the outputs go back as arrays and Rust encodes the reply.
- ``cold``: any other unary RPC of the inference or admin service, as bytes: decoded here
  into its message and given to the servicer method, through the same ``map_errors``
  wrapping, with a small context object standing in for grpc's.
- ``open``: a ModelStreamInfer stream opened: the token check, nothing else.
- ``cancel``: the client (or its deadline, or the stop) ended a call: its task is cancelled.

The bearer tokens are ``TokenPolicy``'s, checked here (ServerLive and ServerReady, answered
in Rust, get the inference token through ``set_live_ready_token``).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor

from tensorgate import codec
from tensorgate.inference import InferenceResponse
from tensorgate.protos import admin_pb2
from tensorgate.protos import grpc_service_pb2 as pb

from ..auth import TokenPolicy
from ..credentials import tls_material
from ..interceptors import map_errors, status_of
from ..servicer import VARIANT_METADATA_KEY, WORKER_METADATA_KEY
from .base import Services

log = logging.getLogger(__name__)

INFERENCE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
ADMIN = admin_pb2.DESCRIPTOR.services_by_name["RoutingAdmin"]
MODEL_INFER = f"/{INFERENCE.full_name}/ModelInfer"
SERVER_LIVE = f"/{INFERENCE.full_name}/ServerLive"
#: Rust worker threads: one is enough for the transport of one process (the cores go to
#: Python and the frameworks; scale with --workers).
WORKER_THREADS = 1
SERVING, NOT_SERVING = 1, 2  # grpc.health.v1 HealthCheckResponse.ServingStatus
LISTEN_BACKLOG = 1024

Result = tuple[Any, ...]


def available() -> bool:
    """Whether the extension imports (``--front-end auto`` picks native then)."""
    try:
        import tensorgate_native  # noqa: F401
    except ImportError:
        return False
    return True


class Aborted(grpc.aio.AbortError):
    """``CallContext.abort``: the call ends with this status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class CallContext:
    """The part of ``grpc.aio.ServicerContext`` the servicers use, for a call that came
    through the native front end."""

    __slots__ = ("_code", "_deadline", "_details", "_metadata", "trailers")

    def __init__(self, metadata: Mapping[str, str], timeout: float | None) -> None:
        self._metadata = metadata
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self.trailers: list[tuple[str, str]] = []
        self._code: grpc.StatusCode | None = None
        self._details = ""

    def time_remaining(self) -> float | None:
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - time.monotonic())

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return tuple(self._metadata.items())

    def set_trailing_metadata(self, metadata: Iterable[tuple[str, str]]) -> None:
        self.trailers = [(k, v) for k, v in metadata if isinstance(v, str)]

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()
    ) -> None:
        raise Aborted(code, details)

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def peer(self) -> str:
        return "native"

    def cancelled(self) -> bool:
        return False

    def done(self) -> bool:
        return False


def failure(code: grpc.StatusCode, message: str) -> Result:
    """An error result: (code number, code name, message)."""
    return (code.value[0], code.name, message)


def _cold_methods(
    servicer: Any, service: ServiceDescriptor
) -> dict[str, tuple[Callable[..., Any], Callable[[bytes], Any]]]:
    """'/service/Method' -> (servicer method, request parser) for the unary methods."""
    methods = {}
    for m in service.methods:
        if m.client_streaming or m.server_streaming:
            continue
        parse = message_factory.GetMessageClass(m.input_type).FromString
        methods[f"/{service.full_name}/{m.name}"] = (getattr(servicer, m.name), parse)
    return methods


def bind(host: str, port: int, reuse_port: bool) -> socket.socket:
    """A listening socket on ``host:port`` (SO_REUSEPORT with ``--workers``), for Rust."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


class Dispatcher:
    """The Python half of the hand-over: takes a tick's calls, runs each as a task, hands
    the results back once per loop iteration."""

    def __init__(
        self,
        server: Any,
        inference: Any,
        admin: Any,
        tokens: TokenPolicy,
        serve_infer: Callable[..., Any],
    ) -> None:
        """``inference`` and ``admin``: the servicers, already wrapped by ``map_errors``.
        ``serve_infer(request, metadata, timeout, stream)``: awaits the result tuple of one
        ModelInfer (raises a domain error)."""
        self._server = server
        self._tokens = tokens  # read per call: a token change applies at once
        self._serve_infer = serve_infer
        self._cold = {**_cold_methods(inference, INFERENCE), **_cold_methods(admin, ADMIN)}
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._results: list[tuple[int, Result]] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- the tick ---------------------------------------------------------------------------
    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self._server.eventfd(), self._on_ready)

    def detach(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._server.eventfd())
        for task in list(self._tasks.values()):
            task.cancel()

    def _on_ready(self) -> None:
        loop = self._loop
        assert loop is not None
        tasks = self._tasks
        for item in self._server.take():
            kind, slot = item[0], item[1]
            if kind == "infer":
                tasks[slot] = loop.create_task(self._infer(*item[1:]))
            elif kind == "cancel":
                task = tasks.pop(slot, None)
                if task is not None:
                    task.cancel()
            elif kind == "cold":
                tasks[slot] = loop.create_task(self._call(*item[1:]))
            elif kind == "open":
                self._done(slot, self._open(item[2], item[3]))

    def _done(self, slot: int, result: Result) -> None:
        self._results.append((slot, result))
        if len(self._results) == 1:
            assert self._loop is not None
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        results, self._results = self._results, []
        self._server.complete(results)

    # -- the calls --------------------------------------------------------------------------
    def _refusal(self, method: str, metadata: Mapping[str, str]) -> Result | None:
        if not self._tokens.enabled:
            return None
        refused = self._tokens.refusal(method, metadata.items())
        return None if refused is None else failure(*status_of(refused, "auth"))

    def _open(self, method: str, metadata: Mapping[str, str]) -> Result:
        return self._refusal(method, metadata) or (0, b"", [])

    async def _infer(
        self, slot: int, stream: int, request: tuple, metadata: dict, timeout: float | None
    ) -> None:
        try:
            result = None if stream else self._refusal(MODEL_INFER, metadata)
            if result is None:
                result = await self._serve_infer(request, metadata, timeout, bool(stream))
        except asyncio.CancelledError:
            return
        except Exception as e:
            result = failure(*status_of(e, "ModelInfer"))
        finally:
            self._tasks.pop(slot, None)
        self._done(slot, result)

    async def _call(
        self, slot: int, method: str, payload: bytes, metadata: dict, timeout: float | None
    ) -> None:
        try:
            result = self._refusal(method, metadata)
            if result is None:
                result = await self._cold_call(method, payload, metadata, timeout)
        except asyncio.CancelledError:
            return
        except Exception as e:  # past map_errors (it maps the servicers' own errors)
            result = failure(*status_of(e, method))
        finally:
            self._tasks.pop(slot, None)
        self._done(slot, result)

    async def _cold_call(
        self, method: str, payload: bytes, metadata: dict, timeout: float | None
    ) -> Result:
        entry = self._cold.get(method)
        if entry is None:
            return failure(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        handler, parse = entry
        context = CallContext(metadata, timeout)
        try:
            request = parse(payload)
        except Exception as e:  # protobuf's DecodeError
            return failure(grpc.StatusCode.INTERNAL, f"could not decode the request: {e}")
        try:
            reply = await handler(request, context)
        except Aborted as e:
            return failure(e.code, e.details)
        return (0, reply.SerializeToString(), context.trailers)


class NativeFrontEnd:
    """The ``FrontEnd`` over ``tensorgate_native.Server`` (see the module docstring)."""

    name = "native"

    def __init__(self, services: Services) -> None:
        self.services = services
        self.port = 0
        self._server: Any = None
        self._dispatcher: Dispatcher | None = None
        self._health: dict[str, bool] = {}
        self._health_frozen = False
        self._stopped: asyncio.Event | None = None

    async def start(self) -> None:
        import tensorgate_native

        s = self.services.settings
        material = tls_material(s)
        pem = (
            None
            if material is None
            else (material.cert_chain, material.private_key, material.client_ca)
        )
        sock = bind(s.host, s.port, s.reuse_port)
        self.port = sock.getsockname()[1]
        try:
            server = tensorgate_native.Server(
                fd=sock.fileno(),
                max_message_bytes=s.max_message_bytes,
                tls=pem,
                worker_threads=WORKER_THREADS,
            )
        except BaseException:
            sock.close()
            raise
        sock.detach()  # the Rust server owns the descriptor now
        tokens = self.services.tokens

        def live_ready_token() -> None:  # again after each reload of the token files
            needed = tokens.required(SERVER_LIVE)
            server.set_live_ready_token(None if needed is None else needed[0])

        live_ready_token()
        tokens.on_replace(live_ready_token)
        inference = map_errors(self.services.inference, INFERENCE)
        admin = map_errors(self.services.admin, ADMIN)
        self._dispatcher = Dispatcher(server, inference, admin, tokens, self._serve_infer())
        self._dispatcher.attach(asyncio.get_running_loop())
        self._stopped = asyncio.Event()
        self._server = server
        for service, serving in self._health.items():
            server.set_health(service, SERVING if serving else NOT_SERVING)
        server.start()

    def _serve_infer(self) -> Callable[..., Any]:
        """The hot path: one ModelInfer from its hand-over tuple to its result tuple, through
        ``InferenceServicer.serve`` (the grpcio front end's path too)."""
        s = self.services.settings
        serve = self.services.inference.serve
        max_elements = s.max_tensor_elements
        worker = () if s.worker_index is None else ((WORKER_METADATA_KEY, str(s.worker_index)),)
        decode_parts, encode_outputs = codec.decode_parts, codec.encode_outputs

        def encode(response: InferenceResponse) -> Result:
            variant = response.variant
            trailers = [(VARIANT_METADATA_KEY, variant), *worker]
            return (0, response.model, variant, response.id, encode_outputs(response), trailers)

        async def serve_infer(
            request: tuple, metadata: Mapping[str, str], timeout: float | None, stream: bool
        ) -> Result:
            deadline = None if timeout is None else time.monotonic() + timeout
            result, _ = await serve(
                request[0],
                lambda: decode_parts(*request, max_elements),
                encode,
                metadata,
                deadline,
                stream,
            )
            return result

        return serve_infer

    def reload_tls(self, cert_pem: bytes, key_pem: bytes, client_ca_pem: bytes | None) -> None:
        """New TLS material for new handshakes (the Rust server swaps its rustls config);
        open connections keep theirs. Raises ValueError, the old material kept, when the
        PEM does not parse."""
        if self._server is None:
            raise RuntimeError("the native front end has not started")
        self._server.reload_tls(cert_pem, key_pem, client_ca_pem)

    async def set_health(self, service: str, serving: bool) -> None:
        if self._health_frozen:
            return
        self._health[service] = serving
        if self._server is not None:
            self._server.set_health(service, SERVING if serving else NOT_SERVING)

    async def enter_graceful_shutdown(self) -> None:
        for service in self._health:
            await self.set_health(service, False)
        self._health_frozen = True

    def end_streams(self) -> None:
        if self._server is not None:
            self._server.end_streams()

    async def stop(self, grace: float) -> None:
        server = self._server
        if server is None:
            return
        server.stop(grace)
        # The loop keeps serving the hand-over while Rust drains.
        await asyncio.get_running_loop().run_in_executor(None, server.wait)
        if self._dispatcher is not None:
            self._dispatcher.detach()
        assert self._stopped is not None
        self._stopped.set()

    async def wait(self) -> None:
        assert self._stopped is not None
        await self._stopped.wait()
