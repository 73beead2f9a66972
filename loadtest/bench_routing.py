"""What routing costs: the same ONNX variant reached pinned, through weights, through a sticky
key, and (for reference) through a model without routing or with a shadow.

Starts one ``tensorgate serve`` on loopback with a repository of one ONNX file (the demo
MLP) served as several models:

- ``routed``: ``[routing] weights = { onnx = 1 }``, ``sticky_key = "user"``,
  ``fallback = ["spare"]`` (``spare`` is the same file and is never needed here);
- ``plain``: the same file, no ``[routing]`` (unpinned requests go to the default variant);
- ``mirrored``: like ``routed`` plus ``shadow = { variants = ["spare"], fraction = 0.1 }``.

Each path is driven by a grpc.aio client at a fixed concurrency, in several rounds, each
round running every path once in a shuffled order (so that drift on a shared machine hits
every path alike), and the script prints requests/s (over all rounds, and the range of the
rounds), latency percentiles and the server's CPU time per request as a Markdown table; then
it times one routing decision in process (``choose_variant``: a weighted draw, a sticky key).

    .venv/bin/python loadtest/bench_routing.py [--seconds 3] [--rounds 3] [--concurrency 8]

Every run writes its figures, with the command and the machine, to
``loadtest/results/routing-<UTC time>.json`` (or ``--out``).

Not a test: numbers depend on the machine. The client shares the cores with the server.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
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
from tensorgate.server.demo import MLP_TENSORS, build_mlp_onnx, mlp_weights  # noqa: E402
from tensorgate.server.policy import choose_variant  # noqa: E402
from tests.serverproc import ServerProcess  # noqa: E402

TENSORS = MLP_TENSORS
MODELS = {
    "routed": '[routing]\nweights = { onnx = 1 }\nsticky_key = "user"\nfallback = ["spare"]\n',
    "plain": "",  # the default variant: the first in order, "onnx"
    "mirrored": '[routing]\nweights = { onnx = 1 }\nfallback = ["spare"]\n'
    'shadow = { variants = ["spare"], fraction = 0.1 }\n',
}
# (label, model, pinned version, sticky key parameter?)
PATHS = [
    ("pinned (`model_version = onnx`)", "routed", "onnx", False),
    ("routed by weight", "routed", "", False),
    ("routed by sticky key (request parameter)", "routed", "", True),
    ("pinned, with the same key parameter (unused)", "routed", "onnx", True),
    ("no `[routing]` (default variant)", "plain", "", False),
    ("routed by weight + shadow 10 % (extra compute)", "mirrored", "", False),
]


@dataclass
class Result:
    path: str
    requests: int
    errors: int
    seconds: float
    rps: float
    rps_min: float
    rps_max: float
    p50_ms: float
    p99_ms: float
    server_cpu_ms_per_request: float


async def drive(
    address: str, requests: list, concurrency: int, seconds: float, warmup: float
) -> tuple[list[float], int]:
    """Send ``requests`` round-robin from ``concurrency`` callers; latencies after warm-up."""
    latencies: list[float] = []
    errors = 0
    cycle = itertools.cycle(requests)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        await stub.ModelInfer(requests[0], timeout=30)  # connect before the clock starts
        measure_from = time.perf_counter() + warmup
        stop = measure_from + seconds

        async def worker() -> None:
            nonlocal errors
            while True:
                t0 = time.perf_counter()
                if t0 >= stop:
                    return
                try:
                    await stub.ModelInfer(next(cycle), timeout=30)
                except grpc.RpcError:
                    errors += 1
                    continue
                if t0 >= measure_from:
                    latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, errors


def decision_us(repeat: int = 20_000) -> dict[str, float]:
    """Microseconds per routing decision in this process (``choose_variant``, the pure
    strategy the router calls): a weighted draw, and a sticky key (1,000 keys in turn),
    among two variants weighted 90/10. The best of 5 passes: the least disturbed."""
    weights = {"torch": 90.0, "tf": 10.0}
    rng = random.Random(0)
    keys = [f"user-{i}" for i in range(1000)]

    def best(fn) -> float:
        passes = []
        for _ in range(5):
            t0 = time.perf_counter()
            for i in range(repeat):
                fn(i)
            passes.append((time.perf_counter() - t0) / repeat * 1e6)
        return round(min(passes), 2)

    return {
        "weighted_draw_us": best(lambda i: choose_variant(weights, None, rng, "m")),
        "sticky_key_us": best(lambda i: choose_variant(weights, keys[i % 1000], rng, "m")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per round")
    parser.add_argument("--rounds", type=int, default=5, help="shuffled rounds per path")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds per round")
    parser.add_argument("--concurrency", type=int, default=8, help="calls in flight")
    parser.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    parser.add_argument("--out", type=Path, help="results file (default "
                        "loadtest/results/routing-<UTC time>.json)")  # fmt: skip
    args = parser.parse_args()
    started = time.time()
    out = args.out or results_path("routing")

    x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    latencies: dict[str, list[float]] = {label: [] for label, *_ in PATHS}
    errors = dict.fromkeys(latencies, 0)
    round_rps: dict[str, list[float]] = {label: [] for label in latencies}
    order = random.Random(0)
    cpu = dict.fromkeys(latencies, 0.0)
    with tempfile.TemporaryDirectory(prefix="tensorgate-bench-routing-") as tmp:
        root = Path(tmp) / "models"
        onnx = build_mlp_onnx(Path(tmp) / "model.onnx", mlp_weights())
        for model, routing in MODELS.items():
            for variant in ("onnx", "spare"):
                (root / model / variant).mkdir(parents=True)
                (root / model / variant / "model.onnx").write_bytes(onnx.read_bytes())
            (root / model / "config.toml").write_text(TENSORS + routing)
        with ServerProcess(root, Path(tmp), "--log-level", "WARNING") as server:
            assert server.proc is not None
            pid = server.proc.pid
            for _ in range(args.rounds):
                for label, model, version, sticky in order.sample(PATHS, len(PATHS)):
                    users = [{"user": f"u{i}"} for i in range(1000)] if sticky else [None]
                    requests = [  # with a key: 1,000 users, one request each in turn
                        codec.encode_request(model, {"input": x}, version, parameters=user)
                        for user in users
                    ]
                    before = cpu_seconds(pid)
                    lat, err = asyncio.run(
                        drive(server.address, requests, args.concurrency, args.seconds, args.warmup)
                    )
                    # The warm-up's CPU is counted too: the same small overestimate for all.
                    cpu[label] += cpu_seconds(pid) - before
                    latencies[label] += lat
                    round_rps[label].append(len(lat) / args.seconds)
                    errors[label] += err

    results = []
    for label, lat in latencies.items():
        ms = np.array(lat) * 1e3
        seconds = args.seconds * args.rounds
        results.append(
            Result(
                path=label,
                requests=len(lat),
                errors=errors[label],
                seconds=seconds,
                rps=len(lat) / seconds,
                rps_min=min(round_rps[label]),
                rps_max=max(round_rps[label]),
                p50_ms=float(np.percentile(ms, 50)),
                p99_ms=float(np.percentile(ms, 99)),
                server_cpu_ms_per_request=cpu[label] * 1e3 / max(1, len(lat)),
            )
        )
    decision = decision_us()
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    paths = [asdict(r) for r in results]
    write_results(out, {"args": settings, "paths": paths, "decision": decision}, started)
    if args.json:
        print(json.dumps({"machine": machine(), "args": settings,
                          "results": [asdict(r) for r in results]}, indent=2))  # fmt: skip
        return
    print(f"results: {out}")
    print(f"machine: {machine()}")
    print(f"one routing decision in process: {decision}")
    print(
        f"concurrency {args.concurrency}, {args.rounds} shuffled rounds of {args.seconds:g} s "
        f"per path (after {args.warmup:g} s warm-up each), [1, 64] FP32 per request, "
        "ONNX Runtime, 1 instance\n"
    )
    print(
        "| path | requests/s (rounds' range) | p50 ms | p99 ms | server CPU ms/request | errors |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r.path} | {r.rps:,.0f} ({r.rps_min:,.0f}-{r.rps_max:,.0f}) | {r.p50_ms:.2f} | "
            f"{r.p99_ms:.2f} | {r.server_cpu_ms_per_request:.3f} | {r.errors} |"
        )


if __name__ == "__main__":
    main()
