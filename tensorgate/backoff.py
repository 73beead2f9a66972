"""One restart backoff, for everything the gateway restarts: ``serve --workers`` worker
processes (server/workers.py) and isolated backend workers (backends/isolated/).

A process that dies is restarted after 0.5 s; each further death in a row doubles the delay,
up to 30 s; one that ran for ``stable_after`` seconds before dying starts again from 0.5 s.
The clock is injected, so the whole sequence is tested without waiting
(``tests/test_backoff.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

INITIAL_S = 0.5
MAXIMUM_S = 30.0
#: A process that ran this long before dying was healthy: its next restart is quick again.
STABLE_AFTER_S = 60.0


class RestartBackoff:
    """Delays between restarts of one process. Call ``started()`` when it starts and
    ``delay()`` when it has died (or failed to start): the seconds to wait before the next
    start. Not thread-safe: each caller uses it under its own lock or from one thread."""

    def __init__(
        self,
        initial: float = INITIAL_S,
        maximum: float = MAXIMUM_S,
        stable_after: float = STABLE_AFTER_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.initial = initial
        self.maximum = maximum
        self.stable_after = stable_after
        self._clock = clock
        self._started: float | None = None
        self.failures_in_a_row = 0

    def started(self) -> None:
        self._started = self._clock()

    def delay(self) -> float:
        """The wait before the next start, counting this death (or failed start)."""
        lived = self._clock() - self._started if self._started is not None else 0.0
        self._started = None
        self.failures_in_a_row = 1 if lived >= self.stable_after else self.failures_in_a_row + 1
        return min(self.maximum, self.initial * 2 ** (self.failures_in_a_row - 1))
