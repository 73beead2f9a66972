"""Memory over load/unload cycles: does reloading a model leak?

For each framework (ONNX Runtime, TorchScript, TF SavedModel, and ONNX Runtime with
``isolation = "process"``) it starts a fresh ``tensorgate serve`` on a repository holding one
model (the demo MLP), then repeats N times: RepositoryModelUnload, RepositoryModelLoad, 20
ModelInfer calls; and records the gateway's resident memory (VmRSS, /proc) after each cycle.
It prints a Markdown table, one row per framework: RSS once loaded, after the first cycle,
after the last, and the growth per cycle over the second half of the run (by least squares),
which is what a leak would show as.

    .venv/bin/python loadtest/memory_cycles.py [--cycles 50] [--out FILE]
        [--frameworks onnx,torch,tf,onnx-isolated]

Every run writes its results (each framework's RSS series too), with the command and the
machine, to ``loadtest/results/memory-cycles-<UTC time>.json`` (or ``--out``).

Not a test: figures depend on the machine, the allocator and the framework versions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from common import results_path, rss_mib, write_results  # noqa: E402 - beside this script

from tensorgate.clients import Client  # noqa: E402
from tensorgate.server.demo import (  # noqa: E402
    MLP_TENSORS,
    build_mlp_onnx,
    build_mlp_savedmodel,
    build_mlp_torchscript,
    mlp_reference,
    mlp_weights,
)
from tests.serverproc import FRONT_END, ServerProcess  # noqa: E402

NAMED = MLP_TENSORS


def build(framework: str, root: Path) -> None:
    weights = mlp_weights()
    model = root / "m"
    if framework in ("onnx", "onnx-isolated"):
        build_mlp_onnx(model / "1" / "model.onnx", weights)
        if framework == "onnx-isolated":
            (model / "config.toml").write_text('isolation = "process"\n')
    elif framework == "torch":
        build_mlp_torchscript(model / "1" / "model.pt", weights)
        (model / "config.toml").write_text(NAMED)
    elif framework == "tf":
        build_mlp_savedmodel(model / "1" / "model.savedmodel", weights)
    else:
        raise SystemExit(f"unknown framework {framework!r}")


def slope(values: list[float]) -> float:
    """Least-squares growth per cycle."""
    if len(values) < 2:
        return 0.0
    x = np.arange(len(values), dtype=float)
    return float(np.polyfit(x, np.asarray(values), 1)[0])


def run(framework: str, cycles: int, workdir: Path) -> dict:
    repo = workdir / framework / "models"
    build(framework, repo)
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    expected = mlp_reference(x, mlp_weights())
    with ServerProcess(repo, workdir / framework, "--log-level", "WARNING") as server:
        assert server.proc is not None
        pid = server.proc.pid
        with Client(server.address) as client:

            def exercise() -> None:
                for _ in range(20):
                    out = client.infer("m", {"input": x}, timeout=60)["output"]
                    assert np.allclose(out, expected, atol=1e-4)

            exercise()
            loaded = rss_mib(pid)
            series: list[float] = []
            started = time.perf_counter()
            for _ in range(cycles):
                client.unload_model("m", timeout=120)
                client.load_model("m", timeout=120)
                exercise()
                series.append(rss_mib(pid))
            seconds = time.perf_counter() - started
        workers = [p for p, cmd in server.children().items() if "backends.isolated" in cmd]
        worker_rss = rss_mib(workers[0]) if workers else 0.0
    half = series[len(series) // 2 :]
    return {
        "framework": framework,
        "cycles": cycles,
        "rss_loaded_mib": round(loaded, 1),
        "rss_after_first_cycle_mib": round(series[0], 1),
        "rss_after_last_cycle_mib": round(series[-1], 1),
        "growth_per_cycle_second_half_kib": round(slope(half) * 1024, 1),
        "worker_rss_mib": round(worker_rss, 1),
        "seconds_per_cycle": round(seconds / cycles, 3),
        "series_mib": [round(v, 1) for v in series],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=50)
    parser.add_argument("--frameworks", default="onnx,torch,tf,onnx-isolated")
    parser.add_argument("--out", "--json", type=Path, help="results file (default "
                        "loadtest/results/memory-cycles-<UTC time>.json)")  # fmt: skip
    parser.add_argument("--front-end", default="python", choices=("python", "native"),
                        help="the gateway's gRPC front end")  # fmt: skip
    args = parser.parse_args()
    FRONT_END["current"] = args.front_end
    started = time.time()
    out = args.out or results_path("memory-cycles")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    results = []
    with tempfile.TemporaryDirectory(prefix="tensorgate-memory-") as tmp:
        for framework in args.frameworks.split(","):
            result = run(framework, args.cycles, Path(tmp))
            results.append(result)
            print(
                f"{framework}: {json.dumps({k: v for k, v in result.items() if k != 'series_mib'})}"
            )
    print(
        "\n| framework | RSS loaded | after cycle 1 | after cycle N | growth/cycle (2nd half) "
        "| worker RSS | s/cycle |\n|---|---|---|---|---|---|---|"
    )
    for r in results:
        print(
            f"| {r['framework']} | {r['rss_loaded_mib']} MiB | {r['rss_after_first_cycle_mib']} "
            f"MiB | {r['rss_after_last_cycle_mib']} MiB (N={r['cycles']}) | "
            f"{r['growth_per_cycle_second_half_kib']} KiB | {r['worker_rss_mib'] or '-'} | "
            f"{r['seconds_per_cycle']} |"
        )
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    write_results(out, {"args": settings, "frameworks": results}, started)
    print(f"\nresults: {out}")


if __name__ == "__main__":
    main()
