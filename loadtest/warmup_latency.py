"""First-request latency with and without ``[warmup]``, for TorchScript and SavedModel.

For each framework (the demo scorer's ``torch`` and ``tf`` variants, each alone in a model
``scorer``) and each setting (no ``[warmup]``; ``[warmup] requests = 3``), starts a fresh
``tensorgate serve`` ``--rounds`` times and, once it is ready, times its first ``--calls``
ModelInfer calls (one FP32 [1, 64] row each, one caller, after a ServerLive that opens the
connection). Also records how long the server took from start to ready (load + warmup).

Writes one JSON line per server start to ``loadtest/results/warmup-latency-<UTC time>.jsonl``
(the first line: the command, the machine and the settings) and prints a Markdown table of
medians over the rounds.

    .venv/bin/python loadtest/warmup_latency.py [--rounds 5] [--calls 20]

Not a test: figures depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import grpc
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from common import machine  # noqa: E402 - loadtest/common.py, beside this script

from tensorgate import codec  # noqa: E402
from tensorgate.protos import grpc_service_pb2 as pb  # noqa: E402
from tensorgate.protos import grpc_service_pb2_grpc as pb_grpc  # noqa: E402
from tensorgate.server.demo import (  # noqa: E402
    MLP_TENSORS,
    build_mlp_savedmodel,
    build_mlp_torchscript,
    mlp_weights,
)
from tests.serverproc import ServerProcess  # noqa: E402

FRAMEWORKS = {
    "torchscript": ("torch", lambda d: build_mlp_torchscript(d / "model.pt", mlp_weights())),
    "tf_savedmodel": ("tf", lambda d: build_mlp_savedmodel(d / "model.savedmodel", mlp_weights())),
}
WARMUP = '\n[warmup]\nrequests = 3\nbatch_size = 1\ndata = "zeros"\n'


def one_server(repo: Path, workdir: Path, calls: int, variant: str) -> dict[str, object]:
    """Start a server on ``repo``, time start-to-ready and its first ``calls`` requests."""
    x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    request = codec.encode_request("scorer", {"input": x}, variant)
    started = time.perf_counter()
    with ServerProcess(repo, workdir, "--metrics-port", "0") as server:
        ready_s = time.perf_counter() - started
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            stub.ServerLive(pb.ServerLiveRequest(), timeout=30)  # connect first
            latencies = []
            for _ in range(calls):
                t0 = time.perf_counter()
                stub.ModelInfer(request, timeout=60)
                latencies.append((time.perf_counter() - t0) * 1e3)
    return {"ready_s": ready_s, "latency_ms": latencies}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="fresh servers per case")
    parser.add_argument("--calls", type=int, default=20, help="requests timed per server")
    parser.add_argument("--out", type=Path, default=None, help="JSON lines file to write")
    args = parser.parse_args()
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out = args.out or REPO_ROOT / "loadtest" / "results" / f"warmup-latency-{stamp}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, object]] = []
    with out.open("w") as f, tempfile.TemporaryDirectory(prefix="tensorgate-warmup-") as tmp:
        header = {
            "command": shlex.join([Path(sys.executable).name, *sys.argv]),
            "machine": machine(),
            "date": stamp,
            "rounds": args.rounds,
            "calls": args.calls,
            "warmup": WARMUP.strip(),
            "request": "scorer (demo MLP 64-256-256-10), FP32 [1, 64], raw, one caller",
        }
        f.write(json.dumps(header) + "\n")
        for backend, (variant, build) in FRAMEWORKS.items():
            for warmed in (False, True):
                repo = Path(tmp) / f"{backend}-{warmed}" / "models"
                build(repo / "scorer" / variant)
                (repo / "scorer" / "config.toml").write_text(MLP_TENSORS + (WARMUP * warmed))
                for round_ in range(args.rounds):
                    result = one_server(repo, Path(tmp), args.calls, variant)
                    row = {"backend": backend, "warmup": warmed, "round": round_, **result}
                    f.write(json.dumps(row) + "\n")
                    f.flush()
                    rows.append(row)
    print(f"machine: {machine()}; raw results: {out.relative_to(REPO_ROOT)}\n")
    print("| backend | [warmup] | start to ready s | 1st request ms | 2nd ms | 3rd ms | "
          f"requests 10-{args.calls} ms |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|")
    for backend in FRAMEWORKS:
        for warmed in (False, True):
            mine = [r for r in rows if r["backend"] == backend and r["warmup"] == warmed]
            lat = [r["latency_ms"] for r in mine]

            def med(i: int, lat: list = lat) -> float:
                return statistics.median(c[i] for c in lat)

            steady = statistics.median(v for c in lat for v in c[9:])
            ready = statistics.median(r["ready_s"] for r in mine)  # type: ignore[misc]
            print(
                f"| {backend} | {'requests = 3' if warmed else 'none'} | {ready:.1f} | "
                f"{med(0):.1f} | {med(1):.1f} | {med(2):.1f} | {steady:.2f} |"
            )


if __name__ == "__main__":
    main()
