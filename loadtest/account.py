"""Where a unary ModelInfer's server CPU goes, from the bare grpc.aio echo server up to the
gateway, in one table (docs/benchmarks.md, "Accounting for a request").

Under load (h2load, c=32, server CPU per request, one server process per rung, rounds
interleaved so that a busy moment hits them alike), a ladder of servers that each add one
thing to the one before, built from the gateway's own modules:

- ``echo``:      decode the ModelInferRequest, build a reply (the peers' echo server, parse);
- ``+deadline``: also read the caller's deadline and set the variant trailer;
- ``+interceptor``: also a ``grpc.aio.ServerInterceptor`` around every handler (not in the
  gateway without a token: an auth interceptor is added only then);
- ``+GIL held`` / ``+GIL released``: ``+deadline`` and ~11 us of hashing in the handler,
  as eight 2-kB SHA-256s (the GIL held) or one 16-kB SHA-256 (hashlib releases the GIL
  over 2 kB, as ONNX Runtime, torch and TensorFlow do while they compute): what handing
  the GIL back and forth costs, apart from the work;
- ``+codec``:    ``+deadline``, decoding with the gateway's ``codec.decode_request`` and
  encoding with ``codec.encode_response`` (the MLP's 10 outputs);
- ``+compute``:  ``+codec`` and one ONNX Runtime ``session.run`` of the MLP in the handler;
- ``+backend``:  ``+codec``, the run through the gateway's ``OnnxRuntimeBackend.infer``;
- ``gateway``:   ``tensorgate serve`` on the same model (admission, metrics, statistics,
  look-up, validation, routing, scheduling, outputs);
- ``gateway batched``: the same with ``[batching] max_queue_delay_us = 500``.

The native front end's ladder (``--front-ends native``; ``tensorgate_native`` installed):

- ``native echo``: the bare tonic server answers ModelInfer with a canned reply, the
  request not decoded (``Server(mode="echo")``);
- ``native +decode``: prost decodes the request, Rust builds and encodes a reply that
  echoes the inputs (``Server(mode="decode")``), no Python;
- ``native +hand-over``: the request handed to Python as the native front end does it
  (eventfd, ``take()``, a task per call through ``frontends.native.Dispatcher``, one
  ``complete()`` per tick), answered at once with a canned output; no pipeline;
- ``native +pipeline``: ``tensorgate serve --front-end native`` on an ONNX Identity over
  the request's tensor (next to no compute: the MLP's input back, [1,64]);
- ``native +compute``: ``tensorgate serve --front-end native`` on the MLP (``gateway``,
  native).

All rungs run on the event loop ``--loop`` names (default: what ``serve`` uses, uvloop);
``--loop both`` adds the standard-loop echo and gateway.

In process (no gRPC, one request at a time, CPU per request over ``--calls``): the same
path cut into stages, each timed alone - parse, decode, admission and measurement, look-up
and validation, routing, scheduling, the backend's wrapper, compute, outputs, encode and
serialization, and applying the measurements (amortized over a flush of 100 requests).

    .venv/bin/python loadtest/account.py [--rounds 3] [-D 6] [--calls 20000]
        [--front-ends python,native]

Writes ``loadtest/results/account-<time>.json`` (command, machine, every run) and the table
beside it (``.md``). Needs h2load (Debian nghttp2-client) and the peers' MLP
($PEERS_HOME/models/mlp.onnx, ../shared/peers/setup_models.sh).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np

from tensorgate import codec
from tensorgate.protos import grpc_service_pb2 as pb

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_seconds, machine, mlp_body, stop_group

ROOT = Path(__file__).resolve().parents[1]
PEERS_HOME = Path(os.environ.get("PEERS_HOME", Path.home() / "peers"))
MODEL = PEERS_HOME / "models" / "mlp.onnx"
SERVICE = "inference.GRPCInferenceService"
LADDER = (
    "echo", "+deadline", "+interceptor", "+GIL held", "+GIL released",
    "+codec", "+compute", "+backend",
)  # fmt: skip
# ~11 us of hashing per request either way: hashlib releases the GIL for inputs over 2 kB.
_BIG, _SMALL = bytes(16000), bytes(2000)
GATEWAYS = ("gateway", "gateway batched")
NATIVE = (
    "native echo", "native +decode", "native +hand-over", "native +pipeline", "native +compute",
)  # fmt: skip
# Rungs that are `tensorgate serve`, and with which front end.
SERVED = {"gateway": "python", "gateway batched": "python",
          "native +pipeline": "native", "native +compute": "native"}  # fmt: skip
# Each rung's "adds" is against this one (default: the rung before it in its ladder).
BASE = {"+interceptor": "+deadline", "+GIL held": "+deadline", "+GIL released": "+deadline",
        "+codec": "+deadline", "+backend": "+codec", "gateway": "+codec",
        "gateway batched": "+codec", "native echo": "echo"}  # fmt: skip


# -- the ladder's servers -------------------------------------------------------------------
class _Wrap(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        inner = handler.unary_unary

        async def unary(request, context):
            try:
                return await inner(request, context)
            except grpc.aio.AbortError:
                raise

        return grpc.unary_unary_rpc_method_handler(
            unary, handler.request_deserializer, handler.response_serializer
        )


def _onnx_backend():
    from tensorgate.backends.base import BackendOptions
    from tensorgate.backends.onnxruntime import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend()
    backend.load(MODEL, BackendOptions())  # 1 intra-op thread, no spinning: as served
    return backend


class _NoColdRPCs:
    """Stands in for the servicers of the cold RPCs (the rung serves ModelInfer only)."""

    def __getattr__(self, name: str) -> None:
        return None


async def serve_native(rung: str, port_file: Path) -> None:
    """``native echo``, ``native +decode`` and ``native +hand-over``: tensorgate_native's
    server on its own, and with the native front end's hand-over answering at once."""
    import tensorgate_native

    from tensorgate.server.auth import TokenPolicy
    from tensorgate.server.frontends.native import WORKER_THREADS, Dispatcher, bind
    from tensorgate.server.servicer import VARIANT_METADATA_KEY

    mode = {"native echo": "echo", "native +decode": "decode"}.get(rung, "gateway")
    sock = bind("127.0.0.1", 0, reuse_port=False)
    port = sock.getsockname()[1]
    server = tensorgate_native.Server(
        fd=sock.fileno(), max_message_bytes=4 << 20, worker_threads=WORKER_THREADS, mode=mode
    )
    sock.detach()
    if mode == "gateway":
        zeros = np.zeros((1, 10), np.float32)
        trailers = [(VARIANT_METADATA_KEY, "1")]

        async def serve_infer(request: tuple, metadata, timeout, stream) -> tuple:
            return (0, request[0], "1", request[2], [("output", "FP32", (1, 10), zeros)],
                    trailers)  # fmt: skip

        cold = _NoColdRPCs()
        dispatcher = Dispatcher(server, cold, cold, TokenPolicy(), serve_infer)
        dispatcher.attach(asyncio.get_running_loop())
    server.start()
    port_file.write_text(json.dumps({"grpc_port": port}))
    await asyncio.Event().wait()  # until SIGTERM


async def serve(rung: str, port_file: Path) -> None:
    from tensorgate.inference import InferenceResponse, OutputTensor

    if rung in NATIVE:
        await serve_native(rung, port_file)
        return
    level = LADDER.index(rung)
    backend = _onnx_backend() if rung in ("+compute", "+backend") else None
    session = backend._session if backend is not None else None
    zeros = np.zeros((1, 10), np.float32)

    async def infer(request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        if level >= 1:
            context.time_remaining()
        if rung == "+GIL held":
            for _ in range(8):
                hashlib.sha256(_SMALL)
        elif rung == "+GIL released":
            hashlib.sha256(_BIG)
        if rung not in ("+codec", "+compute", "+backend"):
            reply = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
            out = reply.outputs.add(name="output", datatype="FP32")
            out.shape.extend([1, 10])
            reply.raw_output_contents.append(bytes(40))
        else:
            decoded = codec.decode_request(request)
            x = decoded.inputs[0].data
            if rung == "+compute":
                y = session.run(["output"], {"input": x})[0]
            elif rung == "+backend":
                y = backend.infer({"input": x}, None)["output"]
            else:
                y = zeros
            reply = codec.encode_response(
                InferenceResponse(request.model_name, "1", request.id,
                                  [OutputTensor("output", "FP32", y)])
            )  # fmt: skip
        if level >= 1:
            context.set_trailing_metadata((("tensorgate-variant", "1"),))
        return reply

    handler = grpc.unary_unary_rpc_method_handler(
        infer,
        request_deserializer=pb.ModelInferRequest.FromString,
        response_serializer=pb.ModelInferResponse.SerializeToString,
    )
    server = grpc.aio.server(interceptors=[_Wrap()] if rung == "+interceptor" else None)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {"ModelInfer": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    port_file.write_text(json.dumps({"grpc_port": port}))
    await server.wait_for_termination()


# -- driving them ---------------------------------------------------------------------------
def _start(
    rung: str, loop: str, work: Path, repos: dict[str, Path]
) -> tuple[subprocess.Popen, Path]:
    port_file = work / f"port-{time.monotonic_ns()}.json"
    if rung in SERVED:
        cmd = [sys.executable, "-m", "tensorgate.server.cli", "serve", "--repository",
               str(repos[rung]), "--port", "0", "--metrics-port", "0", "--port-file",
               str(port_file), "--log-level", "WARNING", "--event-loop", loop,
               "--front-end", SERVED[rung]]  # fmt: skip
    else:
        cmd = [sys.executable, __file__, "--serve", rung, str(port_file), loop]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{rung}: the server did not start")
        time.sleep(0.05)
    return proc, port_file


def run_rung(rung: str, loop: str, body: Path, seconds: int, work: Path,
             repos: dict[str, Path]) -> dict:  # fmt: skip
    proc, port_file = _start(rung, loop, work, repos)
    try:
        time.sleep(0.5)
        port = json.loads(port_file.read_text())["grpc_port"]

        def h2(d: int) -> list[str]:
            return ["h2load", "-t", "1", "-c", "32", "-m", "1", "-D", str(d), "-d", str(body),
                    "-H", "content-type: application/grpc", "-H", "te: trailers",
                    f"http://127.0.0.1:{port}/{SERVICE}/ModelInfer"]  # fmt: skip

        subprocess.run(h2(2), capture_output=True, check=True)  # warm-up
        cpu0 = cpu_seconds(proc.pid)
        out = subprocess.run(h2(seconds), capture_output=True, text=True, check=True).stdout
        cpu1 = cpu_seconds(proc.pid)
        done = int(re.search(r"(\d+) succeeded", out).group(1))  # type: ignore[union-attr]
        failed = int(re.search(r"(\d+) failed", out).group(1))  # type: ignore[union-attr]
        return {
            "rung": rung,
            "loop": loop,
            "rps": round(done / seconds, 1),
            "failed": failed,
            "cpu_us_per_request": round(1e6 * (cpu1 - cpu0) / max(done, 1), 1),
        }
    finally:
        stop_group(proc, 30)


# -- in process -------------------------------------------------------------------------------
def _per_call(fn: Callable[[], object], calls: int) -> float:
    for _ in range(min(2000, calls)):
        fn()
    best = float("inf")
    for _ in range(3):
        started = time.process_time()
        for _ in range(calls):
            fn()
        best = min(best, (time.process_time() - started) / calls)
    return best * 1e6


async def in_process(repo: Path, calls: int) -> dict[str, float]:
    """CPU microseconds per request of each stage of the gateway's path, timed alone."""
    from tensorgate.server.app import Gateway
    from tensorgate.server.metrics import Trace
    from tensorgate.server.settings import ServerSettings
    from tensorgate.server.signature import validate_inputs

    gateway = Gateway(ServerSettings(repository=repo, port=0, metrics_port=None))
    await gateway.repository.load_all()
    pipeline, router = gateway.pipeline, gateway.router
    model = gateway.repository.models["mlp"]
    variant = model.variants["1"]
    backend, scheduler = variant.backend, variant.scheduler
    assert backend is not None and scheduler is not None and model.signature is not None
    raw = codec.encode_request("mlp", {"input": np.ones((1, 64), np.float32)}).SerializeToString()
    msg = pb.ModelInferRequest.FromString(raw)
    request = codec.decode_request(msg)
    inputs = validate_inputs("mlp", model.signature, request.inputs)
    session = backend._session

    async def whole() -> bytes:
        m = pb.ModelInferRequest.FromString(raw)
        with pipeline.call(m.model_name) as trace:
            r = codec.decode_request(m)
            trace.decoded()
            response = await pipeline.infer(r, None, trace)
            trace.encoding()
            reply = codec.encode_response(response)
        return reply.SerializeToString()

    def run(coro_fn: Callable[[], object]) -> Callable[[], object]:
        # The inline path never suspends: drive the coroutine by hand, as the loop would.
        def step() -> None:
            coro = coro_fn()
            try:
                coro.send(None)  # type: ignore[attr-defined]
            except StopIteration:
                return
            raise RuntimeError("the path suspended: it did not run inline")

        return step

    for _ in range(2000):  # the variant learns its cost and moves to the event loop
        await whole()
    assert scheduler._may_inline and scheduler._cheap(inputs), "not inline"

    def admission() -> None:
        with pipeline.call("mlp") as trace:
            trace.decoded()
            trace.encoding()

    def lookup_validate() -> None:
        m = gateway.repository.get("mlp")
        assert m.signature is not None and m.ready
        validate_inputs("mlp", m.signature, request.inputs)

    def submit() -> object:
        return scheduler.submit(inputs, None, None, Trace(0.0, "mlp").timings)

    outputs = backend.infer(inputs, None)
    response = pipeline._outputs(model, "1", request, outputs)
    stages = {
        "parse (protobuf)": _per_call(lambda: pb.ModelInferRequest.FromString(raw), calls),
        "decode": _per_call(lambda: codec.decode_request(msg), calls),
        "admission + measurement": _per_call(admission, calls),
        "look-up + validation": _per_call(lookup_validate, calls),
        "routing (plan)": _per_call(lambda: router.plan(model, request), calls),
        "scheduling + backend + compute": _per_call(run(submit), calls),
        "backend wrapper + compute": _per_call(lambda: backend.infer(inputs, None), calls),
        "compute (session.run)": _per_call(lambda: session.run(["output"], inputs), calls),
        "outputs": _per_call(
            lambda: pipeline._outputs(model, "1", request, outputs),
            calls,
        ),
        "encode + serialize": _per_call(
            lambda: codec.encode_response(response).SerializeToString(), calls
        ),
    }
    telemetry = pipeline.telemetry
    spent, counted = 0.0, 0
    for _ in range(max(3, calls // 100)):
        for _ in range(100):
            with pipeline.call("mlp") as trace:
                trace.decoded()
        started = time.process_time()
        telemetry.flush()
        spent += time.process_time() - started
        counted += 100
    stages["applying measurements (a flush of 100, per request)"] = spent / counted * 1e6
    stages["whole path"] = _per_call(run(whole), calls)
    await gateway.repository.close()
    return {k: round(v, 2) for k, v in stages.items()}


def identity_repo(root: Path) -> Path:
    """A repository whose model ``mlp`` is an ONNX Identity: ``input`` FP32 [n,64] back as
    ``output`` (the MLP's request, next to no compute)."""
    from onnx import TensorProto, helper, save

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 64])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["n", 64])
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["output"])],
                              "identity", [x], [y])  # fmt: skip
    (root / "mlp" / "1").mkdir(parents=True)
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
         str(root / "mlp" / "1" / "model.onnx"))  # fmt: skip
    return root


# -- the table ---------------------------------------------------------------------------------
def table(medians: dict[str, dict[str, dict[str, float]]], loop: str) -> str:
    lines = [
        f"Under load (h2load c=32, {loop} loop; medians over rounds): server CPU per request,",
        "and what each rung adds to the one before.",
        "",
        "| rung | requests/s | CPU us/request | adds |",
        "|---|---:|---:|---:|",
    ]
    rungs = [r for r in (*LADDER, *GATEWAYS, *NATIVE) if r in medians.get(loop, {})]
    prev = None
    for rung in rungs:
        cpu = medians[loop][rung]["cpu"]
        base = BASE.get(rung, prev)
        if base not in medians[loop]:
            base = prev
        add = f"{cpu - medians[loop][base]['cpu']:+.0f} (vs {base})" if base else ""
        lines.append(f"| {rung} | {medians[loop][rung]['rps']:,.0f} | {cpu:.0f} | {add} |")
        if rung not in GATEWAYS:
            prev = rung
    return "\n".join(lines) + "\n"


def stage_table(stages: dict[str, float]) -> str:
    lines = [
        "In process (no gRPC, one request at a time): CPU us per request, each stage alone.",
        "",
        "| stage | us |",
        "|---|---:|",
        *(f"| {k} | {v:.1f} |" for k, v in stages.items()),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--serve":
        from tensorgate.server.eventloop import run

        run(serve(sys.argv[2], Path(sys.argv[3])), sys.argv[4])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("-D", type=int, default=6, help="seconds per run")
    parser.add_argument("--calls", type=int, default=20000, help="in-process calls per stage")
    parser.add_argument("--loop", choices=("uvloop", "asyncio", "both"), default="uvloop")
    parser.add_argument(
        "--front-ends",
        default="python,native",
        help="whose ladders: python (grpc.aio up to the gateway), native (tensorgate_native)",
    )
    parser.add_argument("--rungs", help="comma-separated (default: the front ends' ladders)")
    args = parser.parse_args()
    loops = ["uvloop", "asyncio"] if args.loop == "both" else [args.loop]
    ladders = {"python": (*LADDER, *GATEWAYS), "native": NATIVE}
    default = [r for f in args.front_ends.split(",") for r in ladders[f]]
    rungs = args.rungs.split(",") if args.rungs else default
    unknown = set(rungs) - {*LADDER, *GATEWAYS, *NATIVE}
    if unknown:
        parser.error(f"unknown rungs: {', '.join(sorted(unknown))}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        repos = {}
        batched = "max_batch_size = 32\n[batching]\nmax_queue_delay_us = 500\n"
        for rung, config in (("gateway", ""), ("gateway batched", batched)):
            repo = work / rung.replace(" ", "-")
            (repo / "mlp" / "1").mkdir(parents=True)
            shutil.copy(MODEL, repo / "mlp" / "1" / "model.onnx")
            if config:
                (repo / "mlp" / "config.toml").write_text(config)
            repos[rung] = repo
        repos["native +compute"] = repos["gateway"]
        repos["native +pipeline"] = identity_repo(work / "identity")
        body = mlp_body(work / "body.grpc")
        stages = asyncio.run(in_process(repos["gateway"], args.calls)) if args.calls else {}
        runs = []
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}", flush=True)
            for loop in loops:
                for rung in rungs:
                    if loop == "asyncio" and rung not in ("echo", "gateway"):
                        continue  # the standard loop: the floor and the gateway only
                    runs.append(run_rung(rung, loop, body, args.D, work, repos))
                    print(json.dumps(runs[-1]), flush=True)
    medians: dict[str, dict[str, dict[str, float]]] = {}
    for run in runs:
        same = [x for x in runs if x["rung"] == run["rung"] and x["loop"] == run["loop"]]
        medians.setdefault(run["loop"], {})[run["rung"]] = {
            "cpu": statistics.median(x["cpu_us_per_request"] for x in same),
            "rps": statistics.median(x["rps"] for x in same),
        }
    command = " ".join([Path(sys.executable).name, *sys.argv])
    report = (
        f"Machine: {machine()}. Command: `{command}`.\n\n"
        + "\n".join(table(medians, loop) for loop in loops)
        + "\n"
        + (stage_table(stages) if stages else "")
    )
    if "asyncio" in medians and "uvloop" in medians:
        report += (
            "\nThe standard loop against uvloop: "
            + ", ".join(
                f"{rung} {medians['asyncio'][rung]['cpu']:.0f} vs "
                f"{medians['uvloop'][rung]['cpu']:.0f} us"
                for rung in ("echo", "gateway")
                if rung in medians["asyncio"] and rung in medians["uvloop"]
            )
            + "\n"
        )
    out = ROOT / "loadtest" / "results" / f"account-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(
        json.dumps(
            {
                "command": command,
                "machine": machine(),
                "load_average": os.getloadavg(),
                "in_process_us": stages,
                "runs": runs,
                "medians": medians,
            },
            indent=1,
        )
    )
    out.with_suffix(".md").write_text(report)
    print(report)
    print(f"results: {out}")


if __name__ == "__main__":
    main()
