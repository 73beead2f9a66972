"""Admission control for inference requests: the server-wide in-flight limit and the drain.

Every ModelInfer (and every request of a ModelStreamInfer stream) enters here before it is
decoded. Beyond ``max_inflight`` requests it is refused at once with RESOURCE_EXHAUSTED, so
overload costs the caller one round trip instead of a growing queue; while the server drains
it is refused with UNAVAILABLE, which clients and load balancers retry elsewhere. The
per-variant queues (``scheduler.py``) bound each model; this bounds the process.
"""

from __future__ import annotations

import asyncio
import time

from tensorgate.errors import Overloaded, Unavailable

DRAINING_MESSAGE = "server is draining (shutting down); retry on another replica"


class Admission:
    """Counts the inference requests being served and decides whether one more may enter."""

    def __init__(self, max_inflight: int | None = None) -> None:
        if max_inflight is not None and max_inflight < 1:
            raise ValueError(f"max_inflight must be at least 1, not {max_inflight}")
        self.max_inflight = max_inflight
        self.inflight = 0
        self.draining = False
        # The drain's last phase: calls that arrive are held until the gRPC server has
        # begun to stop (``release_held``), then refused (see ``Gateway.stop``).
        self.holding = False
        self._released = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        """Take one in-flight slot (give it back with ``leave``). Raises Unavailable while
        draining and Overloaded when ``max_inflight`` requests are already in flight."""
        if self.draining:
            raise Unavailable(DRAINING_MESSAGE)
        if self.max_inflight is not None and self.inflight >= self.max_inflight:
            raise Overloaded(
                f"server has {self.inflight} requests in flight, its limit "
                f"(--max-inflight {self.max_inflight}); retry later"
            )
        self.inflight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()

    def start_draining(self) -> int:
        """Refuse every request from now on; returns how many are in flight."""
        self.draining = True
        return self.inflight

    def hold_arrivals(self) -> None:
        """From now on, calls wait in ``held`` before they are refused."""
        self.holding = True

    def release_held(self) -> None:
        self._released.set()

    async def held(self) -> None:
        """Wait until ``release_held`` (called once the server stops taking calls)."""
        await self._released.wait()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight, at most ``timeout`` seconds; True if idle."""
        until = time.monotonic() + timeout
        while self.inflight:
            remaining = until - time.monotonic()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._idle.wait(), remaining)
            except TimeoutError:
                return False
        return True
