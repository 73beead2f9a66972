"""loadtest/pairs.py's report: each round's ratio comes from that round's two runs, the
median and the count of rounds that reach the goal from all of them."""

from __future__ import annotations

import sys
from pathlib import Path

LOADTEST = Path(__file__).resolve().parents[1] / "loadtest"
sys.path.insert(0, str(LOADTEST))  # pairs.py imports benchmark.py and common.py beside it

import pairs  # noqa: E402


def _run(label: str, c: int, rps: float, p99: float, cpu: float, n: int) -> dict:
    return {"label": label, "c": c, "rps": rps, "p99_ms": p99, "server_cpu_ms_per_req": cpu,
            "pair": "batched", "round": n, "tool": "h2load"}  # fmt: skip


def test_each_round_is_compared_with_itself_and_the_median_counts_them_all() -> None:
    native = pairs.bm._tg_label("native", pairs.BATCHED)
    triton = pairs.TRITON_BATCHED
    rows = [
        _run(native, 32, 13000, 4.0, 0.07, 1),
        _run(triton, 32, 10000, 6.0, 0.13, 1),  # 1.30x, p99 better
        _run(triton, 32, 12000, 5.0, 0.12, 2),
        _run(native, 32, 12000, 5.5, 0.08, 2),  # 1.00x, p99 worse
        _run(native, 32, 15000, 3.0, 0.07, 3),
        _run(triton, 32, 10000, 6.0, 0.14, 3),  # 1.50x
    ]
    text = pairs.report(rows, "test machine")
    line = next(x for x in text.splitlines() if x.startswith("| 2. batched c=32"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2].startswith("1.30x (13000 vs 10000)")
    assert cells[3].startswith("1.00x (12000 vs 12000)") and cells[3].endswith("worse")
    assert cells[4].startswith("1.50x")
    assert cells[5] == "1.30x"  # the median of 1.30, 1.00, 1.50
    assert cells[6] == "2 of 3; p99 worse in 1"
    cpu = next(x for x in text.splitlines() if x.startswith("| 3. CPU/request batched c=32"))
    assert cpu.rstrip(" |").endswith("3 of 3")  # lower is better: 0.54, 0.67, 0.50
    # No c=8 runs in these rounds: said so, not counted.
    c8 = next(x for x in text.splitlines() if x.startswith("| 2. batched c=8"))
    assert "not measured" in c8 and c8.rstrip(" |").endswith("0 of 0")
