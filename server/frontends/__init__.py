"""The gRPC front ends: what owns the port, the transport and protobuf.

Two front ends serve one gateway. ``python`` (``grpcio.py``) is grpc.aio, the reference and
the fallback; ``native`` (``native.py``) is the Rust extension ``tensorgate_native`` (tonic,
tokio), which hands requests to the same Python pipeline in ticks. Everything behind a front
end (the servicers' logic, the pipeline, routing, scheduling, backends, metrics) is shared
and written once; a front end only moves calls between the wire and ``Services``.
"""

from __future__ import annotations

import importlib.util

from .base import FrontEnd, Services
from .grpcio import GrpcioFrontEnd

__all__ = ["FRONT_ENDS", "FrontEnd", "Services", "build", "resolve"]

FRONT_ENDS = ("auto", "native", "python")
#: The extension module the native front end needs (``pip install ./native``).
NATIVE_MODULE = "tensorgate_native"


def native_available() -> bool:
    return importlib.util.find_spec(NATIVE_MODULE) is not None


def resolve(kind: str) -> str:
    """The front end ``kind`` ("auto", "native" or "python") means on this machine: "auto"
    is native when the extension is installed. Raises ValueError for an unknown kind, or
    "native" without the extension."""
    if kind not in FRONT_ENDS:
        raise ValueError(f"unknown front end '{kind}': expected one of {', '.join(FRONT_ENDS)}")
    if kind == "auto":
        return "native" if native_available() else "python"
    if kind == "native" and not native_available():
        raise ValueError(
            f"--front-end native needs the {NATIVE_MODULE} extension: build it with "
            "`pip install ./native` (needs cargo), or use --front-end python"
        )
    return kind


def build(kind: str, services: Services) -> FrontEnd:
    """The front end ``kind`` (already resolved: "native" or "python") for ``services``."""
    if kind == "native":
        from .native import NativeFrontEnd  # the optional extension: only when chosen

        return NativeFrontEnd(services)
    return GrpcioFrontEnd(services)
