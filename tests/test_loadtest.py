"""loadtest/: the JSON requests are current, parse into ModelInferRequest with protobuf's
own JSON mapping, and a real gateway accepts them; ghz configs and h2load bodies send
exactly those requests."""

from __future__ import annotations

import importlib.util
import json
import struct
import sys
from pathlib import Path
from types import ModuleType

import grpc
import numpy as np
import pytest
from google.protobuf import json_format

from tensorgate import codec
from tensorgate.protos import grpc_service_pb2 as pb
from tensorgate.protos import grpc_service_pb2_grpc as pb_grpc

from .serverproc import ServerProcess

# Talks gRPC: runs against both front ends (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("front_end")

LOADTEST = Path(__file__).resolve().parents[1] / "loadtest"
REQUEST_FILES = sorted((LOADTEST / "data").glob("*.json"))
#: Benchmark models the test server does not have; the scorer takes the same tensors.
STAND_INS = {"mlp": "scorer", "wide": "scorer"}


def _load_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_requests", LOADTEST / "make_requests.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_requests"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def make_requests() -> ModuleType:
    return _load_module()


def test_request_files_match_their_generator(make_requests: ModuleType) -> None:
    expected = make_requests.expected_files()
    assert {p for p in expected if p.parent.name == "data"} == set(REQUEST_FILES)
    for path, text in expected.items():
        assert path.read_text() == text, f"{path} is stale: run loadtest/make_requests.py"


@pytest.mark.parametrize("path", REQUEST_FILES, ids=lambda p: p.stem)
def test_request_file_is_served(path: Path, server: ServerProcess) -> None:
    msg = json_format.Parse(path.read_text(), pb.ModelInferRequest())
    assert msg.inputs, path
    msg.model_name = STAND_INS.get(msg.model_name, msg.model_name)
    with grpc.insecure_channel(server.address) as channel:
        reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(msg, timeout=30)
    outputs = codec.decode_response(reply)
    assert outputs and all(a.size for a in outputs.values())
    if msg.model_name == "strings":
        assert list(outputs["upper"]) == [b"HELLO", "TENSORGATE \u2713".encode()]


def test_typed_and_raw_requests_carry_the_same_tensor() -> None:
    raw = json_format.Parse((LOADTEST / "data/scorer.json").read_text(), pb.ModelInferRequest())
    typed = json_format.Parse(
        (LOADTEST / "data/scorer_typed.json").read_text(), pb.ModelInferRequest()
    )
    a = codec.decode_request(raw).inputs[0].data
    b = codec.decode_request(typed).inputs[0].data
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_ghz_configs_send_the_request_files() -> None:
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    known = {"call", "host", "insecure", "concurrency", "connections", "duration", "timeout",
             "data-file", "total", "proto", "import-paths", "duration-stop"}  # fmt: skip
    configs = sorted((LOADTEST / "ghz").glob("*.json"))
    assert len(configs) >= len(REQUEST_FILES)
    for path in configs:
        config = json.loads(path.read_text())
        assert set(config) <= known, path
        package_service, _, method = config["call"].rpartition(".")
        assert package_service == service.full_name and method in service.methods_by_name
        assert (LOADTEST.parent / config["data-file"]).is_file(), path


def test_h2load_body_is_one_grpc_message(make_requests: ModuleType) -> None:
    msg = make_requests.load_request(LOADTEST / "data/scorer.json")
    body = make_requests.grpc_frame(msg.SerializeToString())
    flag, length = struct.unpack(">BI", body[:5])
    assert flag == 0 and length == len(body) - 5
    assert pb.ModelInferRequest.FromString(body[5:]) == msg
