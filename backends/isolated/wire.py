"""The wire protocol between the gateway and an isolated worker (see the package docstring):
framed pickles with out-of-band numpy buffers, and how errors and exits are described."""

from __future__ import annotations

import pickle
import signal
import struct
from typing import IO, Any

import numpy as np

from ..base import (
    BackendError,
    BackendInputError,
    BackendUnavailable,
    BackendUnreachable,
)

_FRAME = struct.Struct("<II")
_LENGTH = struct.Struct("<Q")

#: Exception classes by the kind a worker reports; anything else is a BackendError.
KINDS: dict[str, type[BackendError]] = {
    "input": BackendInputError,
    "unavailable": BackendUnavailable,
    "unreachable": BackendUnreachable,
    "error": BackendError,
}


def send_message(stream: IO[bytes], obj: object) -> None:
    """Write one message; numpy buffers go out of band, straight from the arrays."""
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    head = _FRAME.pack(len(data), len(raws)) + b"".join(_LENGTH.pack(r.nbytes) for r in raws)
    stream.write(head + data)
    for raw in raws:
        stream.write(raw)
    stream.flush()


def _read_exact(stream: IO[bytes], n: int) -> memoryview:
    buf = np.empty(n, np.uint8)  # numpy's allocator: aligned for any dtype
    view = memoryview(buf).cast("B")
    got = 0
    while got < n:
        k = stream.readinto(view[got:])  # type: ignore[attr-defined]
        if not k:
            raise EOFError(f"pipe closed after {got} of {n} bytes")
        got += k
    return view


def recv_message(stream: IO[bytes]) -> Any:
    """Read one message. Raises EOFError when the other side has gone."""
    head = bytes(_read_exact(stream, _FRAME.size))
    size, count = _FRAME.unpack(head)
    lengths = [_LENGTH.unpack(_read_exact(stream, _LENGTH.size))[0] for _ in range(count)]
    data = _read_exact(stream, size)
    buffers = [_read_exact(stream, n) for n in lengths]
    return pickle.loads(data, buffers=buffers)


def error_reply(rid: int, exc: BaseException) -> tuple:
    kind = next(
        (k for k, cls in KINDS.items() if k != "error" and isinstance(exc, cls)),
        "error",
    )
    message = str(exc) if isinstance(exc, BackendError) else f"{type(exc).__name__}: {exc}"
    return (rid, "error", kind, message)


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "it closed its pipe"
    if returncode < 0:
        try:
            return f"killed by signal {-returncode} ({signal.Signals(-returncode).name})"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"
