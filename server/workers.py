"""``tensorgate serve --workers N``: N gateway processes on one port, and their supervisor.

Why processes: the Python gRPC request path is bound to one core by the GIL (~0.5 ms of
CPU per unary call, see docs/benchmarks.md), and framework pools in one process steal
each other's cores (docs/architecture.md, "One framework thread per variant"). Worker
processes scale both, each with its own models.

How they share a port: SO_REUSEPORT. The supervisor resolves the address once, by binding a
SO_REUSEPORT socket that it keeps open, never listening, for as long as it runs, so that
``--port 0`` picks one port that nothing else can take in between; every worker then binds
the same address with ``grpc.so_reuseport = 1`` and the kernel spreads incoming
connections over the workers' listening sockets (per connection, not per request: a
client with one HTTP/2 connection talks to one worker).

What the supervisor does: starts the workers and writes ``--port-file`` once all of them
serve; restarts a worker that dies, with a growing delay; on SIGTERM or SIGINT forwards
SIGTERM to the workers, waits for their drain and exits 0; forwards SIGHUP (reload the
credential files, server/credentials.py), which each worker also watches itself. It serves
``/metrics`` itself (server/metrics_http.py, with its token and TLS reloaded the same way):
the workers run prometheus-client in multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, a
directory the supervisor creates and removes), so counters and histograms are summed over
every worker that ever ran, and gauges are combined by their ``multiprocess_mode``.
``ModelStatistics`` stays per worker: it answers for the worker the call lands on. Rollouts
are shared through the same state directory (``rollouts/``, see ``server/rollouts.py``), so
one rollout drives every worker whichever worker its admin calls land on.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from tensorgate.backoff import RestartBackoff

from .credentials import CredentialWatcher
from .metrics_http import MetricsServer, start_metrics
from .settings import ServerSettings

log = logging.getLogger(__name__)

#: How long a worker may take to exit after SIGTERM, beyond --drain-timeout, before SIGKILL.
EXIT_GRACE_S = 15.0
#: Framework thread-count variables that bound each framework's *default* pool size (what a
#: variant gets with ``intra_op_threads = 0``): torch reads OMP_NUM_THREADS, TensorFlow its
#: own two. Set per worker to its share of the cores unless the caller set them.
THREAD_ENV = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "TF_NUM_INTRAOP_THREADS",
    "TF_NUM_INTEROP_THREADS",
)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` with SO_REUSEPORT and never listening: it holds the
    port (chosen by the kernel when ``port`` is 0) for the workers to bind too."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    port_file: Path | None = None
    started: float = 0.0
    # Delays between restarts (tensorgate/backoff.py).
    backoff: RestartBackoff = field(default_factory=RestartBackoff)
    restart_at: float | None = None
    last_cpu: float = 0.0  # CPU seconds last read from /proc, kept when it dies

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None


def _cpu_seconds(pid: int) -> float | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _memory_bytes(pid: int) -> tuple[int, int]:
    """(resident, virtual) bytes of a process, 0 when it is gone."""
    try:
        pages = Path(f"/proc/{pid}/statm").read_text().split()
    except OSError:
        return 0, 0
    size = os.sysconf("SC_PAGE_SIZE")
    return int(pages[1]) * size, int(pages[0]) * size


def _open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


class ServerProcessCollector:
    """``process_*`` for the whole server, supervisor and workers together: CPU seconds
    (dead workers' last reading included, so the counter never goes back), resident and
    virtual memory and open fds of the processes alive now."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def collect(self) -> Iterator[object]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        pids = [os.getpid(), *self.supervisor.worker_pids()]
        cpu = self.supervisor.dead_cpu + sum(self.supervisor.cpu_of(p) for p in pids)
        memory = [_memory_bytes(p) for p in pids]
        yield CounterMetricFamily(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds (supervisor and all workers).",
            value=cpu,
        )
        yield GaugeMetricFamily(
            "process_resident_memory_bytes",
            "Resident memory size in bytes (supervisor and live workers).",
            value=sum(m[0] for m in memory),
        )
        yield GaugeMetricFamily(
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes (supervisor and live workers).",
            value=sum(m[1] for m in memory),
        )
        yield GaugeMetricFamily(
            "process_open_fds",
            "Number of open file descriptors (supervisor and live workers).",
            value=sum(_open_fds(p) for p in pids),
        )
        yield GaugeMetricFamily(
            "process_start_time_seconds",
            "Start time of the supervisor since unix epoch in seconds.",
            value=self.supervisor.started_at,
        )


class Supervisor:
    """Runs ``workers`` gateway processes on one port until SIGTERM/SIGINT (see module doc).

    ``run()`` blocks and returns the exit status: 0 after a clean drain, 1 when a worker
    could not start or had to be killed.
    """

    def __init__(self, settings: ServerSettings, workers: int, log_level: str = "INFO") -> None:
        if workers < 2:
            raise ValueError("a supervisor needs at least 2 workers; serve 1 in-process")
        self.settings = settings
        self.log_level = log_level
        self.workers = [_Worker(i) for i in range(workers)]
        self.dead_cpu = 0.0
        self.started_at = time.time()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # the metrics thread reads worker pids and CPU
        self._socket: socket.socket | None = None
        self._state_dir: Path | None = None
        self._multiproc_dir: Path | None = None
        self._metrics_server: MetricsServer | None = None
        self._credentials: CredentialWatcher | None = None
        self.grpc_port = 0
        self.metrics_port: int | None = None
        self._restarts = None  # Counter, created with the registry

    # -- public --------------------------------------------------------------------------
    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())
        signal.signal(signal.SIGHUP, lambda *_: self._reload())
        try:
            return self._run()
        finally:
            self._cleanup()

    def _reload(self) -> None:
        """SIGHUP: every worker re-reads its credential files, and so does /metrics."""
        log.info("SIGHUP: reloading credentials in %d worker(s)", len(self.worker_pids()))
        for pid in self.worker_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)
        if self._credentials is not None:
            self._credentials.reload()

    def worker_pids(self) -> list[int]:
        with self._lock:
            return [w.pid for w in self.workers if w.pid is not None]

    def cpu_of(self, pid: int) -> float:
        """CPU seconds of a live process (remembered per worker for when it dies)."""
        cpu = _cpu_seconds(pid) or 0.0
        with self._lock:
            for w in self.workers:
                if w.pid == pid:
                    w.last_cpu = max(w.last_cpu, cpu)
        return cpu

    # -- start ---------------------------------------------------------------------------
    def _run(self) -> int:
        s = self.settings
        self._state_dir = Path(tempfile.mkdtemp(prefix=f"tensorgate-{os.getpid()}-"))
        self._multiproc_dir = self._state_dir / "metrics"
        self._multiproc_dir.mkdir()
        self._socket = reserve_port(s.host, s.port)
        self.grpc_port = self._socket.getsockname()[1]
        if s.metrics_port is not None:
            self._start_metrics()
        log.info(
            "starting %d workers on %s:%d (%d cores; framework default pools capped at %s "
            "thread(s) per worker)",
            len(self.workers),
            s.host,
            self.grpc_port,
            available_cores(),
            self._thread_share(),
        )
        for w in self.workers:
            self._spawn(w)
        if not self._wait_serving():
            return 1
        self._write_port_file()
        log.info(
            "tensorgate serving gRPC on %s:%d with %d workers (pids %s)%s",
            s.host,
            self.grpc_port,
            len(self.workers),
            ", ".join(str(p) for p in self.worker_pids()),
            f", metrics on {self._metrics_server.scheme}://{s.metrics_host or s.host}:"
            f"{self.metrics_port}/metrics"
            if self._metrics_server is not None
            else "",
        )
        self._supervise()
        return self._shutdown()

    def _start_metrics(self) -> None:
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Gauge,
            disable_created_metrics,
        )
        from prometheus_client.multiprocess import MultiProcessCollector
        from prometheus_client.platform_collector import PlatformCollector

        assert self._multiproc_dir is not None
        disable_created_metrics()  # as in the workers: no *_created series
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self._multiproc_dir))
        registry.register(ServerProcessCollector(self))  # type: ignore[arg-type]
        PlatformCollector(registry=registry)
        Gauge(
            "tensorgate_workers",
            "Worker processes running (serve --workers).",
            registry=registry,
        ).set_function(lambda: len(self.worker_pids()))
        self._restarts = Counter(
            "tensorgate_worker_restarts",
            "Worker processes restarted after they died.",
            registry=registry,
        )
        server = start_metrics(registry, self.settings)
        assert server is not None
        self._metrics_server = server
        self.metrics_port = server.port
        self._credentials = CredentialWatcher(
            self.settings, on_metrics_token=server.set_token, on_metrics_tls=server.set_tls
        )
        self._credentials.start_thread(self._stop)

    def _thread_share(self) -> int:
        return max(1, available_cores() // len(self.workers))

    def _worker_env(self) -> dict[str, str]:
        env = dict(os.environ)
        assert self._multiproc_dir is not None
        env["PROMETHEUS_MULTIPROC_DIR"] = str(self._multiproc_dir)
        share = str(self._thread_share())
        for name in THREAD_ENV:
            env.setdefault(name, share)
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        return env

    def _spawn(self, w: _Worker) -> None:
        assert self._state_dir is not None
        w.port_file = self._state_dir / f"worker-{w.index}-{time.monotonic_ns()}.json"
        settings = replace(
            self.settings,
            port=self.grpc_port,
            metrics_port=None,  # the supervisor serves /metrics for all
            port_file=w.port_file,
            reuse_port=True,
            worker_index=w.index,
            state_dir=self._state_dir,
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "tensorgate.server.workers"],
            stdin=subprocess.PIPE,
            env=self._worker_env(),
        )
        assert proc.stdin is not None
        # Settings (tokens included) travel over a pipe, never in argv or the environment.
        proc.stdin.write(pickle.dumps((settings, self.log_level, os.getpid())))
        proc.stdin.close()
        with self._lock:
            w.proc = proc
            w.started = time.monotonic()
            w.backoff.started()
            w.restart_at = None

    def _wait_serving(self) -> bool:
        """Wait until every worker wrote its port file. False when one exits first (it
        could not bind or start: nothing to restart into) or a signal asks to stop."""
        pending = list(self.workers)
        while pending:
            for w in list(pending):
                assert w.proc is not None and w.port_file is not None
                if w.port_file.exists():
                    pending.remove(w)
                elif w.proc.poll() is not None:
                    log.error(
                        "worker %d exited with %s during start-up; stopping the others",
                        w.index,
                        w.proc.returncode,
                    )
                    self._shutdown()
                    return False
            if self._stop.wait(0.05):
                self._shutdown()
                return False
        return True

    def _write_port_file(self) -> None:
        path = self.settings.port_file
        if path is None:
            return
        tmp = path.with_suffix(".tmp")
        tmp.write_text(
            json.dumps(
                {
                    "grpc_port": self.grpc_port,
                    "metrics_port": self.metrics_port,
                    "worker_pids": self.worker_pids(),
                }
            )
        )
        tmp.replace(path)

    # -- supervise -----------------------------------------------------------------------
    def _supervise(self) -> None:
        while not self._stop.wait(0.2):
            now = time.monotonic()
            for w in self.workers:
                assert w.proc is not None
                if w.restart_at is not None:
                    if now >= w.restart_at:
                        log.info("restarting worker %d", w.index)
                        self._spawn(w)
                        if self._restarts is not None:
                            self._restarts.inc()
                    continue
                if w.proc.poll() is None:
                    continue
                self._reap(w)
                lived = now - w.started
                delay = w.backoff.delay()
                w.restart_at = now + delay
                log.warning(
                    "worker %d (pid %d) exited with %s after %.1f s; restarting in %.1f s",
                    w.index,
                    w.proc.pid,
                    w.proc.returncode,
                    lived,
                    delay,
                )

    def _reap(self, w: _Worker) -> None:
        """Account for a worker that exited: keep its CPU, and drop its live gauges."""
        from prometheus_client import multiprocess

        assert w.proc is not None
        with self._lock:
            self.dead_cpu += w.last_cpu
            w.last_cpu = 0.0
        if self._multiproc_dir is not None:
            multiprocess.mark_process_dead(w.proc.pid, str(self._multiproc_dir))

    # -- stop ----------------------------------------------------------------------------
    def _shutdown(self) -> int:
        """SIGTERM every worker, wait for their drain, SIGKILL what is left. 0 when all
        exited on their own."""
        live = [w for w in self.workers if w.proc is not None and w.proc.poll() is None]
        log.info("stopping %d worker(s): draining (up to %.0f s)", len(live),
                 self.settings.drain_timeout)  # fmt: skip
        for w in live:
            assert w.proc is not None
            with contextlib.suppress(ProcessLookupError):
                w.proc.send_signal(signal.SIGTERM)
        until = time.monotonic() + self.settings.drain_timeout + EXIT_GRACE_S
        status = 0
        for w in live:
            assert w.proc is not None
            try:
                w.proc.wait(max(0.0, until - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker %d (pid %d) did not exit: killed", w.index, w.proc.pid)
                w.proc.kill()
                w.proc.wait()
                status = 1
        for w in self.workers:  # those waiting for a restart included
            w.restart_at = None
        log.info("stopped")
        return status

    def _cleanup(self) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is None:
                w.proc.kill()
                w.proc.wait()
        if self._metrics_server is not None:
            self._metrics_server.close()
        if self._socket is not None:
            self._socket.close()
        if self._state_dir is not None:
            shutil.rmtree(self._state_dir, ignore_errors=True)


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this worker when the supervisor dies (even by SIGKILL), so no
    orphan keeps serving on the port."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def worker_main() -> None:
    """Entry point of one worker process: settings arrive pickled on stdin."""
    # SIGHUP means "reload credentials" once serve() handles it; until then, not "exit".
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    settings, log_level, parent = pickle.loads(sys.stdin.buffer.read())
    assert isinstance(settings, ServerSettings)
    _die_with_parent()
    if os.getppid() != parent:  # the supervisor died before prctl took effect
        sys.exit(1)
    logging.basicConfig(
        level=log_level.upper(),
        format=f"%(asctime)s %(levelname)s [worker {settings.worker_index}] %(name)s: %(message)s",
    )
    from .app import serve
    from .eventloop import run

    run(serve(settings), settings.event_loop)


if __name__ == "__main__":
    worker_main()
