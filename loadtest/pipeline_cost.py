"""The gateway's own CPU per request, without gRPC: one ModelInfer's parse, admission and
measurement, decode, look-up, validation, routing, scheduling (inline), compute, outputs,
encode and serialization, run in process in a loop on the peers' ONNX MLP; and the
backend's compute alone. Set beside ``bench_path.py`` (the same request through gRPC) and
``grpc_costs.py`` (what grpc.aio charges per call), it says where a request's CPU goes.

    .venv/bin/python loadtest/pipeline_cost.py [--calls 20000]

Writes ``loadtest/results/pipeline-cost-<time>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tensorgate import codec
from tensorgate.protos import grpc_service_pb2 as pb
from tensorgate.server.app import Gateway
from tensorgate.server.settings import ServerSettings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine

ROOT = Path(__file__).resolve().parents[1]
PEERS_HOME = Path(os.environ.get("PEERS_HOME", Path.home() / "peers"))


async def measure(repo: Path, calls: int) -> dict[str, float]:
    gateway = Gateway(ServerSettings(repository=repo, port=0, metrics_port=None))
    await gateway.repository.load_all()
    pipeline = gateway.pipeline
    raw = codec.encode_request("mlp", {"input": np.ones((1, 64), np.float32)}).SerializeToString()

    async def one() -> bytes:
        msg = pb.ModelInferRequest.FromString(raw)
        with pipeline.call(msg.model_name) as trace:
            request = codec.decode_request(msg)
            trace.decoded()
            response = await pipeline.infer(request, None, trace)
            trace.encoding()
            reply = codec.encode_response(response)
        return reply.SerializeToString()

    for _ in range(2000):  # warm up, and let the variant move to the event loop
        await one()
    started = time.process_time()
    for _ in range(calls):
        await one()
    path = (time.process_time() - started) / calls
    backend = gateway.repository.models["mlp"].variants["1"].backend
    assert backend is not None
    x = {"input": np.ones((1, 64), np.float32)}
    started = time.process_time()
    for _ in range(calls):
        backend.infer(x, None)
    compute = (time.process_time() - started) / calls
    await gateway.repository.close()
    return {"path_us": round(path * 1e6, 1), "compute_us": round(compute * 1e6, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "models"
        (repo / "mlp" / "1").mkdir(parents=True)
        shutil.copy(PEERS_HOME / "models" / "mlp.onnx", repo / "mlp" / "1" / "model.onnx")
        result = asyncio.run(measure(repo, args.calls))
    out = ROOT / "loadtest" / "results" / f"pipeline-cost-{time.strftime('%Y%m%d-%H%M%S')}.json"
    record = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "load_average": os.getloadavg(),
        **result,
    }
    out.write_text(json.dumps(record, indent=1))
    print(json.dumps(record))


if __name__ == "__main__":
    main()
