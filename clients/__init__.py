"""Python client for tensorgate (and any Open Inference Protocol gRPC server)."""

from .client import AsyncFace, Client, InferResult
from .errors import InferenceError

__all__ = ["AsyncFace", "Client", "InferResult", "InferenceError"]
