"""``tensorgate bench``: a load generator for any Open Inference Protocol gRPC server.

ghz-like options: ``-c`` concurrent callers, ``-n`` requests in total or ``-z`` a duration,
``--rps`` an open-loop rate, ``--version`` to pin a variant, ``--sticky-key`` to spread
routing keys. The request is built and serialized once and sent as bytes, so the client
spends its time on gRPC, not on protobuf. Prints requests/s, latency min/mean/percentiles/
max, a latency histogram, status-code counts and a per-variant breakdown; ``--format
json|csv`` for machines.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import math
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import click
import grpc
import numpy as np

from tensorgate.protos import grpc_service_pb2 as pb

from .cli_options import client_security, client_security_options

METHOD = "/inference.GRPCInferenceService/ModelInfer"
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"


@dataclass
class Result:
    latencies: list[float] = field(default_factory=list)  # seconds, successful calls
    codes: Counter[str] = field(default_factory=Counter)
    variants: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: Counter[str] = field(default_factory=Counter)  # first words of error details
    wall: float = 0.0

    def record(self, latency: float, code: str, variant: str = "", detail: str = "") -> None:
        self.codes[code] += 1
        if code == "OK":
            self.latencies.append(latency)
            self.variants[variant].append(latency)
        elif detail:
            self.errors[detail[:120]] += 1


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    i = min(len(sorted_values) - 1, max(0, math.ceil(q / 100 * len(sorted_values)) - 1))
    return sorted_values[i]


def summary(result: Result, concurrency: int) -> dict:
    lat = sorted(result.latencies)
    total = sum(result.codes.values())
    ms = 1e3

    def stats(values: list[float]) -> dict:
        v = sorted(values)
        return {
            "count": len(v),
            "rps": len(v) / result.wall if result.wall else 0.0,
            "p50_ms": percentile(v, 50) * ms,
            "p99_ms": percentile(v, 99) * ms,
        }

    return {
        "requests": total,
        "concurrency": concurrency,
        "duration_s": result.wall,
        "rps": total / result.wall if result.wall else 0.0,
        "ok_rps": len(lat) / result.wall if result.wall else 0.0,
        "latency_ms": {
            "min": lat[0] * ms if lat else math.nan,
            "mean": (sum(lat) / len(lat)) * ms if lat else math.nan,
            **{f"p{q}": percentile(lat, q) * ms for q in (50, 90, 95, 99)},
            "max": lat[-1] * ms if lat else math.nan,
        },
        "codes": dict(result.codes),
        "errors": dict(result.errors.most_common(5)),
        "variants": {v: stats(values) for v, values in sorted(result.variants.items())},
    }


def histogram_lines(latencies: list[float], bins: int = 10, width: int = 40) -> list[str]:
    if not latencies:
        return []
    lo, hi = min(latencies), max(latencies)
    if hi <= lo:
        return [f"  {lo * 1e3:9.3f} ms [{len(latencies)}] {'#' * width}"]
    counts, edges = np.histogram(latencies, bins=bins, range=(lo, hi))
    peak = max(counts)
    return [
        f"  {edges[i + 1] * 1e3:9.3f} ms [{c:>7}] {'#' * round(width * c / peak)}"
        for i, c in enumerate(counts)
    ]


async def run_load(
    target: str,
    request: pb.ModelInferRequest,
    *,
    concurrency: int,
    total: int | None,
    duration: float | None,
    rps: float | None,
    timeout: float,
    sticky_keys: int,
    sticky_name: str | None,
    connections: int,
    stream: bool,
    progress=None,
    credentials: grpc.ChannelCredentials | None = None,
    metadata: tuple[tuple[str, str], ...] = (),
) -> Result:
    """Closed loop (``concurrency`` callers back to back) or, with ``rps``, open loop."""
    # A local subchannel pool per channel: otherwise gRPC shares one TCP connection between
    # channels to the same target, and --connections would not open several.
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [
        grpc.aio.secure_channel(target, credentials, options=options)
        if credentials is not None
        else grpc.aio.insecure_channel(target, options=options)
        for _ in range(max(1, connections))
    ]
    result = Result()
    sent = 0
    start = time.perf_counter()
    stop_at = start + duration if duration else math.inf
    payloads = _payloads(request, sticky_keys, sticky_name)

    def take() -> int | None:
        nonlocal sent
        if (total is not None and sent >= total) or time.perf_counter() >= stop_at:
            return None
        sent += 1
        return sent - 1

    async def unary_caller(worker: int) -> None:
        call = channels[worker % len(channels)].unary_unary(
            METHOD, request_serializer=None, response_deserializer=pb.ModelInferResponse.FromString
        )
        while (i := take()) is not None:
            if rps:
                delay = start + i / rps - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            t0 = time.perf_counter()
            try:
                reply = await call(payloads[i % len(payloads)], timeout=timeout, metadata=metadata)
                result.record(time.perf_counter() - t0, "OK", reply.model_version)
            except grpc.aio.AioRpcError as e:
                result.record(time.perf_counter() - t0, e.code().name, detail=e.details() or "")
            if progress is not None:
                progress(1)

    async def stream_caller(worker: int) -> None:
        # One stream per caller, one request in flight on it: the same closed loop as
        # unary, without a new HTTP/2 stream per request.
        call = channels[worker % len(channels)].stream_stream(
            STREAM,
            request_serializer=None,
            response_deserializer=pb.ModelStreamInferResponse.FromString,
        )(timeout=None, metadata=metadata)
        try:
            while (i := take()) is not None:
                t0 = time.perf_counter()
                await call.write(payloads[i % len(payloads)])
                reply = await call.read()
                if reply.error_message:
                    code = reply.error_message.split(":", 1)[0]
                    result.record(time.perf_counter() - t0, code, detail=reply.error_message)
                else:
                    result.record(
                        time.perf_counter() - t0, "OK", reply.infer_response.model_version
                    )
                if progress is not None:
                    progress(1)
            await call.done_writing()
        except grpc.aio.AioRpcError as e:
            result.record(0.0, e.code().name, detail=e.details() or "")

    caller = stream_caller if stream else unary_caller
    try:
        await asyncio.gather(*(caller(w) for w in range(concurrency)))
    finally:
        result.wall = time.perf_counter() - start
        for ch in channels:
            await ch.close()
    return result


def _payloads(request: pb.ModelInferRequest, keys: int, name: str | None) -> list[bytes]:
    if not keys or not name:
        return [request.SerializeToString()]
    out = []
    for k in range(keys):
        r = pb.ModelInferRequest()
        r.CopyFrom(request)
        r.parameters[name].string_param = f"key-{k}"
        out.append(r.SerializeToString())
    return out


def render_text(s: dict, latencies: list[float]) -> str:
    lines = [
        "Summary:",
        f"  Count:        {s['requests']}",
        f"  Total:        {s['duration_s']:.2f} s",
        f"  Requests/sec: {s['rps']:.1f}  (OK: {s['ok_rps']:.1f})",
        f"  Concurrency:  {s['concurrency']}",
        "",
        "Latency (ms):",
    ]
    lines += [f"  {k:<5} {v:9.3f}" for k, v in s["latency_ms"].items()]
    lines += ["", "Latency histogram:", *histogram_lines(latencies), "", "Status codes:"]
    lines += [f"  {code:<20} {n}" for code, n in sorted(s["codes"].items())]
    if s["errors"]:
        lines += ["", "Errors (most common):"]
        lines += [f"  [{n}] {detail}" for detail, n in s["errors"].items()]
    lines += ["", "Per variant:"]
    lines += [
        f"  {v or '(unnamed)':<12} {d['count']:>8} OK  {d['rps']:9.1f}/s  "
        f"p50 {d['p50_ms']:8.3f} ms  p99 {d['p99_ms']:8.3f} ms"
        for v, d in s["variants"].items()
    ]
    return "\n".join(lines)


def render_csv(s: dict) -> str:
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(["variant", "count", "rps", "p50_ms", "p99_ms"])
    ok = sum(d["count"] for d in s["variants"].values())
    w.writerow(["(all)", ok, s["ok_rps"], s["latency_ms"]["p50"], s["latency_ms"]["p99"]])
    for v, d in s["variants"].items():
        w.writerow([v, d["count"], d["rps"], d["p50_ms"], d["p99_ms"]])
    return out.getvalue()


@click.command()
@click.argument("model")
@click.option("--url", default="127.0.0.1:8001", show_default=True, help="Server address.")
@click.option("-c", "--concurrency", default=8, show_default=True, help="Concurrent callers.")
@click.option("-n", "--total", type=int, default=None, help="Requests in total.")
@click.option(
    "-z",
    "--duration",
    type=float,
    default=None,
    help="Seconds to run (default 10 when -n is not given).",
)
@click.option("--rps", type=float, default=None, help="Open-loop rate limit (requests/s).")
@click.option("--version", "-v", default=None, help="Pin a variant (model_version).")
@click.option(
    "--sticky-key",
    default=None,
    help="Send this request parameter with --sticky-keys distinct values.",
)
@click.option("--sticky-keys", default=100, show_default=True, help="Distinct sticky values.")
@click.option(
    "--batch",
    "-b",
    default=1,
    show_default=True,
    help="Rows per request (replaces -1 in the first dimension).",
)
@click.option(
    "--input",
    "-i",
    "inputs",
    multiple=True,
    metavar="NAME=FILE.npy|JSON",
    help="Input data; inputs not given are random.",
)
@click.option("--connections", default=1, show_default=True, help="gRPC channels.")
@click.option("--stream", is_flag=True, help="Send over ModelStreamInfer streams.")
@click.option("--timeout", default=30.0, show_default=True, help="Per-call deadline, seconds.")
@click.option("--format", "fmt", type=click.Choice(["text", "json", "csv"]), default="text")
@client_security_options
def bench(
    model: str,
    url: str,
    concurrency: int,
    total: int | None,
    duration: float | None,
    rps: float | None,
    version: str | None,
    sticky_key: str | None,
    sticky_keys: int,
    batch: int,
    inputs: tuple[str, ...],
    connections: int,
    stream: bool,
    timeout: float,
    fmt: str,
    tls: bool,
    tls_ca: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    token: str | None,
) -> None:
    """Load-test MODEL and print throughput, latency percentiles and a per-variant split."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from tensorgate import codec
    from tensorgate.clients import Client, InferenceError
    from tensorgate.clients.client import auth_metadata, tls_credentials

    from .cli import _parse_input, _random_input

    if total is None and duration is None:
        duration = 10.0
    security = client_security(tls, tls_ca, tls_cert, tls_key)
    use_tls = tls or any(v is not None for v in (tls_ca, tls_cert, tls_key))
    credentials = tls_credentials(tls_ca, tls_cert, tls_key) if use_tls else None
    with Client(url, token=token, **security) as client:
        try:
            meta = client.model_metadata(model, version)
        except InferenceError as e:
            raise click.ClickException(str(e)) from None
    by_input = {t["name"]: t for t in meta.get("inputs", [])}
    tensors = dict(_parse_input(s, by_input) for s in inputs)
    for name, t in by_input.items():
        if name not in tensors:
            shape = [int(d) for d in t.get("shape", [])]
            if shape and shape[0] < 0:
                shape[0] = batch
            tensors[name] = _random_input({**t, "shape": shape})
    request = codec.encode_request(model, tensors, version or "")

    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}"),
        TimeElapsedColumn(), transient=True, disable=fmt != "text",
    ) as bar:  # fmt: skip
        task = bar.add_task(f"{model} c={concurrency}", total=total)
        result = asyncio.run(
            run_load(
                url, request, concurrency=concurrency, total=total, duration=duration, rps=rps,
                timeout=timeout, sticky_keys=sticky_keys, sticky_name=sticky_key,
                connections=connections, stream=stream, credentials=credentials,
                metadata=auth_metadata(token),
                progress=lambda n: bar.advance(task, n),
            )
        )  # fmt: skip
    s = summary(result, concurrency)
    if fmt == "json":
        click.echo(json.dumps(s))
    elif fmt == "csv":
        click.echo(render_csv(s), nl=False)
    else:
        click.echo(render_text(s, result.latencies))
