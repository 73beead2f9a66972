"""Issue 18's side-by-side targets, measured in alternating pairs.

    .venv/bin/python loadtest/pairs.py                          # 5 rounds, ~15 min
    ROUNDS=3 D=8 .venv/bin/python loadtest/pairs.py --only batched,big
    .venv/bin/python loadtest/pairs.py --report loadtest/results/pairs-<time>.jsonl [...] [--md F]

``benchmark.py`` runs each server once, minutes away from the one it is compared with; on
this machine the speed of everything drifts by a third between phases a few minutes long,
so one of its ratios can land anywhere in that spread. Here every round runs both sides of
a comparison back to back (the side that goes first alternates from round to round), and
the report gives each round's ratio, their median and how many rounds reach the goal:

- ``batched``: the small MLP with dynamic batching 32 / 500 us, Triton 2.51's own server
  (the peers' Triton repository, model ``mlpb``) and the gateway's native front end, c=8 and
  c=32 (target 2, and target 3's batched CPU);
- ``big``:     1 MB FP32 requests and replies (ONNX Identity), the native front end and the
  python front end, c=8 (target 6);
- ``compute``: the compute-bound MLP (512-2048-2048-512) with dynamic batching, Triton and
  the native front end, c=8 and c=32 (target 5's batched cells).

Runs go through the same ``bench_target.sh`` as benchmark.py's, with its labels; each line
of ``loadtest/results/pairs-<time>.jsonl`` also carries ``pair`` and ``round``. Env: ``ROUNDS``
(default 5), ``D`` (seconds per run, default 10), ``BENCH_SESSION`` (``own``, the default, or
``shared``: where the servers run for the scheduler, see benchmark.py), ``PEERS_HOME``,
``PEERS_DIR``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import benchmark as bm  # loadtest/benchmark.py, beside this script

BATCHED = "1 worker, ONNX Runtime, dynamic batching 32, 500 us"
BIG = "1 worker, 1 MB FP32 in and out, ONNX Identity"
TRITON_BATCHED = f"{bm.TRITON} (dynamic batching 32/500us)"


@dataclass(frozen=True)
class Goal:
    """One target line: ``a`` over ``b`` at concurrency ``c`` on ``key``."""

    name: str
    a: str  # label
    b: str  # label
    c: int
    goal: float
    key: str = "rps"
    lower_is_better: bool = False
    p99: bool = False  # also say whether a's p99 is no worse than b's

    def value(self, a: dict, b: dict) -> float:
        return a[self.key] / b[self.key]

    def reached(self, value: float) -> bool:
        return value <= self.goal if self.lower_is_better else value >= self.goal


def _goals() -> dict[str, list[Goal]]:
    native_b = bm._tg_label("native", BATCHED)
    wide_native_b, wide_triton_b = f"wide 512: {native_b}", f"wide 512: {TRITON_BATCHED}"
    cpu = "server_cpu_ms_per_req"
    return {
        "batched": [
            Goal("2. batched c=32, native vs Triton", native_b, TRITON_BATCHED, 32, 1.25, p99=True),
            Goal("2. batched c=8, native vs Triton", native_b, TRITON_BATCHED, 8, 1.0),
            Goal(
                "3. CPU/request batched c=32, native vs Triton",
                native_b,
                TRITON_BATCHED,
                32,
                1.0,
                key=cpu,
                lower_is_better=True,
            ),
        ],
        "big": [
            Goal(
                "6. 1 MB, native vs python front end (MB/s)",
                bm._tg_label("native", BIG),
                bm._tg_label("python", BIG),
                8,
                2.0,
            ),
        ],
        "compute": [
            goal
            for c in (8, 32)
            for goal in (
                Goal(
                    f"5. compute-bound batched c={c}, native vs Triton",
                    wide_native_b,
                    wide_triton_b,
                    c,
                    1.0,
                ),
                Goal(
                    f"5. compute-bound batched c={c}, CPU/request native vs Triton",
                    wide_native_b,
                    wide_triton_b,
                    c,
                    1.0,
                    key=cpu,
                    lower_is_better=True,
                ),
            )
        ],
    }


PAIRS = tuple(_goals())


def _sides(run: bm.Run, pairs: list[str]) -> dict[str, tuple[Callable[[], None], ...]]:
    """Each chosen pair's two sides, as calls that measure one side once."""
    work = run.work

    def gateway(repo: Path, front_end: str, label: str, c: str, **extra) -> Callable[[], None]:
        def measure() -> None:
            bm.log(label)
            with bm.gateway(repo, work, "--front-end", front_end) as (address, pid):
                bm.bench_target(run, address, pid, label, c=c, **extra)

        return measure

    def triton(repo: Path, label: str, c: str, **extra) -> Callable[[], None]:
        def measure() -> None:
            bm.log(label)
            with bm.triton_server(repo, work, "mlpb") as (address, pid):
                bm.bench_target(run, address, pid, label, c=c, model="mlpb", **extra)

        return measure

    native_b = bm._tg_label("native", BATCHED)
    sides: dict[str, tuple[Callable[[], None], ...]] = {}
    if "batched" in pairs:
        small = bm.small_repository(work / "small-batched", batched=True)
        triton_small = bm.triton_repository(work / "triton-small")
        sides["batched"] = (
            gateway(small, "native", native_b, "8,32"),
            triton(triton_small, TRITON_BATCHED, "8,32"),
        )
    if "big" in pairs:
        big, sample = bm.big_repository(work / "big")
        shape = f"1,{bm.BIG_ELEMENTS}"
        sides["big"] = tuple(
            gateway(big, fe, bm._tg_label(fe, BIG), "8", shape=shape, data=sample)
            for fe in ("native", "python")
        )
    if "compute" in pairs:
        onnx, sample = bm.compute_model(work)
        compute = bm.compute_repository(work / "compute-batched", onnx, batched=True)
        triton_compute = bm.triton_compute_repository(work / "compute-triton", onnx)
        shape = f"1,{bm.COMPUTE_SIZES[0]}"
        sides["compute"] = (
            gateway(compute, "native", f"wide 512: {native_b}", "8,32", shape=shape, data=sample),
            triton(triton_compute, f"wide 512: {TRITON_BATCHED}", "8,32", shape=shape, data=sample),
        )
    return sides


# --- the report ----------------------------------------------------------------------------


def _one(rows: list[dict], label: str, c: int) -> dict | None:
    found = [r for r in rows if r["label"] == label and int(r["c"]) == c and r.get("rps")]
    return found[-1] if found else None


def report(rows: list[dict], machine: str) -> str:
    out = [
        f"Machine: {machine}",
        "",
        "Issue 18's side-by-side targets, in alternating pairs (loadtest/pairs.py): each round "
        "runs both sides back to back. Cells: the ratio, then the two sides' values.",
    ]
    for pair, goals in _goals().items():
        mine = [r for r in rows if r.get("pair") == pair]
        rounds = sorted({int(r["round"]) for r in mine})
        if not rounds:
            continue
        out += [
            "",
            f"### {pair}",
            "",
            "| target | goal | "
            + " | ".join(f"round {n}" for n in rounds)
            + " | median | reached |",
            "|---|---|" + "---|" * len(rounds) + "---|---|",
        ]
        for g in goals:
            cells, values, worse_p99 = [], [], 0
            for n in rounds:
                here = [r for r in mine if int(r["round"]) == n]
                a, b = _one(here, g.a, g.c), _one(here, g.b, g.c)
                if a is None or b is None or not a.get(g.key) or not b.get(g.key):
                    cells.append("not measured")
                    continue
                v = g.value(a, b)
                values.append(v)
                cell = f"{v:.2f}x ({a[g.key]:g} vs {b[g.key]:g})"
                if g.p99 and a.get("p99_ms") and b.get("p99_ms"):
                    worse = a["p99_ms"] > b["p99_ms"]
                    worse_p99 += worse
                    cell += f", p99 {a['p99_ms']:g} vs {b['p99_ms']:g}{' worse' if worse else ''}"
                cells.append(cell)
            sign = "<=" if g.lower_is_better else ">="
            median = f"{statistics.median(values):.2f}x" if values else "-"
            hits = sum(g.reached(v) for v in values)
            verdict = f"{hits} of {len(values)}"
            if g.p99:
                verdict += f"; p99 worse in {worse_p99}"
            out.append(
                f"| {g.name} | {sign} {g.goal}x | "
                + " | ".join(cells)
                + f" | {median} | {verdict} |"
            )
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(PAIRS), help=f"pairs: {','.join(PAIRS)}")
    parser.add_argument("--out", type=Path, default=None, help="results file (.jsonl)")
    parser.add_argument(
        "--report",
        type=Path,
        nargs="+",
        default=None,
        help="only report earlier results files (several: their rounds one after another)",
    )
    parser.add_argument("--md", type=Path, default=None, help="write the report here")
    args = parser.parse_args()
    if args.report:
        rows, offset = [], 0
        for path in args.report:
            mine = bm.load(path)
            for r in mine:
                if "round" in r:
                    r["round"] = int(r["round"]) + offset
            offset = max([offset, *(int(r["round"]) for r in mine if "round" in r)])
            rows += mine
        earlier = args.report[0].with_suffix(".md")  # its first line names the machine
        first = earlier.read_text().splitlines()[0] if earlier.exists() else ""
        md = args.md or earlier
        text = report(rows, first.removeprefix("Machine: ") or "?")
        md.write_text(text)
        print(text)
        return
    pairs = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(pairs) - set(PAIRS)
    if unknown:
        parser.error(f"unknown pair(s) {sorted(unknown)}; choose from {','.join(PAIRS)}")
    bm.check_installed({"triton"} if {"batched", "compute"} & set(pairs) else set())
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or bm.ROOT / "loadtest" / "results" / f"pairs-{stamp}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    where = bm.machine()
    rounds = int(os.environ.get("ROUNDS", "5"))
    with tempfile.TemporaryDirectory(prefix="tensorgate-pairs-") as work:
        run = bm.Run(out, "8,32", int(os.environ.get("D", "10")), Path(work))
        bm.log(f"results -> {out} ({rounds} rounds, D={run.d} s); {where}")
        sides = _sides(run, pairs)
        for number in range(1, rounds + 1):
            for pair in pairs:
                first, second = sides[pair]
                for measure in (first, second) if number % 2 else (second, first):
                    tag = {"pair": pair, "round": number, "session": bm.SESSION}
                    with bm.tagging(out, lambda r, t=tag: r.update(t)):
                        measure()
    text = report(bm.load(out) if out.exists() else [], where)
    out.with_suffix(".md").write_text(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
