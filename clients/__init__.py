"""Python client for tensorgate (and any Open Inference Protocol gRPC server)."""

from .client import AsyncFace, Client, InferenceError, InferResult

__all__ = ["AsyncFace", "Client", "InferResult", "InferenceError"]
