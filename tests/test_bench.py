"""``tensorgate bench`` against the real gateway: counts, codes, variants and formats
(never its speed: speed belongs in docs/benchmarks.md)."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

from .serverproc import ServerProcess


def bench(server: ServerProcess, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "tensorgate.server.cli", "bench", *args, "--url", server.address],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_bench_counts_every_request_by_code_and_variant(server: ServerProcess) -> None:
    s = json.loads(bench(server, "scorer", "-n", "120", "-c", "4", "--format", "json"))
    assert s["requests"] == 120 and s["codes"] == {"OK": 120}
    assert s["variants"]["torch"]["count"] == 120  # the default variant
    lat = s["latency_ms"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]


def test_bench_pins_streams_and_batches(server: ServerProcess) -> None:
    s = json.loads(
        bench(server, "scorer", "--version", "onnx", "--stream", "-b", "4", "-n", "60",
              "-c", "3", "--format", "json")
    )  # fmt: skip
    assert s["codes"] == {"OK": 60}
    assert list(s["variants"]) == ["onnx"]


def test_bench_reports_errors_by_code(server: ServerProcess) -> None:
    # The "broken" model cannot serve: every call is UNAVAILABLE, and bench says so.
    s = json.loads(
        bench(server, "partial", "--version", "2", "-n", "10", "-c", "2", "--format", "json",
              "-i", "input=" + json.dumps([[0.0] * 64]))
    )  # fmt: skip
    assert s["codes"] == {"UNAVAILABLE": 10}
    assert any("not ready" in e for e in s["errors"])


def test_bench_text_and_csv_output(server: ServerProcess) -> None:
    text = bench(server, "detector", "-n", "30", "-c", "2")
    for heading in ("Summary:", "Latency (ms):", "Latency histogram:", "Status codes:",
                    "Per variant:"):  # fmt: skip
        assert heading in text
    rows = list(csv.DictReader(io.StringIO(bench(server, "detector", "-n", "20", "--format",
                                                 "csv"))))  # fmt: skip
    assert rows[0]["variant"] == "(all)" and rows[0]["count"] == "20"
    assert rows[1]["variant"] == "1"
