"""``tensorgate top``: the per-backend figures of a running gateway, in a terminal.

Reads the gateway's own ``/metrics`` twice, ``interval`` seconds apart, and shows per
model, variant and backend: requests/s, error rate, p50/p95/p99 of the end-to-end time
(from the histogram buckets, interpolated as Prometheus' ``histogram_quantile`` does),
and mean queue vs compute time over the interval.
"""

from __future__ import annotations

import json
import math
import sys
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import click
from prometheus_client.parser import text_string_to_metric_families

Key = tuple[str, str, str]  # model, variant, backend


@dataclass
class Snapshot:
    at: float
    # (model, variant, backend) -> {le: cumulative count}
    buckets: dict[Key, dict[float, float]] = field(default_factory=lambda: defaultdict(dict))
    sums: dict[tuple[str, Key], float] = field(default_factory=dict)  # (metric, key) -> sum
    counts: dict[tuple[str, Key], float] = field(default_factory=dict)
    codes: dict[Key, dict[str, float]] = field(default_factory=lambda: defaultdict(dict))


def parse(text: str, at: float) -> Snapshot:
    snap = Snapshot(at)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = s.labels
            if "model" not in labels or "variant" not in labels:
                continue
            key = (labels["model"], labels["variant"], labels.get("backend", ""))
            if s.name == "tensorgate_request_duration_seconds_bucket":
                snap.buckets[key][float(labels["le"])] = s.value
            elif s.name.endswith("_duration_seconds_sum"):
                snap.sums[(s.name.removesuffix("_sum"), key)] = s.value
            elif s.name.endswith("_duration_seconds_count"):
                snap.counts[(s.name.removesuffix("_count"), key)] = s.value
            elif s.name == "tensorgate_requests_total":
                snap.codes[key][labels["code"]] = s.value
    return snap


def histogram_quantile(q: float, buckets: dict[float, float]) -> float:
    """The q-quantile from cumulative bucket counts {upper bound: count}, interpolating
    linearly inside the bucket, as Prometheus does. NaN when there are no observations."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return math.nan
    total = buckets[bounds[-1]]
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for b in bounds:
        c = buckets[b]
        if c >= rank:
            if math.isinf(b):
                return prev_bound
            if c == prev_count:
                return b
            return prev_bound + (b - prev_bound) * (rank - prev_count) / (c - prev_count)
        prev_bound, prev_count = b, c
    return bounds[-1]


@dataclass
class Row:
    model: str
    variant: str
    backend: str
    rps: float
    errors: float  # fraction of requests that failed in the interval
    p50: float
    p95: float
    p99: float
    queue: float  # mean seconds
    compute: float


def rows(before: Snapshot, after: Snapshot) -> list[Row]:
    """Per-variant figures over the interval between two snapshots."""
    dt = max(after.at - before.at, 1e-9)
    keys = set(after.codes) | set(after.buckets)
    out: list[Row] = []
    for key in sorted(keys):
        model, variant, backend = key
        if not variant:
            continue
        codes_now, codes_then = after.codes.get(key, {}), before.codes.get(key, {})
        delta = {c: v - codes_then.get(c, 0.0) for c, v in codes_now.items()}
        total = sum(delta.values())
        failed = total - delta.get("OK", 0.0)
        window = {
            le: c - before.buckets.get(key, {}).get(le, 0.0)
            for le, c in after.buckets.get(key, {}).items()
        }

        def mean(metric: str, key: Key = key) -> float:
            n = after.counts.get((metric, key), 0) - before.counts.get((metric, key), 0)
            s = after.sums.get((metric, key), 0) - before.sums.get((metric, key), 0)
            return s / n if n > 0 else math.nan

        out.append(
            Row(
                model,
                variant,
                backend,
                rps=total / dt,
                errors=failed / total if total else 0.0,
                p50=histogram_quantile(0.5, window),
                p95=histogram_quantile(0.95, window),
                p99=histogram_quantile(0.99, window),
                queue=mean("tensorgate_queue_duration_seconds"),
                compute=mean("tensorgate_compute_duration_seconds"),
            )
        )
    return out


def scrape(url: str, timeout: float = 5.0) -> Snapshot:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        text = r.read().decode()
    return parse(text, time.monotonic())


def _ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1e3:.2f}"


def table(data: Iterable[Row], title: str):
    from rich.table import Table

    t = Table(title=title)
    for col in ("model", "variant", "backend"):
        t.add_column(col)
    for col in ("req/s", "errors", "p50 ms", "p95 ms", "p99 ms", "queue ms", "compute ms"):
        t.add_column(col, justify="right")
    for r in data:
        t.add_row(
            r.model, r.variant, r.backend, f"{r.rps:.1f}", f"{r.errors:.1%}",
            _ms(r.p50), _ms(r.p95), _ms(r.p99), _ms(r.queue), _ms(r.compute),
        )  # fmt: skip
    return t


@click.command()
@click.option(
    "--metrics-url",
    default="http://127.0.0.1:8002/metrics",
    show_default=True,
    help="The gateway's Prometheus endpoint.",
)
@click.option(
    "--interval",
    default=2.0,
    show_default=True,
    type=float,
    help="Seconds between the two scrapes each figure is computed over.",
)
@click.option("--once", is_flag=True, help="Print one table and exit (no live view).")
@click.option("--json", "as_json", is_flag=True, help="With --once: print JSON rows.")
def top(metrics_url: str, interval: float, once: bool, as_json: bool) -> None:
    """Live per-model, per-backend requests/s, errors, latency percentiles, queue vs compute."""
    from rich.console import Console
    from rich.live import Live

    console = Console(width=None if sys.stdout.isatty() else 160)
    try:
        before = scrape(metrics_url)
        if once:
            time.sleep(interval)
            data = rows(before, scrape(metrics_url))
            if as_json:
                click.echo(json.dumps([asdict(r) for r in data]))
            else:
                console.print(table(data, f"tensorgate {metrics_url} ({interval:g} s)"))
            return
        with Live(console=console, auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                after = scrape(metrics_url)
                title = f"tensorgate {metrics_url} (every {interval:g} s, Ctrl-C to quit)"
                live.update(table(rows(before, after), title), refresh=True)
                before = after
    except KeyboardInterrupt:
        pass
    except OSError as e:
        click.echo(f"error: cannot read {metrics_url}: {e}", err=True)
        sys.exit(1)
