"""The Python side of the native front end's hot path, in process: CPU per request with no
network and no Rust in the measurement, so that a change of a few percent shows through
this machine's noise.

    .venv/bin/python loadtest/bench_dispatch.py                    # plain and batched, N=32
    .venv/bin/python loadtest/bench_dispatch.py --cohort 8 --label before-abc123

The gateway starts as ``tensorgate serve --front-end native`` does, on the peers' MLP
(``$PEERS_HOME/models/mlp.onnx``; ``plain``: no batching, ``batched``: 32 / 500 us), and the
Rust server behind its ``Dispatcher`` is swapped for a stand-in that hands over cohorts of
``--cohort`` ModelInfer requests in one tick (the tuples ``take()`` returns) and collects
the results ``complete()`` is given. Each cohort goes through everything the Python side
does for a real call: the tick, a task per call, decode, admission and measurement, look-up
and validation, routing, scheduling (batching), ONNX Runtime, outputs, the result tuples.
CPU per request (``time.process_time``) over ``--cohorts`` cohorts, seven times; the
minimum and the median. Appends one JSON line per mode to
``loadtest/results/dispatch-<day>.jsonl``. Compare revisions by running it in each (e.g.
``git stash`` between runs, alternating).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import benchmark as bm  # loadtest/benchmark.py, beside this script
import numpy as np
import uvloop
from common import machine  # loadtest/common.py, beside this script

from tensorgate.server.app import Gateway
from tensorgate.server.settings import ServerSettings


class StandIn:
    """What the Dispatcher calls on the Rust server: ``take`` and ``complete``."""

    def __init__(self) -> None:
        self.items: list[tuple] = []
        self.done = 0
        self.failed: list[tuple] = []

    def take(self) -> list[tuple]:
        items, self.items = self.items, []
        return items

    def complete(self, results: list[tuple]) -> None:
        self.done += len(results)
        self.failed += [r for r in results if r[1][0] != 0]


async def measure(repo: Path, cohort: int, cohorts: int) -> list[float]:
    gateway = Gateway(
        ServerSettings(repository=repo, port=0, metrics_port=None, front_end="native")
    )
    await gateway.start()
    try:
        dispatcher = gateway.front_end._dispatcher  # type: ignore[attr-defined]
        stand_in, real = StandIn(), dispatcher._server
        dispatcher._server = stand_in
        x = np.load(bm.PEERS_HOME / "models" / "sample_input.npy").astype(np.float32)
        raw = x.reshape(1, 64).tobytes()
        slot = 0

        async def run(n: int) -> None:
            nonlocal slot
            for _ in range(n):
                target = stand_in.done + cohort
                for _ in range(cohort):
                    slot += 1
                    request = ("mlp", "", "", [("input", "FP32", (1, 64), {})], [raw], [], {})
                    stand_in.items.append(("infer", slot, 0, request, {}, None))
                dispatcher._on_ready()
                while stand_in.done < target:
                    await asyncio.sleep(0)

        try:
            await run(200)  # warm-up; also lets the inline estimate settle
            per_request = []
            for _ in range(7):
                started = time.process_time()
                await run(cohorts)
                per_request.append((time.process_time() - started) / (cohorts * cohort) * 1e6)
        finally:
            dispatcher._server = real
        if stand_in.failed:
            raise SystemExit(f"failed calls: {stand_in.failed[:3]}")
        return per_request
    finally:
        await gateway.stop(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cohort", type=int, default=32, help="requests per tick")
    parser.add_argument("--cohorts", type=int, default=300, help="ticks per measurement")
    parser.add_argument("--modes", default="plain,batched")
    parser.add_argument("--label", default="", help="what this run measures (a revision)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or bm.ROOT / "loadtest" / "results" / f"dispatch-{time.strftime('%Y%m%d')}.jsonl"
    for mode in args.modes.split(","):
        with tempfile.TemporaryDirectory(prefix="tensorgate-dispatch-") as work:
            repo = bm.small_repository(Path(work) / "repo", batched=mode == "batched")
            runs = uvloop.run(measure(repo, args.cohort, args.cohorts))
        record = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "label": args.label,
            "mode": mode,
            "cohort": args.cohort,
            "cohorts": args.cohorts,
            "us_per_request_min": round(min(runs), 2),
            "us_per_request_median": round(statistics.median(runs), 2),
            "runs": [round(r, 2) for r in runs],
            "machine": machine(),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
        }
        with out.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(
            f"{args.label or 'now'} {mode} N={args.cohort}: min {min(runs):.1f}, median "
            f"{statistics.median(runs):.1f} us of CPU per request"
        )


if __name__ == "__main__":
    main()
