"""Inference calls carried over ModelStreamInfer streams, one stream per channel.

``Client(target, stream=True)`` sends each ``infer`` as one message of a long-lived
bidirectional ModelStreamInfer call instead of a unary ModelInfer call of its own. A unary
call pays gRPC's per-call work on both ends - a new HTTP/2 stream, headers, trailers, the
server's per-call handler - which for a small model is most of what a request costs; on a
stream a request costs one message each way.

Each face (the sync one and ``client.aio``) opens a few streams (``DEFAULT_STREAMS`` in
client.py, or ``stream=N``), each on a channel and TCP connection of its own, and sends
calls to them in turn. One stream carries one message per gRPC operation (a write waits for
the last one), so each request costs a system call and an event-loop wake-up of its own on
both ends; a few streams let those be shared, and reach every process of a server run with
``--workers``.

How concurrent calls share the streams:

- each request goes out under an id the client assigns (unique on the face); the server
  answers with that id, in the order requests complete, and the reply goes to the call that
  sent it. The caller's own ``request_id`` is put back on the result.
- a request that fails is answered with ``error_message`` (``"CODE_NAME: message"``): that
  call alone raises InferenceError with that code; the stream and the other calls go on.
- a call's ``timeout`` travels as the request parameter ``timeout`` (microseconds, as
  Triton's clients send it), which the gateway turns into that request's deadline; the
  client also stops waiting when it passes (DEADLINE_EXCEEDED) and drops the late reply.
- cancelling an aio call (its task) drops its reply the same way.
- if the stream breaks (connection lost, server restarted), the calls waiting on it raise
  UNAVAILABLE and the next call opens a new stream. A reply that says UNAVAILABLE (a
  draining server) retires the stream: calls already on it finish there, later ones open a
  new stream, which a load balancer may send to another replica.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import threading
from collections.abc import Callable

import grpc

from tensorgate.protos import grpc_service_pb2 as pb

from .errors import InferenceError, from_stream_reply

METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"
#: The request parameter that carries a call's timeout, in microseconds (Triton's name).
TIMEOUT_PARAMETER = "timeout"
# A stream that ends with one of these says something true of every call on it (a bad
# token, a server without streams): its calls fail with it. Any other end is the transport's
# (connection lost, server gone) and its calls fail with UNAVAILABLE, which may be retried.
_CALLERS_FAULT = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INVALID_ARGUMENT,
    }
)


class BlockedCall:
    """What a sync caller waits on: a lock the reply releases (lighter than a
    concurrent.futures.Future, which adds a condition variable)."""

    __slots__ = ("_lock", "error", "reply")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        self.reply: pb.ModelInferResponse | None = None
        self.error: Exception | None = None

    def done(self) -> bool:
        return self.reply is not None or self.error is not None

    def set_result(self, reply: pb.ModelInferResponse) -> None:
        self.reply = reply
        self._lock.release()

    def set_exception(self, error: Exception) -> None:
        self.error = error
        self._lock.release()

    def wait(self, timeout: float | None) -> bool:
        """True once settled; False when ``timeout`` seconds passed first."""
        return self._lock.acquire(timeout=-1 if timeout is None else timeout)


# What a waiting call holds: an asyncio future (aio face) or a BlockedCall (sync face).
Waiter = asyncio.Future | BlockedCall


def deadline_exceeded(timeout: float) -> InferenceError:
    return InferenceError(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        f"no reply within the call's timeout of {timeout:g} s (sent over ModelStreamInfer)",
    )


def _settle(waiter: Waiter, reply: pb.ModelInferResponse | None, error: Exception | None) -> None:
    if waiter.done():  # an aio caller gave up (cancellation)
        return
    if error is not None:
        waiter.set_exception(error)
    else:
        waiter.set_result(reply)  # type: ignore[arg-type]


class _Lane:
    """One channel (its own TCP connection) and the ModelStreamInfer call open on it."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.open_call = channel.stream_stream(
            METHOD,
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelStreamInferResponse.FromString,
        )
        self.current: _Stream | None = None


class StreamMux:
    """Carries ModelInfer requests over ``streams`` ModelStreamInfer calls, one per channel
    (each from ``open_channel``, so each on its own connection), taking them in turn;
    opens a new call on a channel when its last one ended. Runs in one event loop:
    ``infer`` is the asyncio entry, ``send`` the one for other threads (through
    ``loop.call_soon_threadsafe``)."""

    def __init__(
        self,
        open_channel: Callable[[], grpc.aio.Channel],
        metadata: tuple[tuple[str, str], ...],
        streams: int = 1,
    ) -> None:
        if streams < 1:
            raise ValueError(f"streams must be at least 1, not {streams}")
        self._open_channel = open_channel
        self._metadata = metadata
        self._lanes: list[_Lane | None] = [None] * streams  # channels open on first use
        self._turn = itertools.count()
        self._ids = itertools.count(1)
        # Every call sent and not yet answered, on any stream: wire id -> (waiter, stream).
        self.pending: dict[str, tuple[Waiter, _Stream]] = {}
        self._closed = False

    def next_id(self) -> str:
        """A fresh wire id (thread-safe: one step of an itertools.count)."""
        return str(next(self._ids))

    async def infer(
        self, request: pb.ModelInferRequest, timeout: float | None
    ) -> pb.ModelInferResponse:
        """Send ``request`` and wait for its reply (aio face). Raises InferenceError."""
        caller_id = prepare(request, self.next_id(), timeout)
        waiter: asyncio.Future[pb.ModelInferResponse] = asyncio.get_running_loop().create_future()
        self.send(request, waiter)
        try:
            async with asyncio.timeout(timeout):
                reply = await waiter
        except TimeoutError:
            raise deadline_exceeded(timeout or 0.0) from None
        finally:
            self.forget(request.id)  # after a deadline or a cancellation: drop the reply
        reply.id = caller_id
        return reply

    def send(self, request: pb.ModelInferRequest, waiter: Waiter) -> None:
        """Queue ``request`` (its ``id`` already a wire id) on the next stream in turn,
        opening it if needed; ``waiter`` gets the reply or an InferenceError. Loop thread
        only."""
        if self._closed:
            _settle(waiter, None, InferenceError(grpc.StatusCode.CANCELLED, "client closed"))
            return
        i = next(self._turn) % len(self._lanes)
        lane = self._lanes[i]
        if lane is None:
            lane = self._lanes[i] = _Lane(self._open_channel())
        stream = lane.current
        if stream is None:
            stream = lane.current = _Stream(self, lane, lane.open_call(metadata=self._metadata))
        self.pending[request.id] = (waiter, stream)
        stream.queue.put_nowait(request)

    def forget(self, wire_id: str) -> None:
        """Stop waiting for ``wire_id``'s reply (dropped when it comes). Loop thread only."""
        self.pending.pop(wire_id, None)

    def streams(self) -> list[_Stream]:
        """The streams that take new calls now."""
        return [lane.current for lane in self._lanes if lane and lane.current]

    def ended(self, stream: _Stream, error: InferenceError | None) -> None:
        """``stream`` takes no more calls; with ``error``, its waiting calls fail with it."""
        if stream.lane.current is stream:
            stream.lane.current = None
        if error is None:
            return
        lost = [wire for wire, (_, s) in self.pending.items() if s is stream]
        for wire in lost:
            _settle(self.pending.pop(wire)[0], None, error)

    async def close(self) -> None:
        """Cancel the open streams (calls still waiting fail with CANCELLED), close the
        channels."""
        self._closed = True
        streams = {s for _, s in self.pending.values()} | set(self.streams())
        for stream in streams:
            await stream.cancel()
        for lane in self._lanes:
            if lane is not None:
                await lane.channel.close()


class _Stream:
    """One ModelStreamInfer call: a task writing the queued requests, a task reading the
    replies and handing each to its waiter."""

    def __init__(self, mux: StreamMux, lane: _Lane, call: grpc.aio.StreamStreamCall) -> None:
        self.mux = mux
        self.lane = lane
        self.call = call
        self.queue: asyncio.Queue[pb.ModelInferRequest | None] = asyncio.Queue()
        # Why the calls waiting on this stream fail if it is cancelled.
        self.failure = InferenceError(grpc.StatusCode.CANCELLED, "client closed")
        self._writer = asyncio.create_task(self._write())
        self._reader = asyncio.create_task(self._read())

    async def _write(self) -> None:
        try:
            while (request := await self.queue.get()) is not None:
                if request.id in self.mux.pending:  # not abandoned while it was queued
                    await self.call.write(request)
            await self.call.done_writing()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            # When the call ended under the write, the reader reports why. Otherwise the
            # write itself failed: end the call, so that no caller waits on a dead stream.
            if not self.call.done():
                self.failure = InferenceError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"writing to the ModelStreamInfer stream failed: {e}",
                )
                self.call.cancel()

    async def _read(self) -> None:
        error: InferenceError | None = None
        try:
            while (message := await self.call.read()) is not grpc.aio.EOF:
                self._deliver(message)
            error = InferenceError(
                grpc.StatusCode.UNAVAILABLE,
                "the server ended the ModelStreamInfer stream before answering; retry the call",
            )
        except grpc.aio.AioRpcError as e:
            error = _broken(e)
        except asyncio.CancelledError:  # the call cancelled: by close(), or after a failed write
            error = self.failure
            raise
        finally:
            self.mux.ended(self, error)
            self._writer.cancel()

    def _deliver(self, message: pb.ModelStreamInferResponse) -> None:
        entry = self.mux.pending.pop(message.infer_response.id, None)
        if entry is None:  # its caller gave up (deadline, cancellation)
            return
        if not message.error_message:
            _settle(entry[0], message.infer_response, None)
            return
        error = from_stream_reply(message.error_message)
        _settle(entry[0], None, error)
        if error.code == grpc.StatusCode.UNAVAILABLE:
            self.retire()

    def retire(self) -> None:
        """Take no new calls; finish the ones sent, then half-close (the server ends it)."""
        self.mux.ended(self, None)
        self.queue.put_nowait(None)

    async def cancel(self) -> None:
        self.call.cancel()
        await asyncio.gather(self._reader, self._writer, return_exceptions=True)


def _broken(e: grpc.aio.AioRpcError) -> InferenceError:
    code, details = e.code(), e.details() or ""
    if code in _CALLERS_FAULT:
        return InferenceError(code, details)
    return InferenceError(
        grpc.StatusCode.UNAVAILABLE,
        f"the ModelStreamInfer stream broke before the reply ({code.name}: {details}); "
        "the next call opens a new stream",
    )


def prepare(request: pb.ModelInferRequest, wire_id: str, timeout: float | None) -> str:
    """Put the wire id (and the timeout parameter) on ``request``; returns the caller's id."""
    caller_id = request.id
    request.id = wire_id
    if timeout is not None:
        request.parameters[TIMEOUT_PARAMETER].int64_param = max(1, round(timeout * 1e6))
    return caller_id


class ThreadedStreamMux:
    """A StreamMux for the sync face: its own ``grpc.aio`` channel and event loop on a
    daemon thread, started by the first call. ``infer`` blocks the calling thread only.

    Callers queue their requests and wake the loop only when it is not already due to run
    (one wake-up for every request queued meanwhile): under load, the loop thread takes the
    GIL once per burst of requests rather than once per request."""

    def __init__(
        self, open_channel: Callable[[], grpc.aio.Channel], metadata: tuple, streams: int = 1
    ) -> None:
        self._open_channel = open_channel
        self._metadata = metadata
        self._streams = streams
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._mux: StreamMux | None = None
        self._outbox: collections.deque[tuple[pb.ModelInferRequest, BlockedCall]] = (
            collections.deque()
        )
        self._wake_due = False
        self._closed = False

    def _start(self) -> tuple[asyncio.AbstractEventLoop, StreamMux]:
        with self._lock:
            if self._closed:
                raise InferenceError(grpc.StatusCode.CANCELLED, "client closed")
            if self._loop is None or self._mux is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=loop.run_forever, name="tensorgate-stream", daemon=True
                )
                thread.start()
                self._loop, self._thread = loop, thread
                self._mux = StreamMux(self._open_channel, self._metadata, self._streams)
            return self._loop, self._mux

    def _send_queued(self) -> None:
        """Loop thread: hand every queued request to the mux."""
        assert self._mux is not None
        with self._lock:
            self._wake_due = False
        while self._outbox:
            self._mux.send(*self._outbox.popleft())

    def infer(self, request: pb.ModelInferRequest, timeout: float | None) -> pb.ModelInferResponse:
        """Send ``request`` and wait for its reply. Raises InferenceError."""
        loop, mux = self._start()
        caller_id = prepare(request, mux.next_id(), timeout)
        waiter = BlockedCall()
        self._outbox.append((request, waiter))
        with self._lock:
            wake, self._wake_due = not self._wake_due, True
        if wake:
            loop.call_soon_threadsafe(self._send_queued)
        try:
            settled = waiter.wait(timeout)
        finally:
            if not waiter.done():  # a deadline, or an interrupt: drop the reply
                loop.call_soon_threadsafe(mux.forget, request.id)
        if not settled:
            raise deadline_exceeded(timeout or 0.0)
        if waiter.error is not None:
            raise waiter.error
        assert waiter.reply is not None
        waiter.reply.id = caller_id
        return waiter.reply

    def close(self) -> None:
        with self._lock:
            self._closed = True
            loop, thread, mux = self._loop, self._thread, self._mux
            self._loop = self._thread = self._mux = None
        if loop is None or thread is None:
            return

        async def shut() -> None:
            if mux is not None:
                await mux.close()

        asyncio.run_coroutine_threadsafe(shut(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
