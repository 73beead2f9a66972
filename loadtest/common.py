"""Shared by the benchmark scripts in loadtest/: the machine a result came from, and the
CPU time a server process spent."""

from __future__ import annotations

import os
import platform
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
