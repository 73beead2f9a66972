"""Server reflection resolves every symbol a reflection client asks for, method symbols
(``package.Service.Method``) included: grpc_reflection's own client
(ProtoReflectionDescriptorDatabase) and grpcurl, against the real gateway."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from .serverproc import ServerProcess

# Talks gRPC: runs against both front ends (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("front_end")

GRPCURL = Path(sys.executable).parent / "grpcurl"


def every_method(address: str) -> list[tuple[str, str]]:
    """(service, method) for every method of every service the server lists."""
    with grpc.insecure_channel(address) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        pool = DescriptorPool(db)
        return [
            (service, method.name)
            for service in db.get_services()
            for method in pool.FindServiceByName(service).methods
        ]


def test_every_service_is_listed(server: ServerProcess) -> None:
    services = {s for s, _ in every_method(server.address)}
    assert services == {
        "inference.GRPCInferenceService",
        "tensorgate.admin.v1.RoutingAdmin",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }


def test_reflection_client_finds_the_file_of_every_method(server: ServerProcess) -> None:
    methods = every_method(server.address)
    assert ("inference.GRPCInferenceService", "ModelInfer") in methods
    with grpc.insecure_channel(server.address) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        for service, method in methods:
            symbol = f"{service}.{method}"
            # A fresh pool per symbol: the method must be found by its own name, not
            # because its service's file is already in the pool.
            found = DescriptorPool(ProtoReflectionDescriptorDatabase(channel)).FindMethodByName(
                symbol
            )
            assert found.full_name == symbol
            proto = db.FindFileContainingSymbol(symbol)
            assert isinstance(proto, descriptor_pb2.FileDescriptorProto)
            declared = {
                (f"{proto.package}.{s.name}", m.name) for s in proto.service for m in s.method
            }
            assert (service, method) in declared, symbol


@pytest.mark.parametrize("package", ["grpc.reflection.v1alpha", "grpc.reflection.v1"])
def test_method_symbol_answer_echoes_the_request(server: ServerProcess, package: str) -> None:
    symbol = "inference.GRPCInferenceService.ModelInfer"
    with grpc.insecure_channel(server.address) as channel:
        call = channel.stream_stream(
            f"/{package}.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        requests = [
            reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.NoSuchThing"),
            reflection_pb2.ServerReflectionRequest(
                file_containing_symbol="inference.GRPCInferenceService.NoSuchMethod"
            ),
        ]
        method, unknown, unknown_method = list(call(iter(requests), timeout=10))
    assert method.original_request.file_containing_symbol == symbol
    assert method.file_descriptor_response.file_descriptor_proto
    for answer, request in ((unknown, requests[1]), (unknown_method, requests[2])):
        assert answer.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
        assert answer.original_request == request


def grpcurl(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    assert GRPCURL.exists(), (
        f"no grpcurl at {GRPCURL}; install the test extras: pip install -e '.[dev]'"
    )
    return subprocess.run(
        [str(GRPCURL), "-plaintext", address, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("symbol", "signature"),
    [
        (
            "inference.GRPCInferenceService.ModelInfer",
            "rpc ModelInfer ( .inference.ModelInferRequest ) returns "
            "( .inference.ModelInferResponse );",
        ),
        (
            "inference.GRPCInferenceService.ModelStreamInfer",
            "rpc ModelStreamInfer ( stream .inference.ModelInferRequest ) returns "
            "( stream .inference.ModelStreamInferResponse );",
        ),
        (
            "grpc.health.v1.Health.Check",
            "rpc Check ( .grpc.health.v1.HealthCheckRequest ) returns "
            "( .grpc.health.v1.HealthCheckResponse );",
        ),
        (
            "tensorgate.admin.v1.RoutingAdmin.SetRoute",
            "rpc SetRoute ( .tensorgate.admin.v1.SetRouteRequest ) returns "
            "( .tensorgate.admin.v1.SetRouteResponse );",
        ),
    ],
)
def test_grpcurl_describes_a_method(server: ServerProcess, symbol: str, signature: str) -> None:
    result = grpcurl(server.address, "describe", symbol)
    assert result.returncode == 0, result.stderr
    assert f"{symbol} is a method:" in result.stdout
    assert signature in result.stdout


def test_grpcurl_still_says_symbol_not_found(server: ServerProcess) -> None:
    result = grpcurl(server.address, "describe", "inference.GRPCInferenceService.Nope")
    assert result.returncode != 0
    assert "Symbol not found" in result.stderr
