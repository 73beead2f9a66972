"""tensorgate's native gRPC front end (Rust: tonic, prost, tokio, rustls; PyO3).

The contract is /NATIVE_SPEC.md in the project; this stub is what Python sees. Choices made
where the spec left them open:

- ``stop(grace)`` returns at once; ``wait()`` blocks (without the GIL) until the stop is over:
  run it in an executor thread while the asyncio loop keeps calling ``take``/``complete``.
  The stop is over when every connection closed, or when no call waits for Python and no
  ModelStreamInfer stream is open (health Watch streams do not hold it), or after ``grace``.
  Calls still waiting then end UNAVAILABLE and Python receives their ``("cancel", slot)``.
- ServerLive is answered in Rust (it answers while Python is busy); the inference token it
  needs is given by ``set_live_ready_token``. ServerReady goes to Python like the other cold
  RPCs: readiness is the gateway's to know (no flag to keep in step).
- A result's ``data`` is copied once into the reply (bytes, or any C-contiguous buffer).
- Request deadlines (``grpc-timeout``) are enforced in Rust too: DEADLINE_EXCEEDED
  "Deadline Exceeded", and Python gets ``("cancel", slot)``.
"""

from typing import Any

import numpy as np

#: Requests of one ModelStreamInfer stream in Python at once; Rust stops reading beyond.
STREAM_WINDOW: int
__version__: str

Metadata = dict[str, str]
#: (name, datatype, shape, contents): contents maps InferTensorContents field names
#: ("fp32_contents", ...) to 1-D numpy arrays (moved, not copied), "bytes_contents" to a list.
Input = tuple[str, str, tuple[int, ...], dict[str, np.ndarray | list[bytes]]]
#: (model_name, model_version, id, inputs, raw, outputs, parameters)
Request = tuple[
    str, str, str, list[Input], list["RawBuffer"], list[str], dict[str, bool | int | float | str]
]
#: ("infer", slot, stream, request, metadata, timeout) | ("open", slot, method, metadata)
#: | ("cold", slot, method, payload, metadata, timeout) | ("cancel", slot)
Item = tuple[Any, ...]
#: (name, datatype, shape, data): data a C-contiguous numpy array or bytes
Output = tuple[str, str, tuple[int, ...], Any]
#: (0, model_name, model_version, id, outputs, trailers) | (0, payload, trailers)
#: | (code, code_name, message)
Result = tuple[Any, ...]

class RawBuffer:
    """One ``raw_input_contents`` entry, read-only, through the buffer protocol (no copy):
    ``np.frombuffer(buf, dtype)`` keeps it alive."""

    def __len__(self) -> int: ...
    def __buffer__(self, flags: int, /) -> memoryview: ...

class Server:
    def __init__(
        self,
        *,
        fd: int,
        max_message_bytes: int,
        tls: tuple[bytes, bytes, bytes | None] | None = None,
        worker_threads: int = 1,
        mode: str = "gateway",
    ) -> None:
        """``fd``: a bound, listening TCP socket, which the server owns from now on (Python
        calls ``socket.detach()``). ``tls``: (certificate chain PEM, key PEM, client CA PEM
        or None); with a client CA, clients must present a certificate it signed. Raises
        ValueError for PEM that does not parse, OSError for the socket.

        ``mode`` is for measurements only (``loadtest/account.py``): what ModelInfer does.
        ``"gateway"`` hands it to Python (the server); ``"echo"`` answers a canned reply
        (the MLP's "output" FP32 [1,10]) without decoding the request; ``"decode"`` decodes
        it and answers, built and encoded in Rust, each input back as an output of the same
        name. Neither of the last two reaches Python; other RPCs are served as always.
        ValueError for any other mode."""

    def start(self) -> None:
        """Serves in the background; returns at once."""

    def eventfd(self) -> int:
        """Readable when items are waiting (``loop.add_reader``); ``take`` resets it."""

    def take(self) -> list[Item]:
        """Everything that arrived since the last call."""

    def complete(self, results: list[tuple[int, Result]]) -> None:
        """Hands back one tick's results. Results for cancelled or unknown slots are
        ignored; a malformed result fails its own call with INTERNAL."""

    def set_health(self, service: str, status: int) -> None:
        """grpc.health.v1 status of ``service`` ("" for the server): 1 SERVING,
        2 NOT_SERVING."""

    def set_live_ready_token(self, token: str | None) -> None:
        """The bearer token ServerLive needs (None: open)."""

    def reload_tls(
        self, cert_pem: bytes, key_pem: bytes, client_ca_pem: bytes | None = None
    ) -> None:
        """New handshakes use the new credentials; existing connections keep theirs.
        ValueError (the old ones kept) when the PEM does not parse."""

    def end_streams(self) -> None:
        """The drain: each ModelStreamInfer stream stops reading and ends (OK) once its
        requests in flight are answered; streams opened later end at once."""

    def stop(self, grace: float) -> None:
        """Closes the port and sends GOAWAY; calls in flight get up to ``grace`` seconds.
        Returns at once: ``wait`` for the end."""

    def wait(self) -> None:
        """Blocks until the stop is over (releases the GIL)."""

    @property
    def stopped(self) -> bool: ...
    def in_flight(self) -> int:
        """Calls waiting for a result from Python."""
