"""The one exception the client raises, and how a status travels in a stream reply."""

from __future__ import annotations

import grpc


class InferenceError(Exception):
    """A call failed; ``code`` is the gRPC status, ``message`` the server's explanation."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


def from_stream_reply(error_message: str) -> InferenceError:
    """The error of a failed ModelStreamInfer reply. The server writes its
    ``error_message`` as ``"CODE_NAME: message"``; any other text is UNKNOWN."""
    name, sep, message = error_message.partition(": ")
    code = grpc.StatusCode.__members__.get(name) if sep else None
    if code is None:
        return InferenceError(grpc.StatusCode.UNKNOWN, error_message)
    return InferenceError(code, message)
