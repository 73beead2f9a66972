"""What grpc.aio itself charges per unary call for the things the gateway does on every
ModelInfer, measured as server CPU per request under h2load (c=32), one server process per
variant, interleaved over rounds:

- ``parse``: decode the ModelInferRequest, build and return a reply (the echo server);
- ``+trailer``: also ``context.set_trailing_metadata`` (the gateway's variant trailer);
- ``+deadline``: also ``context.time_remaining()`` (the caller's deadline);
- ``+interceptor``: ``+deadline`` and a ``grpc.aio.ServerInterceptor`` wrapping every
  handler (what the gateway's error mapping was before it moved into the servicer methods);
- ``+onnx``: ``+deadline`` and one ONNX Runtime run of the peers' MLP in the handler (10 us
  alone; it releases the GIL while it computes, which gRPC's poller thread may take).

    .venv/bin/python loadtest/grpc_costs.py [--rounds 3] [-D 6]

Writes ``loadtest/results/grpc-costs-<time>.json`` (command, machine, every run) and prints
the medians. Needs h2load (Debian nghttp2-client).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from tensorgate.protos import grpc_service_pb2 as pb

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_seconds, machine

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("parse", "+trailer", "+deadline", "+interceptor", "+onnx")
PEERS_HOME = Path(os.environ.get("PEERS_HOME", Path.home() / "peers"))
SERVICE = "inference.GRPCInferenceService"


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


async def serve(variant: str, port_file: Path) -> None:
    level = VARIANTS.index(variant)
    session = None
    if level >= 4:
        import numpy as np
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        session = ort.InferenceSession(
            str(PEERS_HOME / "models" / "mlp.onnx"), opts, providers=["CPUExecutionProvider"]
        )
        x = {session.get_inputs()[0].name: np.ones((1, 64), np.float32)}

    async def infer(request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        if level >= 2:
            context.time_remaining()
        if session is not None:
            session.run(None, x)
        reply = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
        out = reply.outputs.add(name="output", datatype="FP32")
        out.shape.extend([1, 10])
        reply.raw_output_contents.append(bytes(40))
        if level >= 1:
            context.set_trailing_metadata((("tensorgate-variant", "onnx"),))
        return reply

    handler = grpc.unary_unary_rpc_method_handler(
        infer,
        request_deserializer=pb.ModelInferRequest.FromString,
        response_serializer=pb.ModelInferResponse.SerializeToString,
    )
    server = grpc.aio.server(interceptors=[_Wrap()] if level == 3 else None)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {"ModelInfer": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    port_file.write_text(str(port))
    await server.wait_for_termination()


def run_variant(variant: str, body: Path, seconds: int, work: Path) -> dict:
    port_file = work / f"port-{time.monotonic_ns()}"
    proc = subprocess.Popen([sys.executable, __file__, "--serve", variant, str(port_file)])
    try:
        while not port_file.exists():
            time.sleep(0.05)
        port = port_file.read_text()
        h2 = ["h2load", "-t", "1", "-c", "32", "-m", "1", "--warm-up-time=2", "-D", str(seconds),
              "-d", str(body), "-H", "content-type: application/grpc", "-H", "te: trailers",
              f"http://127.0.0.1:{port}/{SERVICE}/ModelInfer"]  # fmt: skip
        time.sleep(0.5)
        cpu0 = cpu_seconds(proc.pid)
        out = subprocess.run(h2, capture_output=True, text=True, check=True).stdout
        cpu1 = cpu_seconds(proc.pid)
        done = int(re.search(r"(\d+) succeeded", out).group(1))  # type: ignore[union-attr]
        rps = float(re.search(r"finished in [\d.]+s, ([\d.]+) req/s", out).group(1))  # type: ignore[union-attr]
        # The warm-up's requests count in h2load's total but its CPU is outside the window:
        # use the measured rate over the measured seconds.
        return {
            "variant": variant,
            "rps": rps,
            "requests": done,
            "cpu_ms_per_request": round(1000 * (cpu1 - cpu0) / (rps * (seconds + 2)), 4),
        }
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--serve":
        asyncio.run(serve(sys.argv[2], Path(sys.argv[3])))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("-D", type=int, default=6)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        body = work / "body.grpc"
        subprocess.run(
            [sys.executable, str(ROOT / "loadtest" / "make_requests.py"), "--body",
             str(ROOT / "loadtest" / "data" / "mlp.json"), str(body)],
            check=True,
        )  # fmt: skip
        runs = [run_variant(v, body, args.D, work) for _ in range(args.rounds) for v in VARIANTS]
    medians = {
        v: statistics.median(r["cpu_ms_per_request"] for r in runs if r["variant"] == v)
        for v in VARIANTS
    }
    out = ROOT / "loadtest" / "results" / f"grpc-costs-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(
        json.dumps(
            {
                "command": " ".join([Path(sys.executable).name, *sys.argv]),
                "machine": machine(),
                "load_average": os.getloadavg(),
                "runs": runs,
                "median_cpu_ms_per_request": medians,
            },
            indent=1,
        )
    )
    base = medians["parse"]
    for v in VARIANTS:
        print(f"{v:14s} {medians[v]:.4f} ms CPU/request  (+{(medians[v] - base) * 1000:.1f} us)")
    print(f"results: {out}")


if __name__ == "__main__":
    main()
