"""Is a 1-worker gateway's throughput steady, and what does a second worker cost? Issue
10's targets 4 and 5, measured with one command.

1. Steadiness: one server, five h2load runs in a row (c=32, ``-D`` seconds each), for the
   bare grpc.aio echo server (parse) and the gateway on the peers' MLP (ONNX Runtime,
   unbatched): requests/s of each run and their spread, (max - min) / median.
2. perf_analyzer at concurrency 4 (3-s windows, at most 10 trials, the issue's setting):
   ``--pa-tries`` attempts against each server, and how many reached a stable measurement.
3. ``--workers 1`` against ``--workers 2`` (c=32): requests/s, server CPU per request, and
   where the CPU went - each process's own, the load generator's (h2load shares the two
   cores here), and the context switches per request of the server processes.

    .venv/bin/python loadtest/stability.py [-D 8] [--pa-tries 3]

Writes ``loadtest/results/stability-<time>.json`` and the tables beside it (``.md``).
Needs h2load and the peers' tools (../shared/peers/install_tools.sh: echo server,
perf_analyzer).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_path  # loadtest/bench_path.py: the echo server, started as it does
from common import machine, mlp_body, stop_group

ROOT = Path(__file__).resolve().parents[1]
PEERS_DIR = Path(os.environ.get("PEERS_DIR", ROOT.parent / "shared" / "peers")).resolve()
PEERS_HOME = Path(os.environ.get("PEERS_HOME", Path.home() / "peers")).resolve()
SERVICE = "inference.GRPCInferenceService"
TICK = os.sysconf("SC_CLK_TCK")


def _proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def _switches(pid: int) -> int:
    total = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if "ctxt_switches" in line:
            total += int(line.split()[1])
    return total


def _group(pid: int) -> list[int]:
    """``pid`` and its children (a --workers supervisor and its workers)."""
    out = [pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if ppid == pid:
                out.append(int(entry.name))
    return out


@contextmanager
def gateway(repo: Path, work: Path, workers: int = 1) -> Iterator[tuple[int, int]]:
    port_file = work / f"ports-{time.monotonic_ns()}.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorgate.server.cli", "serve", "--repository", str(repo),
         "--port", "0", "--metrics-port", "0", "--port-file", str(port_file),
         "--log-level", "WARNING", "--workers", str(workers)],
        stdout=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not port_file.exists() or (
            workers > 1 and len(json.loads(port_file.read_text()).get("worker_pids", [])) < workers
        ):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the gateway did not start")
            time.sleep(0.1)
        time.sleep(1)
        yield json.loads(port_file.read_text())["grpc_port"], proc.pid
    finally:
        stop_group(proc)


@contextmanager
def echo() -> Iterator[tuple[int, int]]:
    with bench_path.echo() as (address, pid):
        yield int(address.rsplit(":", 1)[1]), pid


def h2load(port: int, body: Path, seconds: int, pids: list[int]) -> dict:
    """One c=32 run: requests/s, and the CPU of ``pids`` and of h2load itself."""
    cmd = ["h2load", "-t", "1", "-c", "32", "-m", "1", "-D", str(seconds), "-d", str(body),
           "-H", "content-type: application/grpc", "-H", "te: trailers",
           f"http://127.0.0.1:{port}/{SERVICE}/ModelInfer"]  # fmt: skip
    cpu0 = {p: _proc_cpu(p) for p in pids}
    sw0 = sum(_switches(p) for p in pids)
    started, before = time.monotonic(), os.times()
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout
    wall, after = time.monotonic() - started, os.times()
    # h2load's own CPU: what the children reaped meanwhile (h2load alone) used.
    client_cpu = (after.children_user - before.children_user) + (
        after.children_system - before.children_system
    )
    done = int(re.search(r"(\d+) succeeded", out).group(1))  # type: ignore[union-attr]
    cpu = {p: _proc_cpu(p) - cpu0[p] for p in pids}
    return {
        "rps": round(done / seconds, 1),
        "requests": done,
        "server_cpu_us_per_request": round(1e6 * sum(cpu.values()) / max(done, 1), 1),
        "cpu_s_by_process": {str(p): round(c, 2) for p, c in cpu.items()},
        "context_switches_per_request": round(
            (sum(_switches(p) for p in pids) - sw0) / max(done, 1), 2
        ),
        "wall_s": round(wall, 2),
        "h2load_cpu_s": round(client_cpu, 2),
    }


def perf_analyzer(port: int, tries: int) -> list[dict]:
    out = []
    for _ in range(tries):
        r = subprocess.run(
            [str(PEERS_HOME / "perf_analyzer"), "-m", "mlp", "-u", f"127.0.0.1:{port}",
             "-i", "grpc", "--concurrency-range", "4:4", "-p", "3000", "--max-trials", "10",
             "--shape", "input:1,64"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        text = r.stdout + r.stderr
        rps = re.search(r"Throughput: ([\d.]+) infer/sec", text)
        out.append({
            "stable": r.returncode == 0 and "Failed to obtain stable measurement" not in text,
            "returncode": r.returncode,
            "throughput": float(rps.group(1)) if rps else None,
            "tail": text[-400:],
        })  # fmt: skip
    return out


def spread(values: list[float]) -> float:
    return (max(values) - min(values)) / statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-D", type=int, default=8, help="seconds per h2load run")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--pa-tries", type=int, default=3)
    args = parser.parse_args()
    record: dict = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
                    "machine": machine(), "load_average_at_start": os.getloadavg()}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        repo = work / "models"
        (repo / "mlp" / "1").mkdir(parents=True)
        shutil.copy(PEERS_HOME / "models" / "mlp.onnx", repo / "mlp" / "1" / "model.onnx")
        body = mlp_body(work / "body.grpc")
        steady = {}
        for label, server in (("echo (parse)", lambda: echo()),
                              ("tensorgate, 1 worker", lambda: gateway(repo, work))):  # fmt: skip
            with server() as (port, pid):
                h2load(port, body, 2, [pid])  # warm-up
                runs = [h2load(port, body, args.D, [pid]) for _ in range(args.runs)]
                pa = perf_analyzer(port, args.pa_tries)
            steady[label] = {"runs": runs, "spread": round(spread([r["rps"] for r in runs]), 4),
                             "perf_analyzer": pa}  # fmt: skip
            print(label, [r["rps"] for r in runs], f"spread {steady[label]['spread']:.1%}",
                  "pa stable", sum(p["stable"] for p in pa), "/", len(pa), flush=True)  # fmt: skip
        record["steadiness"] = steady
        scaling = {}
        for workers in (1, 2, 1, 2):
            with gateway(repo, work, workers) as (port, pid):
                pids = _group(pid)
                h2load(port, body, 2, pids)
                run = h2load(port, body, args.D, pids)
            run["processes"] = len(pids)
            scaling.setdefault(str(workers), []).append(run)
            print(f"--workers {workers}", run, flush=True)
        record["workers"] = scaling
    lines = [f"Machine: {machine()}. Command: `{record['command']}`.", "",
             "| server | requests/s, runs in a row | spread | perf_analyzer c=4 stable |",
             "|---|---|---:|---:|"]  # fmt: skip
    for label, s in steady.items():
        rps = ", ".join(f"{r['rps']:,.0f}" for r in s["runs"])
        stable = sum(p["stable"] for p in s["perf_analyzer"])
        lines.append(
            f"| {label} | {rps} | {s['spread']:.1%} | {stable}/{len(s['perf_analyzer'])} |"
        )
    lines += ["", "| --workers | requests/s | server CPU us/request | h2load CPU us/request "
              "| cores busy (server + h2load) | context switches/request |",
              "|---:|---:|---:|---:|---:|---:|"]  # fmt: skip

    def med(runs: list[dict], f) -> float:
        return statistics.median(f(r) for r in runs)

    def busy(r: dict) -> float:
        return (sum(r["cpu_s_by_process"].values()) + r["h2load_cpu_s"]) / r["wall_s"]

    for workers, runs in scaling.items():
        lines.append(
            f"| {workers} | {med(runs, lambda r: r['rps']):,.0f} | "
            f"{med(runs, lambda r: r['server_cpu_us_per_request']):.0f} | "
            f"{med(runs, lambda r: 1e6 * r['h2load_cpu_s'] / r['requests']):.0f} | "
            f"{med(runs, busy):.2f} | "
            f"{med(runs, lambda r: r['context_switches_per_request']):.2f} |"
        )
    out = ROOT / "loadtest" / "results" / f"stability-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(record, indent=1))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
