"""``tensorgate serve --workers 2``: two processes on one port chosen by the supervisor
(port 0), requests spread over both, /metrics complete across them, a killed worker
restarted with its counts kept, and a clean exit on SIGTERM."""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tensorgate import codec
from tensorgate.protos import grpc_service_pb2_grpc as pb_grpc
from tensorgate.server.demo import mlp_reference, mlp_weights
from tensorgate.server.metrics import FLUSH_INTERVAL_S
from tensorgate.server.servicer import WORKER_METADATA_KEY

from .serverproc import ServerProcess

# Talks gRPC: runs against both front ends (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("front_end")

CONNECTIONS = 16


@pytest.fixture(scope="module")
def workers(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("workers") / "models"
    shutil.copytree(demo_repo / "scorer" / "onnx", root / "scorer" / "onnx")
    proc = ServerProcess(root, root.parent, "--workers", "2")
    with proc:
        yield proc
    assert proc.proc is not None and proc.proc.returncode == 0, proc.log()
    # The supervisor removes its state (the multiprocess metrics files) on the way out.
    leftovers = list(Path(tempfile.gettempdir()).glob(f"tensorgate-{proc.proc.pid}-*"))
    assert leftovers == []


def _call_many(address: str, per_connection: int) -> Counter[str]:
    """ModelInfer over CONNECTIONS separate TCP connections (a local subchannel pool per
    channel); returns how many calls each worker answered. Every reply is checked."""
    rng = np.random.default_rng(7)
    weights = mlp_weights()
    seen: Counter[str] = Counter()
    for _ in range(CONNECTIONS):
        options = [("grpc.use_local_subchannel_pool", 1)]
        with grpc.insecure_channel(address, options=options) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for _ in range(per_connection):
                x = rng.standard_normal((1, 64)).astype(np.float32)
                reply, call = stub.ModelInfer.with_call(
                    codec.encode_request("scorer", {"input": x}), timeout=30
                )
                out = codec.decode_response(reply)["output"]
                np.testing.assert_allclose(out, mlp_reference(x, weights), atol=1e-5)
                trailing = dict(call.trailing_metadata() or ())
                seen[trailing[WORKER_METADATA_KEY]] += 1
    return seen


def _metrics(server: ServerProcess) -> dict[str, float]:
    """OK requests for scorer, and the supervisor's own gauges, from /metrics."""
    out = {"requests_ok": 0.0}
    for family in text_string_to_metric_families(server.scrape()):
        for s in family.samples:
            if s.name == "tensorgate_requests_total" and s.labels.get("model") == "scorer":
                if s.labels.get("code") == "OK":
                    out["requests_ok"] += s.value
            elif s.name in (
                "tensorgate_workers",
                "tensorgate_worker_restarts_total",
                "process_cpu_seconds_total",
            ):
                out[s.name] = s.value
            elif s.name == "tensorgate_model_ready" and s.labels.get("model") == "scorer":
                out["ready"] = s.value
    return out


def test_requests_spread_over_both_workers_and_metrics_add_up(workers: ServerProcess) -> None:
    ports = json.loads(workers.port_file.read_text())
    pids = ports["worker_pids"]
    assert len(set(pids)) == 2 and workers.proc is not None and workers.proc.pid not in pids
    before = _metrics(workers)["requests_ok"]
    seen = _call_many(workers.address, per_connection=20)
    assert sum(seen.values()) == CONNECTIONS * 20
    assert set(seen) == {"0", "1"}, seen  # both processes served on the one port
    # Each worker's measurements reach the shared files within FLUSH_INTERVAL_S.
    deadline = time.monotonic() + 10
    while (m := _metrics(workers))["requests_ok"] - before < CONNECTIONS * 20:
        assert time.monotonic() < deadline, m
        time.sleep(FLUSH_INTERVAL_S)
    assert m["requests_ok"] - before == CONNECTIONS * 20  # every worker's counts, summed
    assert m["tensorgate_workers"] == 2
    assert m["ready"] == 1
    assert m["process_cpu_seconds_total"] > 0


def test_a_killed_worker_is_restarted_and_its_counts_are_kept(workers: ServerProcess) -> None:
    before = _metrics(workers)
    victim = json.loads(workers.port_file.read_text())["worker_pids"][0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while True:
        m = _metrics(workers)
        if m.get("tensorgate_worker_restarts_total") == 1 and m["tensorgate_workers"] == 2:
            break
        assert time.monotonic() < deadline, workers.log()
        time.sleep(0.2)
    # The dead worker's requests still count; the new one serves once it has loaded.
    assert m["requests_ok"] == before["requests_ok"]
    deadline = time.monotonic() + 60
    while True:
        try:
            seen = _call_many(workers.address, per_connection=2)
        except grpc.RpcError:  # a connection to the worker that was just killed
            seen = Counter()
        if set(seen) == {"0", "1"}:
            break
        assert time.monotonic() < deadline, workers.log()
        time.sleep(0.2)
    assert _metrics(workers)["requests_ok"] >= before["requests_ok"] + sum(seen.values())
    assert "exited with -9" in workers.log()


def test_single_process_mode_has_no_supervisor(server: ServerProcess) -> None:
    text = server.scrape()
    assert "tensorgate_workers" not in text
    assert "process_cpu_seconds_total" in text
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = codec.encode_request("scorer", {"input": np.zeros((1, 64), np.float32)})
        _, call = stub.ModelInfer.with_call(request, timeout=30)
    assert WORKER_METADATA_KEY not in dict(call.trailing_metadata() or ())
