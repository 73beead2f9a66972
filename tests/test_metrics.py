"""Metrics through a real /metrics scrape of a real gateway, the Grafana dashboard against
what the server exports, and ``tensorgate top``."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tensorgate.clients import Client, InferenceError
from tensorgate.protos import grpc_service_pb2 as pb
from tensorgate.protos import grpc_service_pb2_grpc as pb_grpc
from tensorgate.server.cli.top import histogram_quantile
from tensorgate.server.metrics import LATENCY_BUCKETS

from .serverproc import REPO_ROOT, ServerProcess

# Talks gRPC: runs against both front ends (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("front_end")

VARIANT = {"model", "variant", "backend"}
# Every metric the gateway exports, with its label names. A new metric must be added here
# and to docs/metrics.md.
EXPECTED = {
    "tensorgate_request_duration_seconds": VARIANT,
    "tensorgate_queue_duration_seconds": VARIANT,
    "tensorgate_compute_duration_seconds": VARIANT,
    "tensorgate_decode_duration_seconds": VARIANT,
    "tensorgate_encode_duration_seconds": VARIANT,
    "tensorgate_batch_size": VARIANT,
    "tensorgate_requests": VARIANT | {"code"},
    "tensorgate_inferences": VARIANT,
    "tensorgate_inflight_requests": {"model"},
    "tensorgate_queued_requests": VARIANT,
    "tensorgate_model_ready": VARIANT,
    # Routing: exported (as families) by every gateway, with samples once routing acts.
    "tensorgate_fallbacks": {"model", "from", "to", "reason"},
    "tensorgate_circuit_state": VARIANT,
    "tensorgate_shadow_requests": {"model", "primary", "shadow", "outcome"},
    "tensorgate_shadow_max_abs_diff": {"model", "primary", "shadow"},
    "tensorgate_shadow_argmax_agreement": {"model", "primary", "shadow", "agree"},
    "tensorgate_rollout_weight": {"model", "variant"},
    "tensorgate_rollout_state": {"model", "state"},
}
BACKENDS = {
    "torch": "torchscript",
    "tf": "tf_savedmodel",
    "onnx": "onnxruntime",
    "pt2": "torch_export",
}


@pytest.fixture(scope="module")
def gateway(
    front_end: str, demo_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    with ServerProcess(demo_repo, tmp_path_factory.mktemp("metrics")) as proc:
        yield proc


def families(text: str) -> dict[str, dict]:
    """{family name: {"type":..., "labels": set(label names), "samples": [...]}}"""
    out = {}
    for f in text_string_to_metric_families(text):
        labels: set[str] = set()
        for s in f.samples:
            labels |= set(s.labels) - {"le"}
        out[f.name] = {"type": f.type, "labels": labels, "samples": f.samples}
    return out


def test_every_exported_metric_and_its_labels(gateway: ServerProcess) -> None:
    with Client(gateway.address) as client:
        for v in BACKENDS:
            client.infer("scorer", {"input": np.zeros((1, 64), np.float32)}, version=v)
    found = families(gateway.scrape())
    ours = {name: f["labels"] for name, f in found.items() if name.startswith("tensorgate_")}
    assert set(ours) == set(EXPECTED)
    for name, labels in ours.items():
        # A family with no samples yet (routing not configured here) shows no labels.
        assert labels in (EXPECTED[name], set()), name
    assert all(ours[name] == labels for name, labels in EXPECTED.items() if "variant" in labels
               and not name.startswith(("tensorgate_circuit", "tensorgate_rollout")))  # fmt: skip
    # prometheus-client's process metrics are there too.
    assert {"process_cpu_seconds", "process_resident_memory_bytes", "process_open_fds"} <= set(
        found
    )


def test_histograms_count_every_request_per_backend(gateway: ServerProcess) -> None:
    counts = {"torch": 5, "tf": 3, "onnx": 7}
    before = families(gateway.scrape())
    with Client(gateway.address) as client:
        for v, n in counts.items():
            for _ in range(n):
                client.infer("scorer", {"input": np.ones((2, 64), np.float32)}, version=v)
    after = families(gateway.scrape())

    def value(fams, name, sample, **labels):
        for s in fams.get(name, {"samples": []})["samples"]:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
        return 0.0

    for v, n in counts.items():
        labels = {"model": "scorer", "variant": v, "backend": BACKENDS[v]}
        for metric in (
            "tensorgate_request_duration_seconds",
            "tensorgate_queue_duration_seconds",
            "tensorgate_compute_duration_seconds",
            "tensorgate_decode_duration_seconds",
            "tensorgate_encode_duration_seconds",
        ):
            delta = value(after, metric, metric + "_count", **labels) - value(
                before, metric, metric + "_count", **labels
            )
            assert delta == n, (metric, v)
        buckets = sorted(
            (float(s.labels["le"]), s.value)
            for s in after["tensorgate_request_duration_seconds"]["samples"]
            if s.name.endswith("_bucket") and s.labels["variant"] == v
        )
        assert [b for b, _ in buckets] == [*LATENCY_BUCKETS, float("inf")]
        assert all(a[1] <= b[1] for a, b in itertools.pairwise(buckets))
        total = value(after, "tensorgate_request_duration_seconds",
                      "tensorgate_request_duration_seconds_count", **labels)  # fmt: skip
        assert buckets[-1][1] == total
        ok = value(after, "tensorgate_requests", "tensorgate_requests_total", code="OK", **labels)
        assert (
            ok
            - value(before, "tensorgate_requests", "tensorgate_requests_total", code="OK", **labels)
            == n
        )


def test_errors_are_counted_by_code_with_bounded_labels(gateway: ServerProcess) -> None:
    with Client(gateway.address) as client:
        for i in range(3):
            with pytest.raises(InferenceError):
                client.infer(f"no-such-model-{i}", {"input": np.zeros((1, 64), np.float32)})
        with pytest.raises(InferenceError):
            client.infer("scorer", {"input": np.zeros((1, 3), np.float32)}, version="onnx")
    text = gateway.scrape()
    assert "no-such-model" not in text  # a caller's string never becomes a label value
    found = families(text)["tensorgate_requests"]["samples"]
    codes = {(s.labels["model"], s.labels["code"]): s.value for s in found}
    assert codes[("_unknown", "NOT_FOUND")] >= 3
    assert codes[("scorer", "INVALID_ARGUMENT")] >= 1


METRIC_NAME = re.compile(r"\b((?:tensorgate|process)_[a-z_]+)")
SUFFIXES = ("_bucket", "_sum", "_count", "_total")


def test_dashboard_queries_only_exported_metrics(gateway: ServerProcess) -> None:
    dashboard = json.loads((REPO_ROOT / "deploy" / "grafana" / "tensorgate.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    exported = families(gateway.scrape())
    # Families that only appear once routing is configured are exported by every gateway
    # too (prometheus-client lists a labelled family even before its first sample).
    for expr in exprs:
        for name in METRIC_NAME.findall(expr):
            family = name
            for suffix in SUFFIXES:
                if family.endswith(suffix) and family.removesuffix(suffix) in exported:
                    family = family.removesuffix(suffix)
            assert family in exported, f"dashboard queries {name}, which is not exported"
            by = re.findall(r"by \(([^)]*)\)", expr)
            used = {label.strip() for group in by for label in group.split(",")} - {"le"}
            labels = exported[family]["labels"]
            if labels and family.startswith("tensorgate_"):
                assert used <= labels | {""} or not used & VARIANT - labels, (expr, labels)


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    buckets = {0.1: 10.0, 0.2: 20.0, 0.4: 40.0, float("inf"): 40.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.2)
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.75, buckets) == pytest.approx(0.3)
    assert np.isnan(histogram_quantile(0.5, {float("inf"): 0.0}))


def test_top_shows_per_backend_figures(gateway: ServerProcess) -> None:
    stop = threading.Event()

    def load() -> None:
        with Client(gateway.address) as client:
            while not stop.is_set():
                for v in ("torch", "onnx"):
                    client.infer("scorer", {"input": np.zeros((1, 64), np.float32)}, version=v)

    worker = threading.Thread(target=load)
    worker.start()
    try:
        out = subprocess.run(
            [sys.executable, "-m", "tensorgate.server.cli", "top", "--once", "--json",
             "--interval", "1.5", "--metrics-url", gateway.metrics_url],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
    finally:
        stop.set()
        worker.join()
    rows = {(r["variant"], r["backend"]): r for r in json.loads(out.stdout)}
    for v in ("torch", "onnx"):
        row = rows[(v, BACKENDS[v])]
        assert row["rps"] > 0 and row["errors"] == 0
        assert 0 < row["p50"] <= row["p99"]
        assert row["compute"] > 0
    table = subprocess.run(
        [sys.executable, "-m", "tensorgate.server.cli", "top", "--once", "--interval", "0.2",
         "--metrics-url", gateway.metrics_url],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert "p99 ms" in table and "scorer" in table


def test_observe_many_matches_observe_bucket_for_bucket() -> None:
    """The batched update the gateway flushes with gives the same exposition as one
    ``observe`` per value, boundaries, zeros and the +Inf bucket included (it reaches
    into prometheus-client's histogram internals: this fails if they change)."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from tensorgate.server.metrics import observe_many

    rng = np.random.default_rng(7)
    values = np.concatenate(
        [rng.exponential(1e-3, 500), np.array(LATENCY_BUCKETS), [0.0, 50.0, 5e-5, 1e-12]]
    )
    exposed = []
    for batched in (False, True):
        registry = CollectorRegistry()
        h = Histogram("h", "doc", ("model",), buckets=LATENCY_BUCKETS, registry=registry)
        child = h.labels("m")
        if batched:
            observe_many(child, values[:100])
            observe_many(child, values[100:])
        else:
            for v in values:
                child.observe(float(v))
        samples = {
            (s.name, s.labels.get("le")): s.value
            for f in text_string_to_metric_families(generate_latest(registry).decode())
            for s in f.samples
            if not s.name.endswith("_created")
        }
        exposed.append(samples)
    one_by_one, batched_ = exposed
    assert one_by_one.keys() == batched_.keys()
    for key, value in one_by_one.items():
        if key[0] == "h_sum":  # the same values added in another order
            assert batched_[key] == pytest.approx(value, rel=1e-12)
        else:
            assert batched_[key] == value, key
    assert batched_[("h_count", None)] == len(values)


def test_a_scrape_sees_every_answered_request_at_once(gateway: ServerProcess) -> None:
    """Measurements are applied in batches, but a scrape (and ModelStatistics) brings
    them up to date first: no wait between a reply and the metrics that count it."""
    x = np.ones((1, 64), np.float32)

    def ok_count() -> float:
        total = 0.0
        for family in text_string_to_metric_families(gateway.scrape()):
            for s in family.samples:
                if (
                    s.name == "tensorgate_requests_total"
                    and s.labels.get("model") == "scorer"
                    and s.labels.get("variant") == "onnx"
                    and s.labels.get("code") == "OK"
                ):
                    total += s.value
        return total

    def statistics_count() -> int:
        with grpc.insecure_channel(gateway.address) as channel:
            reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(
                pb.ModelStatisticsRequest(name="scorer", version="onnx"), timeout=10
            )
        return reply.model_stats[0].inference_stats.success.count

    with Client(gateway.address) as client:
        before, counted = ok_count(), statistics_count()
        for i in range(1, 6):
            client.infer("scorer", {"input": x}, version="onnx")
            assert ok_count() == before + i
            assert statistics_count() == counted + i
