"""The unary request path, measured side by side: the bare grpc.aio echo server (parse), the
gateway as it is, and the gateway at an earlier revision, interleaved round by round on one
machine so that a busy moment hits them alike.

    .venv/bin/python loadtest/bench_path.py --before /work/wt/before/.venv/bin/python
    .venv/bin/python loadtest/bench_path.py --rounds 3 -D 8 -c 8,32   # echo and now only

``--before PYTHON`` is the interpreter of a second checkout (a ``git worktree`` at the older
commit with its own ``.venv``). Every server serves the peers' MLP 64->256->256->10 as ONNX
(``$PEERS_HOME/models``; one worker, metrics on) and is driven by the peers' h2load runner
(``bench_target.sh``), which also reads the server's CPU time. Writes one JSON line per run
to ``loadtest/results/path-<time>.jsonl`` and a summary (medians over rounds, ratios to the
echo server) to the ``.md`` beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from common import machine, stop_group

ROOT = Path(__file__).resolve().parents[1]
PEERS_DIR = Path(os.environ.get("PEERS_DIR", ROOT.parent / "shared" / "peers")).resolve()
PEERS_HOME = Path(os.environ.get("PEERS_HOME", Path.home() / "peers")).resolve()


@contextmanager
def gateway(python: str, repo: Path, work: Path) -> Iterator[tuple[str, int]]:
    port_file = work / f"ports-{time.monotonic_ns()}.json"
    log = (work / f"{port_file.stem}.log").open("wb")
    proc = subprocess.Popen(
        [python, "-m", "tensorgate.server.cli", "serve", "--repository", str(repo),
         "--port", "0", "--metrics-port", "0", "--port-file", str(port_file),
         "--log-level", "WARNING"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not port_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{python}: the gateway did not start, see {log.name}")
            time.sleep(0.1)
        yield f"127.0.0.1:{json.loads(port_file.read_text())['grpc_port']}", proc.pid
    finally:
        stop_group(proc)
        log.close()


@contextmanager
def echo(port: int = 18091) -> Iterator[tuple[str, int]]:
    env = {**os.environ, "PEERS_HOME": str(PEERS_HOME)}
    subprocess.run(["bash", str(PEERS_DIR / "start_echo.sh"), "parse", str(port)], env=env,
                   check=True, capture_output=True)  # fmt: skip
    try:
        pid = int((PEERS_HOME / "run" / "echo.pid").read_text())
        yield f"127.0.0.1:{port}", pid
    finally:
        subprocess.run(["bash", str(PEERS_DIR / "stop_echo.sh")], env=env, capture_output=True)


def bench(address: str, pid: int, label: str, c: str, d: int, out: Path) -> None:
    subprocess.run(
        ["bash", str(PEERS_DIR / "bench_target.sh"), "--target", address, "--model", "mlp",
         "--input", "input", "--datatype", "FP32", "--shape", "1,64", "--output", "output",
         "--data-npy", str(PEERS_HOME / "models" / "sample_input.npy"), "-c", c, "-D", str(d),
         "--pid", str(pid), "--label", label, "--out", str(out)],
        env={**os.environ, "PEERS_HOME": str(PEERS_HOME)}, check=False,
    )  # fmt: skip


def summary(rows: list[dict], command: str) -> str:
    by: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        if r.get("c") is not None and r.get("rps") is not None:  # skip probes and failed runs
            by.setdefault((r["label"], int(r["c"])), []).append(r)

    def med(label: str, c: int, key: str) -> float | None:
        values = [r[key] for r in by.get((label, c), []) if r.get(key) is not None]
        return statistics.median(values) if values else None

    lines = [
        f"Machine: {machine()}. Command: `{command}`. Medians over rounds; the servers ran "
        "interleaved, one at a time.",
        "",
        "| server | c | requests/s | p99 ms | server CPU ms/req | CPU vs echo | req/s vs echo |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    labels = sorted({label for label, _ in by}, key=lambda s: (s != "echo-parse", s))
    for c in sorted({c for _, c in by}):
        echo_cpu, echo_rps = (
            med("echo-parse", c, "server_cpu_ms_per_req"),
            med("echo-parse", c, "rps"),
        )
        for label in labels:
            rps, p99 = med(label, c, "rps"), med(label, c, "p99_ms")
            cpu = med(label, c, "server_cpu_ms_per_req")
            ratio_cpu = f"{cpu / echo_cpu:.2f}x" if cpu and echo_cpu else "-"
            ratio_rps = f"{rps / echo_rps:.2f}x" if rps and echo_rps else "-"
            lines.append(
                f"| {label} | {c} | {rps or 0:,.0f} | {p99 or 0:.1f} | "
                f"{cpu or 0:.3f} | {ratio_cpu} | {ratio_rps} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", help="python of a checkout at an earlier revision")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("-D", type=int, default=8, help="seconds per run")
    parser.add_argument("-c", default="8,32", help="concurrencies")
    args = parser.parse_args()
    results = ROOT / "loadtest" / "results"
    results.mkdir(parents=True, exist_ok=True)
    out = results / f"path-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    command = " ".join([Path(sys.executable).name, *sys.argv])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        repo = work / "models"
        (repo / "mlp" / "1").mkdir(parents=True)
        shutil.copy(PEERS_HOME / "models" / "mlp.onnx", repo / "mlp" / "1" / "model.onnx")
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}", flush=True)
            with echo() as (address, pid):
                bench(address, pid, "echo-parse", args.c, args.D, out)
            with gateway(sys.executable, repo, work) as (address, pid):
                bench(address, pid, "tensorgate-now", args.c, args.D, out)
            if args.before:
                with gateway(args.before, repo, work) as (address, pid):
                    bench(address, pid, "tensorgate-before", args.c, args.D, out)
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    report = summary(rows, command)
    out.with_suffix(".md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
