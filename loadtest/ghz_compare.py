"""ghz, ``tensorgate bench`` and h2load against one gateway, one after another, with the
same request: how their figures compare (docs/ghz.md, "How ghz's figures compare").

One server (per ``--front-end``) serves the demo repository; each tool sends
``data/scorer.json`` pinned to the scorer's ``onnx`` variant with the same concurrency over
the same number of connections (ghz ``-c C --connections K``, ``tensorgate bench -c C
--connections K``, h2load ``-c K -m C/K``: C calls in flight over K HTTP/2 connections),
for ``-D`` seconds after a 2-s warm-up. For each run: what the tool reports (requests/s,
latency, status codes), what the server counted for the same run (ModelStatistics), the
server's CPU per request and the tool's own CPU per request (the tool shares the machine's
cores with the server).

    .venv/bin/python loadtest/ghz_compare.py [-D 8] [-c 16] [--connections 4] [--rounds 1]
        [--front-end python[,native]] [--repository DIR]   # default: the demo, written
                                                            # to a temporary folder

Writes ``loadtest/results/ghz-compare-<time>.json`` and the table beside it (``.md``).
Needs ghz (``bash scripts/install_ghz.sh``) and h2load (``apt-get install nghttp2-client``,
or ``../shared/peers/install_tools.sh``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import gateway  # loadtest/benchmark.py: starts a gateway, yields (address, pid)
from common import REPO_ROOT, results_path, tree_cpu_seconds, write_results
from make_requests import delimited, grpc_frame, load_request

from tensorgate import codec
from tensorgate.clients import Client
from tensorgate.server.demo import write_demo_repository

MODEL, VARIANT = "scorer", "onnx"
SERVICE = "inference.GRPCInferenceService"
REQUEST = REPO_ROOT / "loadtest" / "data" / "scorer.json"
WARMUP_S = 2


def find_ghz() -> str:
    """$TENSORGATE_GHZ, else scripts/install_ghz.sh's tools folder, else PATH."""
    tools = Path(os.environ.get("TENSORGATE_TOOLS", Path.home() / ".cache/tensorgate/tools"))
    for candidate in (os.environ.get("TENSORGATE_GHZ"), tools / "bin" / "ghz", shutil.which("ghz")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    sys.exit("ghz not found: bash scripts/install_ghz.sh")


def served(address: str) -> int:
    """Requests the server has answered with the pinned variant (ModelStatistics)."""
    with Client(address) as client:
        (stats,) = client.model_statistics(MODEL, VARIANT, timeout=10)
    return int(stats.get("inference_stats", {}).get("success", {}).get("count", 0))


def ghz_run(ghz: str, body: Path, c: int, k: int) -> Callable[[str, int], dict]:
    def run(address: str, seconds: int) -> dict:
        cmd = [ghz, "--insecure", "--call", f"{SERVICE}.ModelInfer", "-B", str(body),
               "-c", str(c), "--connections", str(k), "-z", f"{seconds}s",
               "--duration-stop", "wait", "--format", "json", address]  # fmt: skip
        r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
        pct = {d["percentage"]: d["latency"] / 1e6 for d in r.get("latencyDistribution") or []}
        return {
            "requests": r["count"],
            "codes": r["statusCodeDistribution"],
            "rps": r["rps"],
            "mean_ms": r["average"] / 1e6,
            "p50_ms": pct.get(50),
            "p99_ms": pct.get(99),
        }

    return run


def bench_run(npy: Path, c: int, k: int) -> Callable[[str, int], dict]:
    def run(address: str, seconds: int) -> dict:
        cmd = [sys.executable, "-m", "tensorgate.server.cli", "bench", MODEL, "--url", address,
               "-v", VARIANT, "-i", f"input={npy}", "-c", str(c), "--connections", str(k),
               "-z", str(seconds), "--format", "json"]  # fmt: skip
        s = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
        return {
            "requests": s["requests"],
            "codes": s["codes"],
            "rps": s["rps"],
            "mean_ms": s["latency_ms"]["mean"],
            "p50_ms": s["latency_ms"]["p50"],
            "p99_ms": s["latency_ms"]["p99"],
        }

    return run


def h2load_run(body: Path, c: int, k: int) -> Callable[[str, int], dict]:
    def run(address: str, seconds: int) -> dict:
        cmd = ["h2load", "-t", "1", "-c", str(k), "-m", str(c // k), "-D", str(seconds),
               "-d", str(body), "-H", "content-type: application/grpc", "-H", "te: trailers",
               f"http://{address}/{SERVICE}/ModelInfer"]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", out)
        rps = re.search(r"finished in [\d.]+s, ([\d.]+) req/s", out)
        mean = re.search(r"time for request:\s+\S+\s+\S+\s+(\S+)", out)
        assert done and rps and mean, out
        # h2load counts an HTTP 200 as a success, a gRPC error included: the server's own
        # count (recorded beside) says how many were served.
        return {
            "requests": int(done.group(1)),
            "codes": {"HTTP 2xx": int(done.group(2))},
            "rps": float(rps.group(1)),
            "mean_ms": _ms(mean.group(1)),
            "p50_ms": None,
            "p99_ms": None,
        }

    return run


def _ms(value: str) -> float:
    """h2load's '1.23ms' / '456us' / '1.2s' in milliseconds."""
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", value).groups()  # type: ignore[union-attr]
    return float(number) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def measure(name: str, run: Callable[[str, int], dict], address: str, pid: int, d: int) -> dict:
    run(address, WARMUP_S)
    before_served, cpu0, t0 = served(address), tree_cpu_seconds(pid), os.times()
    result = run(address, d)
    t1 = os.times()
    server_cpu = tree_cpu_seconds(pid) - cpu0
    tool_cpu = (t1.children_user - t0.children_user) + (t1.children_system - t0.children_system)
    count = served(address) - before_served
    result.update(
        tool=name,
        served_by_server=count,
        server_cpu_us_per_request=round(1e6 * server_cpu / max(count, 1), 1),
        tool_cpu_us_per_request=round(1e6 * tool_cpu / max(count, 1), 1),
        server_rps=round(count / d, 1),
    )
    return result


def table(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"c={args.c} over {args.connections} connections, {args.D} s a run, {MODEL}/{VARIANT} "
        "(data/scorer.json)",
        "",
        "| front end | tool | requests/s (tool) | served/s (server) | mean ms | p50 ms | p99 ms "
        "| status codes | server CPU us/req | tool CPU us/req |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    for r in rows:
        lines.append(
            f"| {r['front_end']} | {r['tool']} | {r['rps']:.0f} | {r['server_rps']:.0f} "
            f"| {f(r['mean_ms'])} | {f(r['p50_ms'])} | {f(r['p99_ms'])} | {r['codes']} "
            f"| {r['server_cpu_us_per_request']:.0f} | {r['tool_cpu_us_per_request']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-D", type=int, default=8, help="seconds per measured run")
    parser.add_argument("-c", type=int, default=16, help="calls in flight")
    parser.add_argument("--connections", type=int, default=4, help="HTTP/2 connections")
    parser.add_argument("--rounds", type=int, default=1, help="the three tools, N times")
    parser.add_argument("--repository", type=Path, help="serve this instead of the demo")
    parser.add_argument(
        "--front-end", default="python", help="the gateway's front ends, comma-separated"
    )
    args = parser.parse_args()
    if args.c % args.connections:
        parser.error("-c must be a multiple of --connections (h2load: -c K -m C/K)")
    if shutil.which("h2load") is None:
        sys.exit("h2load not found: apt-get install nghttp2-client")
    ghz = find_ghz()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="tensorgate-ghz-compare-") as tmp:
        work = Path(tmp)
        repo = args.repository or write_demo_repository(work / "models")
        msg = load_request(REQUEST)
        msg.model_version = VARIANT
        (h2_body := work / "request.grpc").write_bytes(grpc_frame(msg.SerializeToString()))
        (ghz_body := work / "request.bin").write_bytes(delimited([msg.SerializeToString()]))
        np.save(npy := work / "input.npy", codec.decode_request(msg).inputs[0].data)
        tools = {
            "ghz": ghz_run(ghz, ghz_body, args.c, args.connections),
            "tensorgate bench": bench_run(npy, args.c, args.connections),
            "h2load": h2load_run(h2_body, args.c, args.connections),
        }
        rows = []
        for front_end in args.front_end.split(","):
            with gateway(repo, work, "--front-end", front_end) as (address, pid):
                for _ in range(args.rounds):
                    for name, run in tools.items():
                        print(f"{front_end}: {name} ...", file=sys.stderr, flush=True)
                        row = measure(name, run, address, pid, args.D)
                        rows.append({"front_end": front_end, **row})
    settings = {"c": args.c, "connections": args.connections, "seconds": args.D,
                "model": MODEL, "variant": VARIANT, "request": "loadtest/data/scorer.json",
                "front_ends": args.front_end.split(","), "ghz": ghz}  # fmt: skip
    path = write_results(results_path("ghz-compare"), {"settings": settings, "runs": rows}, started)
    md = table(rows, args)
    path.with_suffix(".md").write_text(f"`{path.name}`\n\n{md}")
    print(md)
    print(f"wrote {path.relative_to(REPO_ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
