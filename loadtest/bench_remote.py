"""What a remote hop costs: the same ONNX model served directly and through a front gateway.

Starts two ``tensorgate serve`` processes on loopback - a back serving ``scorer`` (the demo
MLP, ONNX Runtime) and a front serving the same file as a local variant (``scorer``) and as
a remote variant pointing at the back (``scorer_remote``) - then drives each path in turn with
a grpc.aio client at a fixed concurrency, and prints requests/s, latency percentiles and the
servers' CPU time per request as a Markdown table.

    .venv/bin/python loadtest/bench_remote.py [--seconds 5] [--concurrency 8] [--rows 1]

Every run writes its figures, with the command and the machine, to
``loadtest/results/remote-<UTC time>.json`` (or ``--out``).

Not a test: numbers depend on the machine. Every process here shares the same cores, the
client included, so on a small machine the figures measure CPU per request as much as
latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from common import (  # noqa: E402 - loadtest/common.py, beside this script
    cpu_seconds,
    machine,
    results_path,
    write_results,
)

from tensorgate import codec  # noqa: E402
from tensorgate.protos import grpc_service_pb2_grpc as pb_grpc  # noqa: E402
from tensorgate.server.demo import build_mlp_onnx, mlp_weights  # noqa: E402
from tests.serverproc import ServerProcess  # noqa: E402


@dataclass
class Result:
    path: str
    requests: int
    errors: int
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    back_cpu_ms_per_request: float
    front_cpu_ms_per_request: float


async def drive(
    address: str, request, concurrency: int, seconds: float, warmup: float, pids: dict[str, int]
) -> tuple[list[float], int, dict[str, float]]:
    """Latencies of the calls started in the measured window, errors, and each server's CPU
    seconds over that window."""
    latencies: list[float] = []
    errors = 0
    cpu: dict[str, float] = {}
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        await stub.ModelInfer(request, timeout=30)  # connect before the clock starts
        start = time.perf_counter()
        measure_from = start + warmup
        stop = measure_from + seconds

        async def cpu_window() -> None:
            await asyncio.sleep(measure_from - time.perf_counter())
            before = {k: cpu_seconds(p) for k, p in pids.items()}
            await asyncio.sleep(stop - time.perf_counter())
            cpu.update({k: cpu_seconds(p) - before[k] for k, p in pids.items()})

        async def worker() -> None:
            nonlocal errors
            while True:
                t0 = time.perf_counter()
                if t0 >= stop:
                    return
                try:
                    await stub.ModelInfer(request, timeout=30)
                except grpc.RpcError:
                    errors += 1
                    continue
                t1 = time.perf_counter()
                if t0 >= measure_from:
                    latencies.append(t1 - t0)

        await asyncio.gather(cpu_window(), *(worker() for _ in range(concurrency)))
    return latencies, errors, cpu


def measure(
    name: str,
    server: ServerProcess,
    model: str,
    version: str,
    rows: int,
    args: argparse.Namespace,
    pids: dict[str, int],
) -> Result:
    x = np.random.default_rng(0).standard_normal((rows, 64)).astype(np.float32)
    request = codec.encode_request(model, {"input": x}, version)
    seconds = args.seconds
    latencies, errors, cpu = asyncio.run(
        drive(server.address, request, args.concurrency, seconds, args.warmup, pids)
    )
    ms = np.array(latencies) * 1e3
    n = len(latencies)
    return Result(
        path=name,
        requests=n,
        errors=errors,
        seconds=seconds,
        rps=n / seconds,
        p50_ms=float(np.percentile(ms, 50)),
        p90_ms=float(np.percentile(ms, 90)),
        p99_ms=float(np.percentile(ms, 99)),
        back_cpu_ms_per_request=cpu["back"] * 1e3 / max(1, n),
        front_cpu_ms_per_request=cpu["front"] * 1e3 / max(1, n),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per path")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    parser.add_argument("--concurrency", type=int, default=8, help="calls in flight")
    parser.add_argument("--rows", type=int, default=1, help="rows per request ([rows, 64])")
    parser.add_argument(
        "--instances", type=int, default=8, help="[instances] count of the remote variant"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    parser.add_argument("--out", type=Path, help="results file (default "
                        "loadtest/results/remote-<UTC time>.json)")  # fmt: skip
    args = parser.parse_args()
    started = time.time()
    out = args.out or results_path("remote")

    with tempfile.TemporaryDirectory(prefix="tensorgate-bench-") as tmp:
        root = Path(tmp)
        model_file = build_mlp_onnx(root / "back" / "scorer" / "onnx" / "model.onnx", mlp_weights())
        with ServerProcess(root / "back", root, "--log-level", "WARNING") as back:
            front_repo = root / "front"
            # The local variant: the same file, default settings (one instance).
            local = front_repo / "scorer" / "onnx"
            local.mkdir(parents=True)
            (local / "model.onnx").write_bytes(model_file.read_bytes())
            # The remote variant: its instances wait on the network, so several run at once.
            remote = front_repo / "scorer_remote" / "remote"
            remote.mkdir(parents=True)
            (remote / "remote.toml").write_text(
                f'target = "127.0.0.1:{back.grpc_port}"\nmodel = "scorer"\n'
                'version = "onnx"\nchannels = 2\n'
            )
            (front_repo / "scorer_remote" / "config.toml").write_text(
                f"[instances]\ncount = {args.instances}\n"
            )
            with ServerProcess(front_repo, root, "--log-level", "WARNING") as front:
                assert back.proc is not None and front.proc is not None
                pids = {"back": back.proc.pid, "front": front.proc.pid}
                paths = [
                    ("back, local variant (direct)", back, "scorer", "onnx"),
                    ("front, local variant", front, "scorer", "onnx"),
                    ("front → back, remote variant", front, "scorer_remote", ""),
                ]
                results = [measure(n, s, m, v, args.rows, args, pids) for n, s, m, v in paths]

    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    write_results(out, {"args": settings, "paths": [asdict(r) for r in results]}, started)
    if args.json:
        print(json.dumps({"machine": machine(), "args": settings,
                          "results": [asdict(r) for r in results]}, indent=2))  # fmt: skip
        return
    print(f"results: {out}")
    print(f"machine: {machine()}")
    print(
        f"concurrency {args.concurrency}, {args.seconds:g} s per path after {args.warmup:g} s "
        f"warm-up, [{args.rows}, 64] FP32 per request, remote instances {args.instances}\n"
    )
    print(
        "| path | requests/s | p50 ms | p90 ms | p99 ms | CPU ms/request: back | front | errors |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r.path} | {r.rps:,.0f} | {r.p50_ms:.2f} | {r.p90_ms:.2f} | {r.p99_ms:.2f} | "
            f"{r.back_cpu_ms_per_request:.2f} | {r.front_cpu_ms_per_request:.2f} | {r.errors} |"
        )


if __name__ == "__main__":
    main()
