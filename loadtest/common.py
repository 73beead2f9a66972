"""Shared by the benchmark scripts in loadtest/: the machine a result came from, the CPU
time a server process spent, and the raw results file every cited figure comes from."""

from __future__ import annotations

import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path


def machine() -> str:
    """CPU count and model, and the Python version: the header of every result table."""
    cpu = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (
        f"{os.cpu_count()} CPUs ({cpu or platform.machine()}), Python {platform.python_version()}"
    )


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop_group(proc: subprocess.Popen, wait: float = 60.0) -> None:
    """SIGTERM a server started with ``start_new_session=True`` and its children; SIGKILL
    them if they have not exited after ``wait`` seconds."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(wait)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def mlp_body(path: Path) -> Path:
    """Write the peers' MLP request (data/mlp.json) framed for h2load's ``-d`` to ``path``."""
    here = Path(__file__).resolve().parent
    subprocess.run(
        [sys.executable, str(here / "make_requests.py"), "--body", str(here / "data" / "mlp.json"),
         str(path)],
        check=True,
    )  # fmt: skip
    return path


def rss_mib(pid: int) -> float:
    """Resident memory of a process in MiB (VmRSS, /proc); 0 when it has none."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid`` and its direct children (a server's ``--workers``)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited while we looked
        fields = stat.rsplit(")", 1)[1].split()
        if int(entry.name) == pid or int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


RESULTS = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parents[1]


def command_line() -> str:
    """How this script was started, paths relative to the checkout where they are inside it."""

    def rel(arg: str) -> str:
        path = Path(arg)
        if path.is_absolute() and path.is_relative_to(REPO_ROOT):
            return str(path.relative_to(REPO_ROOT))
        return arg

    return shlex.join([rel(sys.executable), *(rel(a) for a in sys.argv)])


def results_path(stem: str) -> Path:
    """``loadtest/results/<stem>-<UTC time>.json``: where a run's raw results go."""
    return RESULTS / f"{stem}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json"


def write_results(path: Path, results: object, started: float) -> Path:
    """Write ``results`` with what a reader needs to trust them: the command, the machine,
    when it ran (UTC) and how busy the machine was (load averages at the end)."""
    record = {
        "command": command_line(),
        "machine": machine(),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(time.time() - started, 1),
        "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
        "results": results,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
