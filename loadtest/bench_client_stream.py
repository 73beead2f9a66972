"""The project's client calling unary ModelInfer against the same client over one
ModelStreamInfer stream (``Client(target, stream=True)``), side by side from one process.

Starts ``tensorgate serve`` (``--workers``, default 1) on the demo MLP (ONNX Runtime,
``[1, 64]`` FP32 in) - or uses ``--target`` - and drives it from this one process with
``--concurrency`` callers through each face of ``tensorgate.clients.Client``: ``aio``
(asyncio tasks on one event loop) and ``sync`` (threads), each unary and streaming. Every
round runs each (face, mode) once, in an order that alternates between rounds, so that
drift on a shared machine hits both modes alike. Prints requests/s, latency percentiles and
the CPU milliseconds per request of this client process and of the server, then the
stream / unary ratio of each face (median over the rounds), and writes every run to
``loadtest/results/client-stream-<UTC time>.json`` with the command and the machine.

    .venv/bin/python loadtest/bench_client_stream.py [--seconds 5] [--rounds 3] \\
        [--concurrency 32] [--faces aio,sync] [--workers 1] [--target HOST:PORT]

Not a test: numbers depend on the machine. Client and server share its cores.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from common import results_path, tree_cpu_seconds, write_results  # noqa: E402

from tensorgate.clients import Client, InferenceError  # noqa: E402
from tensorgate.clients.client import DEFAULT_STREAMS  # noqa: E402
from tensorgate.server.demo import build_mlp_onnx, mlp_reference, mlp_weights  # noqa: E402
from tests.serverproc import ServerProcess  # noqa: E402

MODEL = "mlp"
MODES = ("unary", "stream")


@dataclass
class Run:
    round: int
    face: str
    mode: str
    concurrency: int
    seconds: float
    requests: int
    errors: int
    rps: float
    p50_ms: float
    p99_ms: float
    client_cpu_ms_per_request: float
    server_cpu_ms_per_request: float | None


class Window:
    """Latencies of the calls that started inside the measured window, and the errors."""

    def __init__(self, warmup: float, seconds: float) -> None:
        self.start = time.perf_counter() + warmup
        self.stop = self.start + seconds
        self.latencies: list[float] = []
        self.errors = 0

    def record(self, t0: float, ok: bool) -> None:
        if t0 < self.start:
            return
        if ok:
            self.latencies.append(time.perf_counter() - t0)
        else:
            self.errors += 1


def drive_aio(client: Client, x: np.ndarray, concurrency: int, window: Window) -> None:
    async def caller() -> None:
        while (t0 := time.perf_counter()) < window.stop:
            try:
                await client.aio.infer(MODEL, {"input": x}, timeout=30)
                window.record(t0, True)
            except InferenceError:
                window.record(t0, False)

    async def main() -> None:
        try:
            await asyncio.gather(*(caller() for _ in range(concurrency)))
        finally:
            await client.aio.close()

    asyncio.run(main())


def drive_sync(client: Client, x: np.ndarray, concurrency: int, window: Window) -> None:
    lock = threading.Lock()

    def caller() -> None:
        while (t0 := time.perf_counter()) < window.stop:
            try:
                client.infer(MODEL, {"input": x}, timeout=30)
                ok = True
            except InferenceError:
                ok = False
            with lock:
                window.record(t0, ok)

    threads = [threading.Thread(target=caller) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


DRIVERS = {"aio": drive_aio, "sync": drive_sync}


def measure(address: str, server_pid: int | None, face: str, mode: str, rnd: int, args) -> Run:
    x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    with Client(address, stream=args.streams if mode == "stream" else False) as client:
        window = Window(args.warmup, args.seconds)
        cpu: dict[str, float] = {}

        def sample_cpu() -> None:  # at the window's edges, from a thread of its own
            time.sleep(max(0.0, window.start - time.perf_counter()))
            before = time.process_time(), tree_cpu_seconds(server_pid) if server_pid else 0.0
            time.sleep(max(0.0, window.stop - time.perf_counter()))
            after = time.process_time(), tree_cpu_seconds(server_pid) if server_pid else 0.0
            cpu["client"], cpu["server"] = after[0] - before[0], after[1] - before[1]

        sampler = threading.Thread(target=sample_cpu)
        sampler.start()
        DRIVERS[face](client, x, args.concurrency, window)
        sampler.join()
    n = len(window.latencies)
    ms = np.array(window.latencies or [float("nan")]) * 1e3
    return Run(
        round=rnd,
        face=face,
        mode=mode,
        concurrency=args.concurrency,
        seconds=args.seconds,
        requests=n,
        errors=window.errors,
        rps=round(n / args.seconds, 1),
        p50_ms=round(float(np.percentile(ms, 50)), 3),
        p99_ms=round(float(np.percentile(ms, 99)), 3),
        client_cpu_ms_per_request=round(cpu["client"] * 1e3 / max(1, n), 4),
        server_cpu_ms_per_request=round(cpu["server"] * 1e3 / max(1, n), 4) if server_pid else None,
    )


def check_answers(address: str) -> None:
    """Both modes give the reference answer before anything is timed."""
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    expected = mlp_reference(x, mlp_weights())
    for stream in (False, True):
        with Client(address, stream=stream) as client:
            out = client.infer(MODEL, {"input": x}, timeout=60)["output"]
        np.testing.assert_allclose(out, expected, atol=1e-4)


def summarize(runs: list[Run]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for face in dict.fromkeys(r.face for r in runs):
        rps = {m: statistics.median(r.rps for r in runs if (r.face, r.mode) == (face, m))
               for m in MODES}  # fmt: skip
        out[face] = {
            "unary_rps_median": rps["unary"],
            "stream_rps_median": rps["stream"],
            "stream_over_unary": round(rps["stream"] / rps["unary"], 2) if rps["unary"] else 0,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every face and mode")
    parser.add_argument("--concurrency", type=int, default=32, help="calls in flight")
    parser.add_argument("--faces", default="aio,sync", help="aio, sync or both")
    parser.add_argument("--workers", type=int, default=1, help="tensorgate serve --workers")
    parser.add_argument("--streams", type=int, default=DEFAULT_STREAMS,
                        help="streams per face in stream mode (Client(stream=N))")  # fmt: skip
    parser.add_argument("--target", help="an already running server (serving the demo MLP as "
                        f"'{MODEL}'); its CPU is not measured")  # fmt: skip
    parser.add_argument("--out", type=Path, help="results file (default loadtest/results/...)")
    args = parser.parse_args()
    faces = [f for f in args.faces.split(",") if f]
    if unknown := set(faces) - set(DRIVERS):
        parser.error(f"unknown face(s) {sorted(unknown)}; choose from aio, sync")
    started = time.time()
    out = args.out or results_path("client-stream")

    runs: list[Run] = []
    with ExitStack() as stack:
        if args.target:
            address, pid = args.target, None
        else:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tg-stream-")))
            build_mlp_onnx(tmp / "models" / MODEL / "1" / "model.onnx", mlp_weights())
            server = stack.enter_context(
                ServerProcess(
                    tmp / "models", tmp, "--workers", str(args.workers), "--log-level", "WARNING"
                )
            )
            assert server.proc is not None
            address, pid = server.address, server.proc.pid
        check_answers(address)
        for rnd in range(args.rounds):
            order = [(f, m) for f in faces for m in (MODES if rnd % 2 == 0 else MODES[::-1])]
            for face, mode in order:
                run = measure(address, pid, face, mode, rnd, args)
                runs.append(run)
                print(
                    f"round {rnd} {face:4} {mode:6} {run.rps:8.0f}/s  p50 {run.p50_ms:6.2f} ms  "
                    f"p99 {run.p99_ms:6.2f} ms  CPU ms/req client "
                    f"{run.client_cpu_ms_per_request:.3f} server "
                    f"{run.server_cpu_ms_per_request}  errors {run.errors}",
                    flush=True,
                )

    summary = summarize(runs)
    write_results(
        out,
        {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
         "runs": [asdict(r) for r in runs], "summary": summary},
        started,
    )  # fmt: skip
    print(f"\nresults: {out}\n")
    print("| face | mode | requests/s (median) | p50 ms | p99 ms | CPU ms/req: client | server |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for face in summary:
        for mode in MODES:
            mine = [r for r in runs if (r.face, r.mode) == (face, mode)]

            def med(key: str, rows: list[Run] = mine) -> float:
                values = [getattr(r, key) for r in rows if getattr(r, key) is not None]
                return statistics.median(values) if values else float("nan")

            print(
                f"| {face} | {mode} | {med('rps'):,.0f} | {med('p50_ms'):.2f} | "
                f"{med('p99_ms'):.2f} | {med('client_cpu_ms_per_request'):.3f} | "
                f"{med('server_cpu_ms_per_request'):.3f} |"
            )
    for face, s in summary.items():
        print(f"{face}: stream / unary = {s['stream_over_unary']}x")


if __name__ == "__main__":
    main()
