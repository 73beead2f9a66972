"""The two front ends count alike: the same traffic through the python (grpc.aio) and the
native (Rust) front end gives the same per-variant histograms and counters, the same
ModelStatistics and the same variant trailers (issue 18: "Metrics agree")."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tensorgate.clients import Client, InferenceError

from .serverproc import ServerProcess

FRONT_ENDS = ("python", "native")
#: Counted per request (or per request and code): what both front ends must agree on.
COUNTED = ("_count", "_total")


@pytest.fixture(scope="module")
def servers(
    demo_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, ServerProcess]]:
    started: dict[str, ServerProcess] = {}
    try:
        for kind in FRONT_ENDS:
            work = tmp_path_factory.mktemp(f"frontend-{kind}")
            started[kind] = ServerProcess(demo_repo, work, front_end=kind).start()
        yield started
    finally:
        for proc in started.values():
            proc.stop()


def traffic(address: str) -> list[str]:
    """The same calls for each front end: pinned and unpinned, unary and streamed, and
    failures of three kinds. Returns the variant each successful call says served it."""
    rng = np.random.default_rng(7)
    served: list[str] = []
    with Client(address) as client:
        for version, n in (("onnx", 12), ("torch", 7), ("", 5)):
            for _ in range(n):
                x = rng.random((2, 64), dtype=np.float32)
                served.append(client.infer("scorer", {"input": x}, version=version).variant)
        for bad in (
            {"input": np.zeros((1, 63), np.float32)},  # wrong shape: INVALID_ARGUMENT
            {"nope": np.zeros((1, 64), np.float32)},  # unknown input: INVALID_ARGUMENT
        ):
            with pytest.raises(InferenceError):
                client.infer("scorer", bad, version="onnx")
        with pytest.raises(InferenceError):
            client.infer("no_such_model", {"input": np.zeros((1, 64), np.float32)})
    with Client(address, stream=True) as streamed:
        for _ in range(6):
            x = rng.random((1, 64), dtype=np.float32)
            served.append(streamed.infer("scorer", {"input": x}, version="pt2").variant)
    return served


def counted(proc: ServerProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every counter and histogram count of the gateway's own metrics, by name and labels."""
    out = {}
    for family in text_string_to_metric_families(proc.scrape()):
        if not family.name.startswith("tensorgate_"):
            continue
        for sample in family.samples:
            if sample.name.endswith(COUNTED):
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def statistics(proc: ServerProcess) -> list[tuple]:
    """ModelStatistics without the times: counts per model version."""
    with Client(proc.address) as client:
        stats = client.model_statistics("scorer")
    rows = []
    for s in stats:
        infer = s.get("inference_stats", {})
        rows.append(
            (
                s["name"],
                s["version"],
                s.get("inference_count", "0"),
                s.get("execution_count", "0"),
                *(infer.get(k, {}).get("count", "0") for k in ("success", "fail", "queue")),
            )
        )
    return sorted(rows)


def test_the_same_traffic_is_counted_alike_by_both_front_ends(
    servers: dict[str, ServerProcess],
) -> None:
    trailers = {kind: traffic(proc.address) for kind, proc in servers.items()}
    assert trailers["python"] == trailers["native"]
    assert trailers["python"][:19] == ["onnx"] * 12 + ["torch"] * 7
    metrics = {kind: counted(proc) for kind, proc in servers.items()}
    assert metrics["python"], "no tensorgate_ counters scraped"
    differ = {
        key: (metrics["python"].get(key), metrics["native"].get(key))
        for key in metrics["python"].keys() | metrics["native"].keys()
        if metrics["python"].get(key) != metrics["native"].get(key)
    }
    assert not differ, differ
    requests = {
        labels: value
        for (name, labels), value in metrics["native"].items()
        if name == "tensorgate_requests_total"
    }
    assert sum(requests.values()) == 24 + 6 + 3  # every call counted once, failures too
    stats = {kind: statistics(proc) for kind, proc in servers.items()}
    assert stats["python"] == stats["native"]
    # The onnx variant (integer alias 3): 12 served, 2 refused by validation.
    assert ("scorer", "3", "12", "12", "12", "2", "12") in stats["native"], stats
