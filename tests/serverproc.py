"""Start a real ``tensorgate serve`` process on ephemeral ports and talk to it.

The server binds port 0 itself and writes the ports it got to a port file, so no test ever
binds a port, closes it and hopes to reuse it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from prometheus_client.parser import text_string_to_metric_families

T = TypeVar("T")
REPO_ROOT = Path(__file__).resolve().parents[1]
#: The front end the servers of the running test use ("python" or "native"): set by the
#: ``front_end`` fixture (tests/conftest.py) for every test that talks gRPC.
FRONT_END = {"current": "python"}
TRITON_PYTHON = Path(
    os.environ.get("TENSORGATE_TRITON_PYTHON", REPO_ROOT / ".venv-triton" / "bin" / "python")
)


class ServerProcess:
    """A gateway subprocess. Use as a context manager; ``stop()`` checks a clean exit."""

    def __init__(
        self,
        repository: Path,
        workdir: Path,
        *args: str,
        env: dict[str, str] | None = None,
        startup_timeout: float = 180.0,
        prefix: tuple[str, ...] = (),
        front_end: str | None = None,
    ) -> None:
        """``prefix`` goes before the command, e.g. ``setpriv`` to run as another user;
        ``front_end`` defaults to the running test's (``FRONT_END``)."""
        self.repository = repository
        self.prefix = prefix
        self.port_file = workdir / f"ports-{os.getpid()}-{time.monotonic_ns()}.json"
        self.log_path = self.port_file.with_suffix(".log")
        self.front_end = front_end or FRONT_END["current"]
        self.args = args if "--front-end" in args else (*args, "--front-end", self.front_end)
        self.env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.grpc_port = 0
        self.metrics_port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self) -> ServerProcess:
        cmd = [
            *self.prefix, sys.executable, "-m", "tensorgate.server.cli", "serve",
            "--repository", str(self.repository), "--host", "127.0.0.1",
            "--port", "0", "--metrics-port", "0", "--port-file", str(self.port_file),
            *self.args,
        ]  # fmt: skip
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + self.startup_timeout
        while not self.port_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(
                    f"server did not start in {self.startup_timeout} s:\n{self.log()}"
                )
            time.sleep(0.1)
        ports = json.loads(self.port_file.read_text())
        self.grpc_port, self.metrics_port = ports["grpc_port"], ports["metrics_port"]
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def scrape(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=10) as r:
            return r.read().decode()

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples of metric ``name`` whose labels include ``labels``."""
        total = 0.0
        for family in text_string_to_metric_families(self.scrape()):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    total += sample.value
        return total

    def children(self) -> dict[int, str]:
        """The server's child processes: {pid: command line}."""
        assert self.proc is not None
        found: dict[int, str] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                # The command name in parentheses may contain spaces: split after it.
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                if ppid == self.proc.pid:
                    cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
                    found[int(entry.name)] = cmdline.decode(errors="replace").strip()
            except (OSError, IndexError, ValueError):
                continue  # exited while we looked
        return found

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, wait for the drain, return the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(repo: Path, workdir: Path) -> Iterator[ServerProcess]:
    """For fixtures (``yield from serve(...)``): a gateway serving ``repo`` for as long as
    the fixture lives; checks that it drains and exits cleanly."""
    proc = ServerProcess(repo, workdir)
    with proc:
        yield proc
    assert proc.proc is not None and proc.proc.returncode == 0, proc.log()


def wait_until(
    probe: Callable[[], T], timeout: float = 60.0, what: str = "the condition", every: float = 0.05
) -> T:
    """Call ``probe`` until it returns something true, and return that; fail after
    ``timeout`` seconds (a bound for a hung server, not a timing expectation)."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        time.sleep(every)


def wait_busy(server: ServerProcess, model: str, inflight: int, queued: int) -> None:
    """Wait until the server reports ``inflight`` requests for ``model``, ``queued`` of them
    waiting in its queue (the rest computing)."""

    def state() -> bool:
        return (
            server.metric("tensorgate_inflight_requests", model=model) == inflight
            and server.metric("tensorgate_queued_requests", model=model) == queued
        )

    wait_until(state, 60, f"{model}: {inflight} in flight, {queued} queued")


def run_triton_script(script: str, *args: str, timeout: float = 120.0) -> dict:
    """Run ``script`` with the tritonclient interpreter (its own venv and process: it
    registers its own ``inference`` protos) and return the JSON it prints last."""
    if not TRITON_PYTHON.exists():
        raise AssertionError(
            f"no tritonclient interpreter at {TRITON_PYTHON}; create it with: python -m venv "
            ".venv-triton && .venv-triton/bin/pip install 'tritonclient[grpc]==2.73.0'"
        )
    # Once the script has printed, it exits at once: grpc's Channel.close, called from
    # tritonclient's __del__ at interpreter exit, can wait forever on a lock (seen about one
    # run in ten: InferenceServerClient.__del__ -> Channel._close -> Condition.wait, after
    # every answer had arrived and the report was printed).
    script += "\nimport os as _os, sys as _sys\n_sys.stdout.flush()\n_os._exit(0)\n"
    proc = subprocess.run(
        [str(TRITON_PYTHON), "-c", script, *args], capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0 or not proc.stdout.strip():
        raise AssertionError(
            f"tritonclient script failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])
