"""Request data for load tools: the JSON form of ``ModelInferRequest`` for the demo and
benchmark models (``loadtest/data/``), ghz configs that send them (``loadtest/ghz/``), and
pre-framed gRPC bodies for h2load.

    .venv/bin/python loadtest/make_requests.py            # rewrite data/ and ghz/
    .venv/bin/python loadtest/make_requests.py --check    # exit 1 if they are out of date
    .venv/bin/python loadtest/make_requests.py --body data/scorer.json OUT.bin [--model M]
    .venv/bin/python loadtest/make_requests.py --ghz-body data/scorer.json OUT.bin \
        [--model M] [--version onnx,torch]    # ghz -B OUT.bin: one message per version
    .venv/bin/python loadtest/make_requests.py --perf-analyzer data/scorer.json OUT.json

The JSON is protobuf's canonical JSON mapping (``google.protobuf.json_format``, which ghz
and grpcurl read too): ``raw_input_contents`` and BYTES ``bytes_contents`` are base64.
Values come from a seeded generator, so the files are reproducible.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from google.protobuf import json_format

from tensorgate import codec
from tensorgate.protos import grpc_service_pb2 as pb

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
GHZ = HERE / "ghz"
METHOD = "inference.GRPCInferenceService/ModelInfer"
STREAM_METHOD = "inference.GRPCInferenceService/ModelStreamInfer"


def _raw(model: str, name: str, shape: tuple[int, ...], seed: int) -> pb.ModelInferRequest:
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return codec.encode_request(model, {name: x})


def _typed_fp32(model: str, name: str, shape: tuple[int, ...], seed: int) -> pb.ModelInferRequest:
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    msg = pb.ModelInferRequest(model_name=model)
    t = msg.inputs.add(name=name, datatype="FP32", shape=shape)
    t.contents.fp32_contents.extend(round(float(v), 6) for v in x.reshape(-1))
    return msg


def _strings() -> pb.ModelInferRequest:
    msg = pb.ModelInferRequest(model_name="strings")
    t = msg.inputs.add(name="text", datatype="BYTES", shape=[2])
    t.contents.bytes_contents.extend([b"hello", "tensorgate \u2713".encode()])
    return msg


#: file stem -> (request, what it is for). Models: the demo's ``scorer`` and ``detector``;
#: ``mlp`` is the benchmarks' name for the peers' MLP (the scorer's architecture) and
#: ``wide`` the compute-bound benchmark model; ``strings`` is any model with one BYTES
#: input ``text`` (the test suite serves one).
REQUESTS: dict[str, tuple[pb.ModelInferRequest, str]] = {
    "scorer": (_raw("scorer", "input", (1, 64), 0), "demo scorer, FP32 [1,64], raw bytes"),
    "scorer_typed": (
        _typed_fp32("scorer", "input", (1, 64), 0),
        "demo scorer, the same values as typed fp32_contents",
    ),
    "detector": (
        _raw("detector", "image", (1, 3, 32, 32), 1),
        "demo detector, FP32 [1,3,32,32], raw bytes",
    ),
    "mlp": (_raw("mlp", "input", (1, 64), 0), "benchmark model mlp (peers' MLP), FP32 [1,64]"),
    "wide": (_raw("wide", "input", (1, 64), 0), "compute-bound benchmark model, FP32 [1,64]"),
    "strings": (_strings(), "a BYTES input 'text' [2], typed bytes_contents (base64)"),
}


def request_json(msg: pb.ModelInferRequest) -> str:
    return json_format.MessageToJson(msg, preserving_proto_field_name=True, indent=1) + "\n"


def ghz_config(stem: str, stream: bool = False) -> str:
    """ghz reads ``data-file`` relative to where it runs: the repository root. No proto
    file is named, so ghz asks the server's reflection service for the schema.
    ``duration-stop: wait`` lets the calls in flight when the duration ends finish: ghz's
    default (``close``) closes the connections under them and reports them as
    Unavailable/Canceled ("transport is closing"), errors that are not the server's."""
    config = {
        "call": (STREAM_METHOD if stream else METHOD).replace("/", "."),
        "host": "127.0.0.1:8001",
        "insecure": True,
        "concurrency": 32,
        "connections": 4,
        "duration": "30s",
        "duration-stop": "wait",
        "timeout": "10s",
        "data-file": f"loadtest/data/{stem}.json",
    }
    return json.dumps(config, indent=1) + "\n"


def expected_files() -> dict[Path, str]:
    files: dict[Path, str] = {}
    for stem, (msg, _) in REQUESTS.items():
        files[DATA / f"{stem}.json"] = request_json(msg)
        files[GHZ / f"{stem}.json"] = ghz_config(stem)
    files[GHZ / "scorer_stream.json"] = ghz_config("scorer", stream=True)
    return files


def grpc_frame(message: bytes) -> bytes:
    """One gRPC length-prefixed message: a 0 byte (not compressed), the length as 4 bytes
    big-endian, the message. A unary request's whole HTTP/2 body (what ``h2load -d`` sends)."""
    return struct.pack(">BI", 0, len(message)) + message


def varint(n: int) -> bytes:
    """``n`` as a protobuf base-128 varint."""
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def delimited(messages: Iterable[bytes]) -> bytes:
    """Messages each preceded by its length as a varint: the binary form ghz reads with
    ``-B``/``--binary-file`` (several messages are sent in turn, one per call)."""
    return b"".join(varint(len(m)) + m for m in messages)


def load_request(path: Path) -> pb.ModelInferRequest:
    return json_format.Parse(path.read_text(), pb.ModelInferRequest())


def perf_analyzer_data(msg: pb.ModelInferRequest) -> str:
    """perf_analyzer's ``--input-data`` JSON for the same tensors: one entry per input
    with its ``content`` (flat values) and ``shape``."""
    tensors = codec.decode_request(msg).inputs
    entry = {}
    for t in tensors:
        values = t.data.reshape(-1)
        content = (
            [v.decode("utf-8", "replace") for v in values] if t.datatype == "BYTES"
            else values.tolist()
        )  # fmt: skip
        entry[t.name] = {"content": content, "shape": list(t.shape)}
    return json.dumps({"data": [entry]}) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only compare with the files")
    parser.add_argument(
        "--body", nargs=2, metavar=("REQUEST_JSON", "OUT"), help="write an h2load body"
    )
    parser.add_argument(
        "--ghz-body", nargs=2, metavar=("REQUEST_JSON", "OUT"),
        help="write a binary body for ghz -B (length-delimited messages)",
    )  # fmt: skip
    parser.add_argument(
        "--perf-analyzer", nargs=2, metavar=("REQUEST_JSON", "OUT"),
        help="write perf_analyzer --input-data for the same tensors",
    )  # fmt: skip
    parser.add_argument("--model", help="with --body/--ghz-body: replace the model name")
    parser.add_argument(
        "--version",
        help="with --body: set model_version (pin a variant); with --ghz-body: one message "
        "per comma-separated version, which ghz sends in turn",
    )
    args = parser.parse_args()
    if args.perf_analyzer:
        msg = load_request(Path(args.perf_analyzer[0]))
        Path(args.perf_analyzer[1]).write_text(perf_analyzer_data(msg))
        return 0
    if args.body:
        msg = load_request(Path(args.body[0]))
        if args.model:
            msg.model_name = args.model
        if args.version is not None:
            msg.model_version = args.version
        Path(args.body[1]).write_bytes(grpc_frame(msg.SerializeToString()))
        return 0
    if args.ghz_body:
        msg = load_request(Path(args.ghz_body[0]))
        if args.model:
            msg.model_name = args.model
        messages = []
        for version in (args.version or msg.model_version).split(","):
            msg.model_version = version
            messages.append(msg.SerializeToString())
        Path(args.ghz_body[1]).write_bytes(delimited(messages))
        return 0
    stale = []
    for path, text in expected_files().items():
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print("out of date (run loadtest/make_requests.py):", *stale, sep="\n  ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
