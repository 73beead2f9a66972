"""Backend isolation: run a variant's backend in a worker process of its own.

``isolation = "process"`` in a model's config.toml (top level, or per ``[variants.NAME]``)
wraps the variant's backend in ``IsolatedBackend``. It implements the same contract
(``load``, ``bind``, ``infer``, ``unload``) by delegating each call to the real backend in a
child process, so a framework that crashes - a segfault, an abort, the OOM killer, a SIGKILL
- takes down only that worker:

- calls in flight on the variant, and calls made while the worker is down, raise
  ``BackendUnreachable`` (UNAVAILABLE to the caller; routing's fallback treats it as
  retryable), and the gateway keeps serving everything else;
- the worker is restarted with exponential backoff (0.5 s, 1 s, 2 s ... up to 30 s; back to
  0.5 s once a worker has served 60 s: tensorgate/backoff.py, shared with `serve --workers`),
  and the model is loaded again in the new worker.

It is crash isolation, not a security boundary: the worker runs with the gateway's user and
environment, and the two trust each other's messages.

Wire protocol, over two pipes (requests one way, replies the other; the child's stdout and
stderr stay the server log's): each message is a pickle (protocol 5) whose numpy buffers
travel out of band, written straight from the arrays' memory and read into fresh numpy
buffers on the other side, so tensors are copied once through the pipe and never pickled::

    <u32 pickle length> <u32 buffer count> <u64 length of each buffer...> <pickle> <buffers...>

The child is ``python -m tensorgate.backends.isolated`` (``child.py``; ``ps`` shows the
variant it serves); it ignores SIGINT (a Ctrl-C reaches the whole process group, and the
gateway must drain first) and exits when its request pipe closes, so it never outlives the
gateway. The pieces: ``wire.py`` (the protocol), ``parent.py`` (``IsolatedBackend``, the
gateway's side), ``child.py`` (the worker).
"""

from .parent import IsolatedBackend, Warmup

__all__ = ["IsolatedBackend", "Warmup"]
