"""The worker process: ``python -m tensorgate.backends.isolated`` runs ``main`` here."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import numpy as np

from tensorgate.backends import backend_class

from ..base import (
    Backend,
    BackendError,
)
from .wire import error_reply, recv_message, send_message

log = logging.getLogger(__name__)


class _Serve:
    """The worker process: reads requests, runs the real backend, writes replies."""

    def __init__(self, inner: str, label: str, requests: IO[bytes], replies: IO[bytes]) -> None:
        self.inner = inner
        self.label = label
        self.requests = requests
        self.replies = replies
        self.write_lock = threading.Lock()
        self.backend: Backend | None = None
        self.pool: ThreadPoolExecutor | None = None

    def reply(self, message: tuple) -> None:
        with self.write_lock:
            send_message(self.replies, message)

    def run(self) -> None:
        while True:
            try:
                op, rid, *args = recv_message(self.requests)
            except EOFError:
                return  # the gateway closed the pipe (unload) or is gone
            if op == "infer" and self.pool is not None:
                self.pool.submit(self.infer, rid, *args)
                continue
            try:
                result = self.control(op, *args)
            except BaseException as e:
                self.reply(error_reply(rid, e))
            else:
                self.reply((rid, "ok", result))
            if op == "unload":
                return

    def control(self, op: str, *args: Any) -> Any:
        if op == "load":
            path, options = args
            self.backend = backend_class(self.inner)()
            signature = self.backend.load(Path(path), options)
            self.pool = ThreadPoolExecutor(max(1, options.instances), thread_name_prefix="infer")
            return signature
        if self.backend is None:
            raise BackendError(f"worker for {self.label}: '{op}' before the model was loaded")
        if op == "bind":
            self.backend.bind(args[0])
            return None
        if op == "unload":
            if self.pool is not None:
                self.pool.shutdown(wait=True)
            self.backend.unload()
            return None
        raise BackendError(f"worker for {self.label}: unknown request '{op}'")

    def infer(self, rid: int, inputs: dict[str, np.ndarray], outputs: list[str] | None) -> None:
        assert self.backend is not None
        try:
            result = self.backend.infer(inputs, outputs)
        except BaseException as e:
            self.reply(error_reply(rid, e))
        else:
            self.reply((rid, "ok", result))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="tensorgate isolated backend worker")
    parser.add_argument("--backend", required=True)
    parser.add_argument("--label", required=True)
    parser.add_argument("--requests-fd", type=int, required=True)
    parser.add_argument("--replies-fd", type=int, required=True)
    args = parser.parse_args(argv)
    # Ctrl-C reaches the whole process group: the gateway drains, then unloads this worker.
    # SIGHUP (to the group, or a closed terminal) is the gateway's: it reloads credentials.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s %(levelname)s worker[{args.label} pid {os.getpid()}]: %(message)s",
    )
    serve = _Serve(
        args.backend,
        args.label,
        os.fdopen(args.requests_fd, "rb", buffering=1 << 16),
        os.fdopen(args.replies_fd, "wb", buffering=1 << 16),
    )
    try:
        serve.run()
    finally:
        with contextlib.suppress(OSError):
            serve.replies.flush()
        # Framework thread pools may hold non-daemon threads: leave without waiting on them.
        os._exit(0)
