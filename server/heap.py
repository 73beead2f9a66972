"""The garbage collector in a serving process.

A request allocates a few dozen small objects and frees them by reference counting: none
is part of a cycle, so the cyclic collector finds nothing, yet it runs every 700
allocations (generation 0) and, now and then, over the whole heap - 420,000 objects and
~185 ms with TensorFlow, PyTorch and ONNX Runtime imported, during which the event loop
answers nothing. So, once the models are loaded (and again after each change to them):

- ``settle``: collect once, then freeze what is alive (``gc.freeze``): the models, the
  frameworks' modules and the server's own objects are not traversed again;
- ``configure``: generation 0 every GEN0_THRESHOLD allocations instead of 700.

Measured with the Python half of the native front end alone (``loadtest/account.py``'s
rungs; docs/benchmarks.md): ~25 % less CPU per request.
"""

from __future__ import annotations

import gc

#: Allocations (net) between collections of generation 0 (Python's default: 700). The
#: older generations keep their default ratios to it.
GEN0_THRESHOLD = 10_000


def configure() -> tuple[int, int, int]:
    """Collect generation 0 every GEN0_THRESHOLD allocations; returns the thresholds it
    replaced (``restore`` puts them back: a gateway run inside another program, as the
    tests do, leaves its collector as it found it)."""
    before = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, before[1], before[2])
    return before


def restore(thresholds: tuple[int, int, int]) -> None:
    """Undo ``configure`` and ``settle``."""
    gc.set_threshold(*thresholds)
    gc.unfreeze()


def settle() -> None:
    """Collect everything (what was frozen included: an unloaded model's cycles go now),
    then freeze what is left, so that later collections skip it. Blocks the caller for a
    full collection (~0.2 s with every framework imported): call it when the models
    change, not per request."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
