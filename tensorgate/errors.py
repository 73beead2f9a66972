"""The gateway's domain errors. Each carries the gRPC status it maps to; the mapping to a
gRPC reply happens in exactly one place (``interceptors.ErrorInterceptor``).
"""

from __future__ import annotations

import grpc


class TensorgateError(Exception):
    """Base class: an error whose message is safe and useful to show the caller."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidInput(TensorgateError):
    """The request is malformed or does not match the model's signature."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class ModelNotFound(TensorgateError):
    """No such model or version. Worded as Triton words it, so tools written for Triton work."""

    code = grpc.StatusCode.NOT_FOUND

    def __init__(self, model: str, version: str | None = None) -> None:
        if version:
            msg = f"Request for unknown model: '{model}' version {version} is not found"
        else:
            msg = f"Request for unknown model: '{model}' is not found"
        super().__init__(msg)
        self.model = model
        self.version = version


class ModelNotReady(TensorgateError):
    """The model or variant exists but is not loaded (failed, loading or unloading)."""

    code = grpc.StatusCode.UNAVAILABLE


class Overloaded(TensorgateError):
    """A queue or in-flight limit is full; the caller may retry later."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(TensorgateError):
    """The caller's deadline passed before the request could be computed."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class BackendFailed(TensorgateError):
    """The framework raised while computing a valid request."""

    code = grpc.StatusCode.INTERNAL


class Unavailable(TensorgateError):
    """The server (or a part of it) cannot take the request now: draining, worker down."""

    code = grpc.StatusCode.UNAVAILABLE


class ConfigError(TensorgateError):
    """A model's config.toml or the repository layout is invalid."""

    code = grpc.StatusCode.INVALID_ARGUMENT
