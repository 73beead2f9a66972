"""The garbage collector in a serving process.

A request allocates a few dozen small objects and frees them by reference counting: none
is part of a cycle, so the cyclic collector finds nothing, yet it runs every 700
allocations (generation 0) and, now and then, over the whole heap - 420,000 objects and
~185 ms with TensorFlow, PyTorch and ONNX Runtime imported, during which the event loop
answers nothing. So, once the models are loaded (and again after each change to them):

- ``settle``: collect once, then freeze what is alive (``gc.freeze``): the models, the
  frameworks' modules and the server's own objects are not traversed again;
- ``configure``: generation 0 every GEN0_THRESHOLD allocations instead of 700.

Measured (docs/benchmarks.md, loadtest/results/heap-ab-20261206.jsonl): the native front
end with dynamic batching on the MLP, h2load c=32, runs alternating with and without:
11,867 -> 15,312 requests/s (medians of 3), 0.082 -> 0.062 ms of server CPU per request.

And glibc's allocator (``tune_malloc``, from ``configure``): a request or reply of a
megabyte or more is allocated with mmap and, when freed, given back to the kernel (munmap,
or a trimmed heap), so the next one faults its pages in again, zeroed: a fifth of the
server's CPU with 1 MB tensors. The thresholds are fixed instead, high enough for the
messages a gateway moves (the server's message limit is 64 MiB by default, one larger
allocation still gets its own mapping).
"""

from __future__ import annotations

import ctypes
import gc
import platform

#: Allocations (net) between collections of generation 0 (Python's default: 700). The
#: older generations keep their default ratios to it.
GEN0_THRESHOLD = 10_000
#: glibc mallopt parameters (malloc.h) and the values set: allocations up to MMAP_THRESHOLD
#: come from the heap; up to TRIM_THRESHOLD of free memory at its top stays mapped.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 64 << 20


def configure() -> tuple[int, int, int]:
    """Collect generation 0 every GEN0_THRESHOLD allocations; returns the thresholds it
    replaced (``restore`` puts them back: a gateway run inside another program, as the
    tests do, leaves its collector as it found it)."""
    before = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, before[1], before[2])
    tune_malloc()
    return before


def tune_malloc() -> bool:
    """Fixed mmap and trim thresholds for glibc's malloc (see the module docstring); False
    where the C library is not glibc. Process-wide and for good: ``restore`` leaves it."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


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
