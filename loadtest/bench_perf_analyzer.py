"""Triton's perf_analyzer against the gateway, with its raw output kept.

Starts ``tensorgate serve`` on the demo repository (or uses ``--target``), runs
perf_analyzer over gRPC at the given concurrencies, prints its output, and writes to
``loadtest/results/perf-analyzer-<UTC time>.json`` (or ``--out``): the command lines (this
script's and perf_analyzer's), the machine, perf_analyzer's full output and CSV, and per
concurrency the figures docs/benchmarks.md quotes (client throughput and latencies, the
server-side breakdown from ModelStatistics) and whether perf_analyzer reached a stable
measurement.

    .venv/bin/python loadtest/bench_perf_analyzer.py [--model scorer] [--version onnx] \\
        [--concurrency-range 1:4:3] [--interval-ms 3000] [--target HOST:PORT] [-- PA_ARGS...]

perf_analyzer 2.60.0 is installed by ``bash ../shared/peers/install_tools.sh`` (as
``$PEERS_HOME/perf_analyzer``, default ``~/peers``); ``--perf-analyzer`` or
``$PERF_ANALYZER`` point elsewhere, and one on the PATH is used otherwise.

Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from common import results_path, write_results  # noqa: E402 - loadtest/common.py, beside this

from tensorgate.server.demo import write_demo_repository  # noqa: E402
from tests.serverproc import ServerProcess  # noqa: E402

PEERS_HOME = Path(os.environ.get("PEERS_HOME", Path.home() / "peers"))
# perf_analyzer's per-concurrency report: "Request concurrency: N" and then its figures.
BLOCK = re.compile(r"^Request concurrency: (\d+)$", re.M)
FIGURES = {
    "throughput_infer_per_s": r"Throughput: ([\d.]+) infer/sec",
    "avg_latency_us": r"Avg latency: (\d+) usec",
    "latency_stddev_us": r"standard deviation (\d+) usec",
    "p50_us": r"p50 latency: (\d+) usec",
    "p90_us": r"p90 latency: (\d+) usec",
    "p95_us": r"p95 latency: (\d+) usec",
    "p99_us": r"p99 latency: (\d+) usec",
    "server_request_us": r"Avg request latency: (\d+) usec",
    "server_overhead_us": r"overhead (\d+) usec",
    "server_queue_us": r"queue (\d+) usec",
    "server_compute_input_us": r"compute input (\d+) usec",
    "server_compute_infer_us": r"compute infer (\d+) usec",
    "server_compute_output_us": r"compute output (\d+) usec",
}
UNSTABLE = "Failed to obtain stable measurement"


def find_perf_analyzer(given: str | None) -> str:
    for candidate in (given, os.environ.get("PERF_ANALYZER"), PEERS_HOME / "perf_analyzer"):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    on_path = shutil.which("perf_analyzer")
    if on_path is None:
        raise SystemExit(
            "perf_analyzer not found: run `bash ../shared/peers/install_tools.sh` "
            f"(installs {PEERS_HOME / 'perf_analyzer'}), or pass --perf-analyzer PATH"
        )
    return on_path


def parse(output: str) -> list[dict]:
    """One dict per concurrency perf_analyzer reported, in its order."""
    starts = list(BLOCK.finditer(output))
    rows = []
    for i, m in enumerate(starts):
        end = starts[i + 1].start() if i + 1 < len(starts) else len(output)
        text = output[m.start() : end].split("Inferences/Second vs.")[0]
        row: dict[str, object] = {"concurrency": int(m.group(1))}
        for key, pattern in FIGURES.items():
            found = re.search(pattern, text)
            if found:
                row[key] = float(found.group(1)) if "." in found.group(1) else int(found.group(1))
        rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="scorer")
    parser.add_argument("--version", default="", help="pin a variant (-x); see the note on "
                        "named variants in docs/benchmarks.md")  # fmt: skip
    parser.add_argument("--shape", default="input:1,64", help="perf_analyzer --shape")
    parser.add_argument("--concurrency-range", default="1:4:3", help="start:end:step")
    parser.add_argument("--interval-ms", type=int, default=3000, help="measurement window")
    parser.add_argument("--target", help="an already running server instead of the demo")
    parser.add_argument("--workers", type=int, default=1, help="tensorgate serve --workers")
    parser.add_argument("--perf-analyzer", help="the perf_analyzer executable")
    parser.add_argument("--out", type=Path, help="results file (default "
                        "loadtest/results/perf-analyzer-<UTC time>.json)")  # fmt: skip
    parser.add_argument("pa_args", nargs="*", help="more perf_analyzer arguments (after --)")
    args = parser.parse_args()
    started = time.time()
    out = args.out or results_path("perf-analyzer")
    binary = find_perf_analyzer(args.perf_analyzer)

    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tg-pa-")))
        if args.target:
            address = args.target
        else:
            repo = write_demo_repository(tmp / "models")
            server = stack.enter_context(
                ServerProcess(repo, tmp, "--workers", str(args.workers), "--log-level", "WARNING")
            )
            address = server.address
        csv_path = tmp / "pa.csv"
        command = [
            binary, "-m", args.model, "-i", "grpc", "-u", address, "--shape", args.shape,
            "--concurrency-range", args.concurrency_range, "-p", str(args.interval_ms),
            "-f", str(csv_path), *(["-x", args.version] if args.version else []), *args.pa_args,
        ]  # fmt: skip
        print("$", shlex.join(command), flush=True)
        proc = subprocess.run(command, capture_output=True, text=True, check=False)
        print(proc.stdout, proc.stderr, sep="", flush=True)
        csv_text = csv_path.read_text() if csv_path.exists() else ""

    output = proc.stdout + proc.stderr
    rows = parse(proc.stdout)
    unstable = output.count(UNSTABLE)
    write_results(
        out,
        {
            "perf_analyzer_command": shlex.join(
                [c if c != address else "<gateway>" for c in command]
            ),
            "server": args.target or f"tensorgate serve --workers {args.workers} (demo repository)",
            "exit_code": proc.returncode,
            "unstable_measurements": unstable,
            "concurrencies": rows,
            "output": output,
            "csv": csv_text,
        },
        started,
    )
    print(f"results: {out}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
