"""Which asyncio event loop a gateway process runs on.

grpc.aio runs on any asyncio loop. uvloop (libuv, in C) makes the loop's own share of a
request cheaper - selecting, scheduling callbacks and tasks: 12 % less server CPU per
request for the bare grpc.aio echo server, 4 % for the gateway serving a small ONNX model
(docs/benchmarks.md, "Accounting for a request"). ``auto`` takes
uvloop when it is installed (a dependency on Linux and macOS) and the standard loop
otherwise; ``tensorgate serve --event-loop asyncio`` asks for the standard one.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

CHOICES = ("auto", "uvloop", "asyncio")


def resolve(choice: str) -> str:
    """The loop ``choice`` means on this machine: "uvloop" or "asyncio". Raises
    ValueError for an unknown choice or for "uvloop" when it is not installed."""
    if choice not in CHOICES:
        raise ValueError(f"event loop must be one of {', '.join(CHOICES)}, not {choice!r}")
    available = importlib.util.find_spec("uvloop") is not None
    if choice == "uvloop" and not available:
        raise ValueError("--event-loop uvloop: uvloop is not installed (pip install uvloop)")
    if choice == "auto":
        return "uvloop" if available else "asyncio"
    return choice


def run(main: Coroutine[Any, Any, T], choice: str = "auto") -> T:
    """``asyncio.run(main)`` on the loop ``choice`` resolves to."""
    if resolve(choice) == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main)
    return asyncio.run(main)
