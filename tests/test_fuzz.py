"""Property-based: malformed ModelInferRequests thrown at the real server (the session
``server`` fixture) only ever get well-formed gRPC errors from an allowed set, and the server
keeps serving good requests afterwards.

Requests are drawn two ways: from scratch (any model name, datatype string, shape, byte
payload, raw or typed contents, BYTES length prefixes, duplicate names, parameters), and by
breaking one thing in a valid request, so that both the wire checks and the checks against
each model's signature are reached.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tensorgate.codec import encode_request, serialize_bytes
from tensorgate.protos import grpc_service_pb2 as pb
from tensorgate.protos import grpc_service_pb2_grpc as pb_grpc
from tensorgate.server.demo import mlp_reference, mlp_weights

from .serverproc import ServerProcess

# Talks gRPC: runs against both front ends (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("front_end")

ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
# Models of the session repository (tests/conftest.py), a few that fail to load, and none.
MODELS = ["scorer", "detector", "identity", "strings", "pair", "bf16", "partial", "broken"]
MODEL_NAMES = st.sampled_from([*MODELS, "nonexistent", "", "../scorer", "scorer\x00"])
VERSIONS = st.sampled_from(["", "1", "2", "onnx", "torch", "tf", "nope", "-1"])
TENSOR_NAMES = st.sampled_from(
    ["input", "image", "text", "a", "b", "in_FP32", "in_BYTES", "in_INT8", "in_BOOL", "in_FP16",
     "in_UINT64", "in_BF16", "output", "", "x"]
)  # fmt: skip
DATATYPE_NAMES = st.sampled_from(
    ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16",
     "FP32", "FP64", "BF16", "BYTES", "", "fp32", "FP8", "STRING", "INT128", "FP32 ", "\x00"]
)  # fmt: skip
DIMS = st.one_of(
    st.integers(-2, 6),
    st.sampled_from([0, 64, 32, 3, 1 << 31, (1 << 31) + 1, 1 << 40, -(1 << 63), (1 << 63) - 1]),
)
SHAPES = st.lists(DIMS, max_size=5)
INT32 = st.integers(-(1 << 31), (1 << 31) - 1)
INT64 = st.integers(-(1 << 63), (1 << 63) - 1)
CONTENT_VALUES = {
    "bool_contents": st.lists(st.booleans(), max_size=70),
    "int_contents": st.lists(INT32, max_size=70),
    "int64_contents": st.lists(INT64, max_size=70),
    "uint_contents": st.lists(st.integers(0, (1 << 32) - 1), max_size=70),
    "uint64_contents": st.lists(st.integers(0, (1 << 64) - 1), max_size=70),
    "fp32_contents": st.lists(st.floats(width=32), max_size=70),
    "fp64_contents": st.lists(st.floats(), max_size=70),
    "bytes_contents": st.lists(st.binary(max_size=8), max_size=8),
}


@st.composite
def bytes_payload(draw: st.DrawFn) -> bytes:
    """BYTES elements whose 4-byte length prefixes may lie about what follows."""
    parts = []
    for _ in range(draw(st.integers(0, 5))):
        body = draw(st.binary(max_size=12))
        declared = draw(
            st.one_of(
                st.just(len(body)),
                st.integers(0, 40),
                st.sampled_from([0xFFFFFFFF, 1 << 31, len(body) + 1]),
            )
        )
        parts.append(struct.pack("<I", declared) + body)
    tail = draw(st.sampled_from([b"", b"\x01", b"\x05\x00", b"\xff\xff\xff"]))
    return b"".join(parts) + tail


RAW_PAYLOADS = st.one_of(
    st.binary(max_size=64),
    bytes_payload(),
    st.integers(0, 2100).map(lambda n: bytes(4 * n)),  # zeros of a plausible FP32 size
)


@st.composite
def params(draw: st.DrawFn, message: pb.ModelInferRequest) -> None:
    for key in draw(st.lists(st.text(max_size=6), max_size=3)):
        kind = draw(st.sampled_from(["bool", "int64", "string", "double"]))
        p = message.parameters[key]
        if kind == "bool":
            p.bool_param = draw(st.booleans())
        elif kind == "int64":
            p.int64_param = draw(INT64)
        elif kind == "string":
            p.string_param = draw(st.text(max_size=10))
        else:
            p.double_param = draw(st.floats())


@st.composite
def from_scratch(draw: st.DrawFn) -> pb.ModelInferRequest:
    msg = pb.ModelInferRequest(
        model_name=draw(MODEL_NAMES), model_version=draw(VERSIONS), id=draw(st.text(max_size=4))
    )
    mode = draw(st.sampled_from(["raw", "typed", "both", "raw count mismatch"]))
    n = draw(st.integers(0, 4))
    for _ in range(n):
        t = msg.inputs.add(name=draw(TENSOR_NAMES), datatype=draw(DATATYPE_NAMES))
        t.shape.extend(draw(SHAPES))
        if mode in ("typed", "both"):
            field = draw(st.sampled_from(sorted(CONTENT_VALUES)))
            getattr(t.contents, field).extend(draw(CONTENT_VALUES[field]))
        if mode in ("raw", "both"):
            msg.raw_input_contents.append(draw(RAW_PAYLOADS))
    if mode == "raw count mismatch":
        for _ in range(draw(st.integers(0, n + 2).filter(lambda k: k != n))):
            msg.raw_input_contents.append(draw(RAW_PAYLOADS))
    for name in draw(st.lists(TENSOR_NAMES, max_size=3)):
        msg.outputs.add(name=name)
    draw(params(msg))
    return msg


def _valid(model: str, rows: int) -> pb.ModelInferRequest:
    x = np.zeros((rows, 64), np.float32)
    if model == "detector":
        return encode_request(model, {"image": np.zeros((rows, 3, 32, 32), np.float32)})
    if model == "strings":
        return encode_request(model, {"text": np.array([b"ab"] * rows, dtype=object)})
    if model == "pair":
        v = np.arange(rows, dtype=np.float32)
        return encode_request(model, {"a": v, "b": v})
    if model == "identity":
        return encode_request(
            model, {"in_INT8": np.arange(rows, dtype=np.int8), "in_BYTES": np.array([b"z"] * rows)}
        )
    return encode_request(model, {"input": x})


@st.composite
def broken_valid(draw: st.DrawFn) -> pb.ModelInferRequest:
    """A valid request with one thing broken (or, sometimes, none)."""
    model = draw(st.sampled_from(["scorer", "detector", "strings", "pair", "identity"]))
    msg = _valid(model, draw(st.integers(0, 3)))
    msg.model_version = draw(st.sampled_from(["", "", "onnx", "torch", "tf", "1", "9"]))
    t = msg.inputs[draw(st.integers(0, len(msg.inputs) - 1))]
    i = list(msg.inputs).index(t)
    flaw = draw(
        st.sampled_from(
            ["none", "datatype", "shape", "dim", "raw bytes", "truncate", "duplicate", "typed",
             "drop input", "bytes prefix", "outputs", "parameters"]
        )
    )  # fmt: skip
    if flaw == "datatype":
        t.datatype = draw(DATATYPE_NAMES)
    elif flaw == "shape":
        del t.shape[:]
        t.shape.extend(draw(SHAPES))
    elif flaw == "dim" and t.shape:
        t.shape[draw(st.integers(0, len(t.shape) - 1))] = draw(DIMS)
    elif flaw == "raw bytes":
        msg.raw_input_contents[i] = draw(RAW_PAYLOADS)
    elif flaw == "truncate":
        raw = msg.raw_input_contents[i]
        msg.raw_input_contents[i] = raw[: draw(st.integers(0, max(0, len(raw) - 1)))]
    elif flaw == "duplicate":
        msg.inputs.add().CopyFrom(t)
        msg.raw_input_contents.append(msg.raw_input_contents[i])
    elif flaw == "typed":
        field = draw(st.sampled_from(sorted(CONTENT_VALUES)))
        getattr(t.contents, field).extend(draw(CONTENT_VALUES[field]))
    elif flaw == "drop input":
        del msg.raw_input_contents[i]
    elif flaw == "bytes prefix":
        msg.raw_input_contents[i] = serialize_bytes(np.array([b"ab"], dtype=object))[:-1] + draw(
            bytes_payload()
        )
    elif flaw == "outputs":
        for name in draw(st.lists(TENSOR_NAMES, min_size=1, max_size=3)):
            msg.outputs.add(name=name)
    elif flaw == "parameters":
        draw(params(msg))
    return msg


@pytest.fixture(scope="module")
def log_offset(server: ServerProcess) -> int:
    """Where the server log stood before this module's requests (other modules share it)."""
    return len(server.log())


@pytest.fixture(scope="module")
def stub(server: ServerProcess, log_offset: int) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def _empty_strings() -> pb.ModelInferRequest:
    # Found by this test: ONNX Runtime's StringNormalizer refuses an empty tensor, which
    # came back INTERNAL instead of INVALID_ARGUMENT.
    msg = pb.ModelInferRequest(model_name="strings", model_version="onnx")
    msg.inputs.add(name="text", datatype="BYTES", shape=[0])
    msg.raw_input_contents.append(b"")
    return msg


def _empty_but_huge() -> pb.ModelInferRequest:
    # Found by this test: zero elements, every dimension within the limit, but numpy cannot
    # build the shape: it escaped as ValueError (INTERNAL).
    msg = pb.ModelInferRequest(model_name="identity")
    t = msg.inputs.add(name="in_UINT16", datatype="UINT16", shape=[1 << 31, 0, 1 << 31, 1 << 31])
    t.contents.uint_contents.extend([])
    return msg


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(request=st.one_of(from_scratch(), broken_valid()))
@example(request=_empty_strings())
@example(request=_empty_but_huge())
def test_malformed_requests_get_well_formed_errors(stub, request: pb.ModelInferRequest) -> None:
    try:
        reply = stub.ModelInfer(request, timeout=30)
    except grpc.RpcError as e:
        code, details = e.code(), e.details()
        assert code in ALLOWED, f"{code.name}: {details}\nrequest: {request}"
        assert details, f"{code.name} without a message\nrequest: {request}"
        return
    assert reply.model_name == request.model_name
    assert len(reply.raw_output_contents) == len(reply.outputs)


def test_server_still_serves_after_the_fuzzing(server: ServerProcess, stub, log_offset) -> None:
    assert server.proc is not None and server.proc.poll() is None, server.log()
    x = np.random.default_rng(3).standard_normal((2, 64)).astype(np.float32)
    reply = stub.ModelInfer(encode_request("scorer", {"input": x}, "onnx"), timeout=30)
    out = np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(2, 10)
    np.testing.assert_allclose(out, mlp_reference(x, mlp_weights()), atol=1e-5)
    ours = server.log()[log_offset:]
    assert "Traceback" not in ours, ours[-4000:]
