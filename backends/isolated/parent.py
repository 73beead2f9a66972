"""The gateway's side: ``IsolatedBackend`` starts the worker, forwards calls, restarts it."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from tensorgate.backoff import RestartBackoff

from ..base import (
    Backend,
    BackendError,
    BackendOptions,
    BackendUnreachable,
    Signature,
)
from .wire import KINDS, describe_exit, recv_message, send_message

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Warmup:
    """What a restarted worker runs before it takes requests: ``requests`` executions of
    ``inputs``, all within ``timeout_s`` (the model's ``[warmup]``, server/warmup.py)."""

    inputs: dict[str, np.ndarray]
    requests: int
    timeout_s: float


class _Worker:
    """One worker process, the pipes to it, and the calls waiting for its replies."""

    def __init__(self, inner: str, label: str, on_death: Any) -> None:
        requests_r, requests_w = os.pipe()
        replies_r, replies_w = os.pipe()
        cmd = [
            sys.executable, "-m", "tensorgate.backends.isolated",
            "--backend", inner, "--label", label,
            "--requests-fd", str(requests_r), "--replies-fd", str(replies_w),
        ]  # fmt: skip
        try:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, pass_fds=(requests_r, replies_w), close_fds=True
            )
        except OSError as e:
            for fd in (requests_r, requests_w, replies_r, replies_w):
                os.close(fd)
            raise BackendUnreachable(f"cannot start a worker process for {label}: {e}") from e
        # The child holds its own copies now; ours must close, or EOF would never come.
        os.close(requests_r)
        os.close(replies_w)
        self.pid = self.proc.pid
        self.label = label
        self.started = time.monotonic()
        self._writer = os.fdopen(requests_w, "wb", buffering=1 << 16)
        self._reader = os.fdopen(replies_r, "rb", buffering=1 << 16)
        self._write_lock = threading.Lock()
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._pending: dict[int, Future[Any]] = {}
        self.dead = False
        self.death = ""
        self.killed_because = ""  # why the gateway killed it, when it did
        self._on_death = on_death
        self._thread = threading.Thread(
            target=self._read_replies, name=f"isolated-{label}-{self.pid}", daemon=True
        )
        self._thread.start()

    def call(self, op: str, *args: object) -> Future[Any]:
        """Send one request; the future resolves with its reply, or fails with
        BackendUnreachable if the worker dies first."""
        future: Future[Any] = Future()
        with self._lock:
            if self.dead:
                raise BackendUnreachable(self.death)
            rid = next(self._ids)
            self._pending[rid] = future
        try:
            with self._write_lock:
                send_message(self._writer, (op, rid, *args))
        except (OSError, ValueError) as e:  # broken pipe, or closed by _died meanwhile
            with self._lock:
                self._pending.pop(rid, None)
            raise BackendUnreachable(
                self.death or f"worker process {self.pid} of {self.label} cannot be reached: {e}"
            ) from None
        return future

    def _read_replies(self) -> None:
        try:
            while True:
                rid, status, *rest = recv_message(self._reader)
                with self._lock:
                    future = self._pending.pop(rid, None)
                if future is None:
                    continue
                if status == "ok":
                    future.set_result(rest[0])
                else:
                    kind, message = rest
                    future.set_exception(KINDS.get(kind, BackendError)(message))
        except EOFError:
            pass
        except Exception as e:  # a corrupt stream: this worker cannot be trusted any more
            log.error("worker %d of %s sent an unreadable reply: %s", self.pid, self.label, e)
            self.proc.kill()
        self._died()

    def _died(self) -> None:
        try:
            returncode = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # closed its pipe but lingers: finish it
            self.proc.kill()
            returncode = self.proc.wait()
        with self._lock:
            self.dead = True
            self.death = self.killed_because or (
                f"worker process {self.pid} of {self.label} {describe_exit(returncode)}"
            )
            pending, self._pending = self._pending, {}
        for future in pending.values():
            future.set_exception(BackendUnreachable(self.death))
        for stream in (self._writer, self._reader):
            with contextlib.suppress(OSError):
                stream.close()
        self._on_death(self)

    def kill(self, because: str) -> None:
        """SIGKILL the worker (it hangs); its calls in flight fail with ``because``."""
        with self._lock:
            if self.dead:
                return
            self.killed_because = because
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()

    def stop(self, timeout: float) -> None:
        """Close the request pipe (the worker exits on EOF); kill it if it lingers."""
        with self._write_lock, contextlib.suppress(OSError):
            self._writer.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("worker %d of %s did not exit; killing it", self.pid, self.label)
            self.proc.kill()
            self.proc.wait()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)


class IsolatedBackend(Backend):
    """Runs backend ``inner`` (a name from the backend table) in a worker process.

    Called exactly like any backend; see ``base.Backend`` for when each method is called.
    ``infer`` raises BackendUnreachable while the worker is dead or restarting, and when an
    execution runs longer than ``execution_timeout`` seconds: the worker is then killed (a
    hung framework call cannot be interrupted any other way) and restarted like a crashed
    one. A restarted worker runs ``warmup`` (when set) before it takes requests.
    """

    name: ClassVar[str] = "isolated"
    may_run_inline: ClassVar[bool] = False  # its calls wait on another process
    platform: ClassVar[str] = ""

    #: How long unload waits for the worker to exit before killing it.
    STOP_TIMEOUT = 10.0

    def __init__(self, inner: str, label: str = "", execution_timeout: float | None = None) -> None:
        self.inner = inner
        self.label = label or inner
        self.execution_timeout = execution_timeout
        self.warmup: Warmup | None = None  # set by the repository once the variant is warm
        self._lock = threading.Lock()
        self._worker: _Worker | None = None
        self._path: Path | None = None
        self._options: BackendOptions | None = None
        self._signature: Signature | None = None
        self._serving = False  # load succeeded: a dead worker is to be restarted
        self._restarting = False  # a restart thread owns bringing a worker back
        self._closed = threading.Event()
        self._restarter: threading.Thread | None = None
        self.backoff = RestartBackoff()  # delays between restarts (tensorgate/backoff.py)
        self._retry_at = 0.0
        self._down = ""  # why the worker is down, while it is
        self.restarts = 0

    @classmethod
    def find_model_file(cls, variant_dir: Path) -> Path | None:
        return None  # a wrapper: never detected, chosen by config (isolation = "process")

    @property
    def pid(self) -> int | None:
        """The worker's process id while one is serving."""
        worker = self._worker
        return worker.pid if worker is not None else None

    # -- the contract -------------------------------------------------------------------
    def load(self, path: Path, options: BackendOptions) -> Signature:
        from tensorgate.backends import backend_class

        # ModelMetadata reports the platform of the backend the worker runs, not "".
        self.platform = backend_class(self.inner).platform  # type: ignore[misc]
        self._path, self._options = path, options
        worker, signature = self._start()
        with self._lock:
            self._worker, self._serving = worker, True
        if worker.dead:  # died before it was ours: its death was not acted on
            self._on_death(worker)
        return signature

    def bind(self, signature: Signature) -> None:
        self._signature = signature
        worker = self._require_worker()
        worker.call("bind", signature).result()

    def infer(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        worker = self._require_worker()
        wanted = list(outputs) if outputs is not None else None
        call = worker.call("infer", dict(inputs), wanted)
        timeout = self.execution_timeout
        if timeout is None:
            return call.result()
        limit = f"an execution ran longer than execution_timeout_s = {timeout:g} s"
        return self._wait(worker, call, timeout, limit)

    def _wait(self, worker: _Worker, call: Future[Any], timeout: float, limit: str) -> Any:
        """The reply to ``call``; past ``timeout`` seconds the worker hangs (``limit`` says
        which limit it broke): kill it (its reader then fails every call in flight on it,
        and the worker is restarted as after a crash)."""
        try:
            return call.result(timeout)
        except FutureTimeout:
            because = f"worker process {worker.pid} of {self.label} killed: {limit}; restarting it"
            log.error("%s", because)
            worker.kill(because)
            raise BackendUnreachable(because) from None

    def kill(self) -> None:
        """Stop for good at once, without waiting for calls in flight (they fail): for a
        variant abandoned while an execution hangs (a warmup past its timeout). ``unload``
        must still be called."""
        self._closed.set()
        worker = self._worker
        if worker is not None:
            worker.kill(f"isolated backend of {self.label} is unloaded")

    def unload(self) -> None:
        self._closed.set()
        with self._lock:
            worker, self._worker = self._worker, None
        if worker is not None and not worker.dead:
            try:
                worker.call("unload").result(timeout=self.STOP_TIMEOUT)
            except Exception as e:  # it is going away either way
                log.debug("unload in worker %d of %s: %s", worker.pid, self.label, e)
            worker.stop(self.STOP_TIMEOUT)
        restarter = self._restarter
        if restarter is not None and restarter is not threading.current_thread():
            restarter.join(self.STOP_TIMEOUT)

    # -- worker lifecycle ---------------------------------------------------------------
    def _require_worker(self) -> _Worker:
        worker = self._worker
        if worker is None or worker.dead:
            raise BackendUnreachable(self._down_message())
        return worker

    def _down_message(self) -> str:
        if self._closed.is_set():
            return f"isolated backend of {self.label} is unloaded"
        wait = self._retry_at - time.monotonic()
        when = f"next attempt in {wait:.1f} s" if wait > 0 else "restarting now"
        return f"{self._down or 'worker process is down'}; {when}"

    def _start(self) -> tuple[_Worker, Signature]:
        """Start a worker and load the model in it (and bind and warm it up, on a restart).
        Raises BackendError (BackendUnreachable when the warmup runs past its timeout)."""
        assert self._path is not None and self._options is not None
        worker = _Worker(self.inner, self.label, self._on_death)
        log.info("isolated worker for %s (%s) started: pid %d", self.label, self.inner, worker.pid)
        try:
            signature = worker.call("load", str(self._path), self._options).result()
            if self._signature is not None:
                worker.call("bind", self._signature).result()
            warmup = self.warmup
            if warmup is not None:
                until = time.monotonic() + warmup.timeout_s
                limit = f"its warmup ran longer than [warmup] timeout_s = {warmup.timeout_s:g} s"
                for _ in range(warmup.requests):
                    call = worker.call("infer", warmup.inputs, None)
                    self._wait(worker, call, max(0.0, until - time.monotonic()), limit)
                log.info("isolated worker for %s warmed up: %d request(s)", self.label,
                         warmup.requests)  # fmt: skip
        except BaseException:
            worker.stop(self.STOP_TIMEOUT)
            raise
        self.backoff.started()
        return worker, signature

    def _on_death(self, worker: _Worker) -> None:
        """Called from the dead worker's reader thread."""
        with self._lock:
            if worker is not self._worker:
                return  # a worker that never served, or one replaced/unloaded already
            self._worker = None
            self._down = worker.death
            if self._closed.is_set() or not self._serving:
                return
            if self._restarting:
                return
            self._restarting = True
            # Started under the lock: unload() joins whatever thread it finds here.
            self._restarter = threading.Thread(
                target=self._restart, name=f"isolated-{self.label}-restart", daemon=True
            )
            self._restarter.start()
        log.error("%s; calls to it answer UNAVAILABLE until it is restarted", worker.death)

    def _restart(self) -> None:
        """The restart thread: start workers, with growing delays, until one loads."""
        while not self._closed.is_set():
            delay = self.backoff.delay()
            self._retry_at = time.monotonic() + delay
            if self._closed.wait(delay):
                break
            try:
                worker, _ = self._start()
            except BackendError as e:
                self._down = f"worker for {self.label} could not be restarted: {e}"
                log.error("%s (retrying)", self._down)
                continue
            with self._lock:
                closed = self._closed.is_set()
                if not closed:
                    self._worker, self._down, self._restarting = worker, "", False
                    self.restarts += 1
            if closed:  # unloaded while this worker was loading
                worker.stop(self.STOP_TIMEOUT)
                break
            log.info("isolated worker for %s restarted: pid %d", self.label, worker.pid)
            if worker.dead:
                self._on_death(worker)
            return
        with self._lock:
            self._restarting = False
