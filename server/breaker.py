"""A variant's circuit breaker: it skips a variant that keeps failing and probes it again
after a cool-down. Pure, with its clock injected."""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import IntEnum

DEFAULT_BREAKER_FAILURES = 5
DEFAULT_BREAKER_COOLDOWN_S = 10.0


class CircuitState(IntEnum):
    """Exported as the ``tensorgate_circuit_state`` gauge value."""

    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


class CircuitBreaker:
    """One variant's breaker: opens after ``failure_threshold`` consecutive failures, lets
    one probe through once ``cooldown`` seconds have passed (half-open), closes on the
    probe's success and opens again on its failure. Any success closes it.

    Every ``allow()`` that returned True must be followed by exactly one of ``success()``,
    ``failure()`` or ``release()`` (an outcome that says nothing about the variant's health,
    such as a full queue or a cancelled call). Event-loop only; not thread-safe.
    """

    def __init__(
        self,
        failure_threshold: int = DEFAULT_BREAKER_FAILURES,
        cooldown: float = DEFAULT_BREAKER_COOLDOWN_S,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[CircuitState], None] | None = None,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.cooldown = cooldown
        self.state = CircuitState.CLOSED
        self.consecutive_failures = 0
        self.opened_at = 0.0
        self._clock = clock
        self._on_change = on_change
        self._probing = False

    def allow(self) -> bool:
        """Whether a request may try this variant now (when there is somewhere else to go)."""
        if self.state is CircuitState.CLOSED:
            return True
        if self.state is CircuitState.OPEN:
            if self._clock() - self.opened_at < self.cooldown:
                return False
            self._set(CircuitState.HALF_OPEN)
        if self._probing:  # one probe at a time
            return False
        self._probing = True
        return True

    def success(self) -> None:
        self._probing = False
        self.consecutive_failures = 0
        self._set(CircuitState.CLOSED)

    def failure(self) -> None:
        self._probing = False
        self.consecutive_failures += 1
        if self.state is CircuitState.HALF_OPEN or (
            self.state is CircuitState.CLOSED
            and self.consecutive_failures >= self.failure_threshold
        ):
            self.opened_at = self._clock()
            self._set(CircuitState.OPEN)

    def release(self) -> None:
        self._probing = False

    def retry_in(self) -> float:
        """Seconds until an open circuit lets a probe through (0 when not open)."""
        if self.state is not CircuitState.OPEN:
            return 0.0
        return max(0.0, self.cooldown - (self._clock() - self.opened_at))

    def _set(self, state: CircuitState) -> None:
        if state is not self.state:
            self.state = state
            if self._on_change is not None:
                self._on_change(state)
