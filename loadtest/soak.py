"""Soak: mixed load with faults against one gateway process, for a chosen time.

Starts ``tensorgate serve --poll-interval 1`` on a fresh repository of three models - ``mlp``
(the demo MLP, ONNX Runtime, in process), ``iso`` (the same file, ``isolation = "process"``)
and ``torch`` (the same weights, TorchScript) - and runs, all at once:

- client threads calling the three models and checking every answer against numpy;
- a thread sending malformed requests (bad datatypes, shapes, byte lengths, BYTES prefixes,
  unknown models and inputs), which must all be refused with INVALID_ARGUMENT or NOT_FOUND;
- reloads: every ``--reload-every`` seconds a RepositoryModelLoad of ``mlp`` or ``torch``
  (in turn), and a touch of ``iso``'s model file, which the poller turns into a reload;
- every ``--kill-every`` seconds, a SIGKILL of ``iso``'s worker process.

Every ``--report-every`` seconds it prints a row: requests, errors by kind, p50/p99 of the
good calls, and the RSS of the gateway and of its worker. At the end, a summary. The only
errors that are expected are UNAVAILABLE from ``iso`` while its worker is down; anything
else (a wrong answer, an INTERNAL, a bad request answered OK) is counted as unexpected, and
the exit status is 1 when there was any.

    .venv/bin/python loadtest/soak.py [--duration 120] [--threads 4] [--out FILE]

Every run writes its rows and summary, with the command and the machine, to
``loadtest/results/soak-<UTC time>.json`` (or ``--out``).

Not a test: it runs for minutes and its figures depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import struct
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from common import machine, results_path, rss_mib, write_results  # noqa: E402 - beside this script

from tensorgate.clients import Client, InferenceError  # noqa: E402
from tensorgate.protos import grpc_service_pb2 as pb  # noqa: E402
from tensorgate.protos import grpc_service_pb2_grpc as pb_grpc  # noqa: E402
from tensorgate.server.demo import (  # noqa: E402
    MLP_TENSORS,
    build_mlp_onnx,
    build_mlp_torchscript,
    mlp_reference,
    mlp_weights,
)
from tests.serverproc import FRONT_END, ServerProcess  # noqa: E402

MODELS = ("mlp", "iso", "torch")
BAD_ALLOWED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}


def build_repository(root: Path) -> None:
    weights = mlp_weights()
    build_mlp_onnx(root / "mlp" / "1" / "model.onnx", weights)
    build_mlp_onnx(root / "iso" / "1" / "model.onnx", weights)
    (root / "iso" / "config.toml").write_text('isolation = "process"\n')
    build_mlp_torchscript(root / "torch" / "1" / "model.pt", weights)
    (root / "torch" / "config.toml").write_text(MLP_TENSORS)


@dataclass
class Window:
    """What happened in one reporting interval."""

    t: float
    good: int = 0
    latencies: list[float] = field(default_factory=list)
    expected_errors: Counter[str] = field(default_factory=Counter)
    unexpected: Counter[str] = field(default_factory=Counter)
    bad_requests: int = 0
    reloads: int = 0
    kills: int = 0


class Soak:
    def __init__(self, server: ServerProcess, repo: Path, args: argparse.Namespace) -> None:
        self.server = server
        self.repo = repo
        self.args = args
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.window = Window(0.0)
        self.rows: list[dict] = []
        self.totals: Counter[str] = Counter()
        self.unexpected_examples: list[str] = []

    # -- recording ---------------------------------------------------------------------------
    def record(self, what: str, latency: float | None = None, detail: str = "") -> None:
        with self.lock:
            w = self.window
            if what == "ok":
                w.good += 1
                if latency is not None:
                    w.latencies.append(latency)
            elif what.startswith("expected:"):
                w.expected_errors[what.split(":", 1)[1]] += 1
            elif what == "bad":
                w.bad_requests += 1
            elif what == "reload":
                w.reloads += 1
            elif what == "kill":
                w.kills += 1
            else:
                w.unexpected[what] += 1
                if len(self.unexpected_examples) < 20:
                    self.unexpected_examples.append(f"{what}: {detail}"[:300])

    # -- the actors --------------------------------------------------------------------------
    def good_load(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        inputs = [
            rng.standard_normal((rng.integers(1, 9), 64)).astype(np.float32) for _ in range(8)
        ]
        expected = [mlp_reference(x, mlp_weights()) for x in inputs]
        pick = random.Random(seed)
        with Client(self.server.address) as client:
            while not self.stop.is_set():
                model = pick.choices(MODELS, weights=(2, 1, 1))[0]
                i = pick.randrange(len(inputs))
                started = time.perf_counter()
                try:
                    result = client.infer(model, {"input": inputs[i]}, timeout=30)
                except InferenceError as e:
                    if model == "iso" and e.code == grpc.StatusCode.UNAVAILABLE:
                        self.record("expected:iso UNAVAILABLE")
                    else:
                        self.record(f"{model} {e.code.name}", detail=e.message)
                    time.sleep(0.01)
                    continue
                latency = time.perf_counter() - started
                if np.allclose(result["output"], expected[i], atol=1e-4):
                    self.record("ok", latency)
                else:
                    self.record(f"{model} wrong answer")

    def bad_load(self) -> None:
        rng = random.Random(7)
        with grpc.insecure_channel(self.server.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            while not self.stop.is_set():
                request = malformed(rng)
                try:
                    stub.ModelInfer(request, timeout=30)
                except grpc.RpcError as e:
                    if e.code() in BAD_ALLOWED:
                        self.record("bad")
                    else:
                        self.record(f"bad request {e.code().name}", detail=e.details() or "")
                else:
                    self.record("bad request answered OK", detail=str(request)[:200])
                time.sleep(0.02)

    def reloads(self) -> None:
        turn = 0
        with Client(self.server.address) as client:
            while not self.stop.wait(self.args.reload_every):
                name = ("mlp", "torch")[turn % 2]
                turn += 1
                try:
                    client.load_model(name, timeout=120)
                    self.record("reload")
                except InferenceError as e:
                    self.record(f"reload of {name} {e.code.name}", detail=e.message)
                # The poller reloads iso once it sees the new modification time.
                os.utime(self.repo / "iso" / "1" / "model.onnx")
                self.record("reload")

    def kills(self) -> None:
        while not self.stop.wait(self.args.kill_every):
            pid = self.worker_pid()
            if pid is None:
                continue
            try:
                os.kill(pid, signal.SIGKILL)
                self.record("kill")
            except ProcessLookupError:
                pass

    def worker_pid(self) -> int | None:
        for pid, cmdline in self.server.children().items():
            if "tensorgate.backends.isolated" in cmdline and "iso/1" in cmdline:
                return pid
        return None

    # -- reporting ---------------------------------------------------------------------------
    def close_window(self, elapsed: float) -> dict:
        with self.lock:
            w, self.window = self.window, Window(elapsed)
        lat = sorted(w.latencies)

        def pct(q: float) -> float:
            return round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1e3, 2) if lat else 0.0

        worker = self.worker_pid()
        assert self.server.proc is not None
        row = {
            "t_s": round(elapsed),
            "ok": w.good,
            "rps": round(w.good / self.args.report_every),
            "p50_ms": pct(0.50),
            "p99_ms": pct(0.99),
            "bad_refused": w.bad_requests,
            "iso_unavailable": sum(w.expected_errors.values()),
            "unexpected": sum(w.unexpected.values()),
            "reloads": w.reloads,
            "kills": w.kills,
            "gateway_rss_mib": round(rss_mib(self.server.proc.pid)),
            "worker_rss_mib": round(rss_mib(worker)) if worker else 0,
        }
        self.totals.update(
            {k: v for k, v in row.items() if k not in ("t_s", "rps", "p50_ms", "p99_ms")}
        )
        self.totals.update({f"unexpected {k}": v for k, v in w.unexpected.items()})
        self.rows.append(row)
        return row

    def run(self) -> None:
        actors = [
            threading.Thread(target=self.good_load, args=(i,)) for i in range(self.args.threads)
        ]
        actors += [threading.Thread(target=f) for f in (self.bad_load, self.reloads, self.kills)]
        for a in actors:
            a.start()
        started = time.monotonic()
        header = None
        try:
            while (elapsed := time.monotonic() - started) < self.args.duration:
                time.sleep(min(self.args.report_every, self.args.duration - elapsed))
                row = self.close_window(time.monotonic() - started)
                if header is None:
                    header = " | ".join(row)
                    print(f"| {header} |\n|{'---|' * len(row)}", flush=True)
                print(f"| {' | '.join(str(v) for v in row.values())} |", flush=True)
        finally:
            self.stop.set()
            for a in actors:
                a.join(60)


def malformed(rng: random.Random) -> pb.ModelInferRequest:
    """One request that is wrong in one of many ways (never valid)."""
    model = rng.choice(["mlp", "iso", "torch"])
    msg = pb.ModelInferRequest(model_name=model)
    kind = rng.randrange(9)
    rows = rng.randint(1, 4)
    good_raw = bytes(rows * 64 * 4)
    if kind == 0:
        msg.inputs.add(
            name="input", datatype=rng.choice(["FP8", "", "fp32", "STRING"]), shape=[rows, 64]
        )
        msg.raw_input_contents.append(good_raw)
    elif kind == 1:
        msg.inputs.add(
            name="input", datatype="FP32", shape=[rows, rng.choice([-1, 63, 65, 1 << 40])]
        )
        msg.raw_input_contents.append(good_raw)
    elif kind == 2:
        msg.inputs.add(name="input", datatype="FP32", shape=[rows, 64])
        msg.raw_input_contents.append(good_raw[: rng.randrange(len(good_raw))])
    elif kind == 3:  # BYTES whose prefix claims more than there is
        msg.inputs.add(name="input", datatype="BYTES", shape=[1])
        msg.raw_input_contents.append(
            struct.pack("<I", rng.choice([5, 1 << 31, 0xFFFFFFFF])) + b"ab"
        )
    elif kind == 4:
        msg.model_name = rng.choice(["nope", "", "../mlp", "mlp/1"])
    elif kind == 5:
        msg.inputs.add(name="input", datatype="FP32", shape=[rows, 64])
        msg.inputs.add(name="input", datatype="FP32", shape=[rows, 64])
        msg.raw_input_contents.extend([good_raw, good_raw])
    elif kind == 6:
        msg.inputs.add(name="nope", datatype="FP32", shape=[rows, 64])
        msg.raw_input_contents.append(good_raw)
    elif kind == 7:
        t = msg.inputs.add(name="input", datatype="FP32", shape=[rows, 64])
        t.contents.int_contents.extend([1] * rows * 64)
    else:
        msg.inputs.add(name="input", datatype="FP32", shape=[rows, 64])
        msg.raw_input_contents.extend([good_raw, good_raw])
    return msg


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=120.0, help="seconds to run")
    parser.add_argument("--threads", type=int, default=4, help="good-load client threads")
    parser.add_argument("--report-every", type=float, default=10.0, help="seconds per row")
    parser.add_argument("--reload-every", type=float, default=7.0, help="seconds between reloads")
    parser.add_argument("--kill-every", type=float, default=15.0, help="seconds between kills")
    parser.add_argument("--out", "--json", type=Path, help="results file (default "
                        "loadtest/results/soak-<UTC time>.json)")  # fmt: skip
    parser.add_argument("--front-end", default="python", choices=("python", "native"),
                        help="the gateway's gRPC front end")  # fmt: skip
    args = parser.parse_args()
    FRONT_END["current"] = args.front_end
    started = time.time()
    out = args.out or results_path("soak")

    with tempfile.TemporaryDirectory(prefix="tensorgate-soak-") as tmp:
        repo = Path(tmp) / "models"
        build_repository(repo)
        print(
            f"soak: {args.duration:.0f} s, {args.threads} client threads, {machine()}", flush=True
        )
        with ServerProcess(
            repo, Path(tmp), "--poll-interval", "1", "--log-level", "WARNING"
        ) as server:
            soak = Soak(server, repo, args)
            soak.run()
            alive = server.proc is not None and server.proc.poll() is None
        exit_code = server.proc.returncode if server.proc is not None else None
        all_lat = [r["p99_ms"] for r in soak.rows]
        summary = {
            "duration_s": args.duration,
            "gateway_alive_at_end": alive,
            "gateway_exit_code": exit_code,
            "good_calls": soak.totals["ok"],
            "bad_requests_refused": soak.totals["bad_refused"],
            "iso_unavailable_while_worker_down": soak.totals["iso_unavailable"],
            "unexpected": soak.totals["unexpected"],
            "reloads": soak.totals["reloads"],
            "worker_kills": soak.totals["kills"],
            "worst_window_p99_ms": max(all_lat) if all_lat else 0.0,
            "gateway_rss_first_last_mib": [
                soak.rows[0]["gateway_rss_mib"],
                soak.rows[-1]["gateway_rss_mib"],
            ]
            if soak.rows
            else [],
            "unexpected_examples": soak.unexpected_examples,
        }
    print(json.dumps(summary, indent=2))
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    write_results(out, {"args": settings, "rows": soak.rows, "summary": summary}, started)
    print(f"results: {out}")
    ok = alive and exit_code == 0 and summary["unexpected"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
