"""Whether a variant's execution is cheap enough to run on the event loop thread.

A single-instance CPU variant runs an execution on the loop instead of its pool when it is
expected to cost less than ``INLINE_BUDGET_S``: handing a call to a thread and back costs
more CPU and GIL hand-overs under load (~0.3-0.4 ms per request at c=32,
docs/benchmarks.md) than such a model computes (the demo MLP in ONNX Runtime: ~20 us). The
budget also bounds how long one execution may hold the loop, where every other RPC waits.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

log = logging.getLogger(__name__)

INLINE_BUDGET_S = 150e-6
#: Executions per update of a variant's cost estimate, and before the first one (those
#: run in the pool).
INLINE_WINDOW = 32
INLINE_FIRST = 8
#: Once estimated, one execution in this many is measured (reading a thread's CPU clock is
#: a system call, twice per execution): the estimate is renewed every
#: INLINE_WINDOW * INLINE_SAMPLE executions.
INLINE_SAMPLE = 8


class InlineCost:
    """One variant's estimate of its CPU seconds per input element.

    Thread CPU time, not wall time: preemption on a shared machine and waits for the GIL (up
    to the 5 ms switch interval in a pool thread under load) cost only their wake-ups, and
    the estimate is a 25th percentile, so one unlucky execution cannot flip the variant
    between the loop and its pool. Used from the loop and a pool thread: the list swap and
    appends are atomic (GIL)."""

    def __init__(self, name: str) -> None:
        self._name = name
        self.per_element: float | None = None  # None: not measured yet
        self.costs: list[float] = []
        self._executions = 0

    def cheap(self, inputs: Mapping[str, np.ndarray]) -> bool:
        """Expected to cost less than the budget: the typical cost per element times this
        request's elements, so that a large request to a small model never holds the loop."""
        per_element = self.per_element
        if per_element is None:
            return False
        return per_element * sum(a.size for a in inputs.values()) < INLINE_BUDGET_S

    def sample(self) -> bool:
        """Whether to measure the next execution: all of them until the first estimate,
        then one in INLINE_SAMPLE."""
        if self.per_element is None:
            return True
        self._executions += 1
        return self._executions % INLINE_SAMPLE == 0

    def observe(self, cpu: float, inputs: Mapping[str, np.ndarray]) -> None:
        """Record one execution's CPU cost; re-estimate from the 25th percentile of the
        cost per element once per INLINE_WINDOW executions (the first after INLINE_FIRST)."""
        costs = self.costs
        costs.append(cpu / max(1, sum(a.size for a in inputs.values())))
        known = self.per_element is not None
        if len(costs) >= (INLINE_WINDOW if known else INLINE_FIRST):
            self.costs = []
            self.per_element = sorted(costs)[len(costs) // 4]
            if not known:
                log.debug(
                    "variant %s: ~%.3g us of CPU per input element",
                    self._name,
                    self.per_element * 1e6,
                )
