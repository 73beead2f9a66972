"""The real gateway process through its real gRPC interface: the project's client, raw
stubs for hand-made requests, grpc health and reflection, and a /metrics scrape."""

from __future__ import annotations

import asyncio
import queue
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from prometheus_client.parser import text_string_to_metric_families

from tensorgate.clients import Client, InferenceError
from tensorgate.codec import decode_response, encode_request, serialize_bytes
from tensorgate.protos import grpc_service_pb2 as pb
from tensorgate.protos import grpc_service_pb2_grpc as pb_grpc
from tensorgate.server.demo import mlp_reference, mlp_weights

from .modelfactory import IDENTITY_DATATYPES

# Talks gRPC: runs against both front ends (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("front_end")

SCORER_VARIANTS = ("torch", "tf", "onnx", "pt2")
STRING_VARIANTS = ("torch", "tf", "onnx")  # the "strings" model's
RNG = np.random.default_rng(42)


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def x64(n: int = 3) -> np.ndarray:
    return RNG.standard_normal((n, 64)).astype(np.float32)


def raw_request(model: str, version: str = "", **tensors: tuple[str, list[int], bytes]):
    req = pb.ModelInferRequest(model_name=model, model_version=version)
    for name, (datatype, shape, raw) in tensors.items():
        req.inputs.add(name=name, datatype=datatype, shape=shape)
        req.raw_input_contents.append(raw)
    return req


def expect_error(stub, req, code: grpc.StatusCode, *fragments: str) -> str:
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(req, timeout=30)
    assert info.value.code() == code, info.value.details()
    for fragment in fragments:
        assert fragment in info.value.details(), info.value.details()
    return info.value.details()


# -- inference ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant", SCORER_VARIANTS)
def test_every_scorer_variant_matches_the_reference(client: Client, variant: str) -> None:
    x = x64(5)
    result = client.infer("scorer", {"input": x}, version=variant, timeout=30)
    assert result.variant == variant
    assert result["output"].shape == (5, 10)
    np.testing.assert_allclose(result["output"], mlp_reference(x, mlp_weights()), atol=1e-5)


def test_unpinned_request_goes_to_the_default_variant(client: Client) -> None:
    # scorer/config.toml says default_variant = "torch"; detector's newest version is "1".
    assert client.infer("scorer", {"input": x64(1)}).variant == "torch"
    assert client.infer("detector", {"image": np.zeros((1, 3, 32, 32), np.float32)}).variant == "1"


def test_reply_echoes_id_and_names_the_variant(stub) -> None:
    req = raw_request("scorer", "onnx", input=("FP32", [1, 64], x64(1).tobytes()))
    req.id = "req-17"
    reply, call = stub.ModelInfer.with_call(req, timeout=30)
    assert reply.id == "req-17"
    assert reply.model_name == "scorer" and reply.model_version == "onnx"
    assert ("tensorgate-variant", "onnx") in tuple(call.trailing_metadata())
    assert len(reply.raw_output_contents) == 1 and not reply.outputs[0].HasField("contents")


def test_requested_outputs_are_filtered(client: Client) -> None:
    a = np.array([1, 2, 3], np.float32)
    b = np.array([4, 5, 6], np.float32)
    both = client.infer("pair", {"a": a, "b": b})
    np.testing.assert_array_equal(both["sum"], a + b)
    np.testing.assert_array_equal(both["product"], a * b)
    only = client.infer("pair", {"a": a, "b": b}, outputs=["product"])
    assert list(only) == ["product"]


def test_torchscript_binds_inputs_by_position_with_config_names(client: Client) -> None:
    a = np.array([2.0], np.float32)
    b = np.array([10.0], np.float32)
    result = client.infer("pair", {"b": b, "a": a})  # order in the request does not matter
    assert result["sum"][0] == 12.0 and result["product"][0] == 20.0


@pytest.mark.parametrize("variant", STRING_VARIANTS)
def test_bytes_tensors_reach_each_framework_as_strings(client: Client, variant: str) -> None:
    # ASCII only: the frameworks upper-case non-ASCII letters differently (TorchScript not
    # at all); non-ASCII BYTES round trips are covered by the identity model.
    texts = np.array([b"hello", b"MiXed 123", b""], dtype=object)
    result = client.infer("strings", {"text": texts}, version=variant)
    out = result["upper"]
    assert out.dtype == object and out.shape == (3,)
    assert [bytes(v).decode() for v in out] == ["HELLO", "MIXED 123", ""]


def _identity_value(dt: str, n: int = 4) -> np.ndarray:
    from tensorgate.datatypes import by_name

    np_dtype = by_name(dt).numpy
    if dt == "BYTES":
        return np.array([b"a", b"", b"\x00z", "\u00e9\u4e2d".encode()], dtype=object)
    if dt == "BOOL":
        return np.array([True, False, True, True])
    return (np.arange(n) * 3 + 1).astype(np_dtype)


def _identity_inputs(fp32: np.ndarray) -> dict[str, np.ndarray]:
    """The identity model's inputs: ``fp32`` as ``in_FP32``, a small value for the rest."""
    inputs = {f"in_{dt}": _identity_value(dt) for dt in IDENTITY_DATATYPES}
    inputs["in_FP32"] = fp32
    return inputs


def test_every_datatype_round_trips_in_raw_contents(client: Client) -> None:
    inputs = {f"in_{dt}": _identity_value(dt) for dt in IDENTITY_DATATYPES}
    result = client.infer("identity", inputs)
    for dt in IDENTITY_DATATYPES:
        got, want = result[f"out_{dt}"], inputs[f"in_{dt}"]
        assert got.dtype == want.dtype, dt
        np.testing.assert_array_equal(got, want)


def test_large_replies_share_a_connection_with_small_calls(client: Client) -> None:
    # Megabyte replies go out as many DATA frames (the native front end writes a pass's
    # frames together and puts off its flush); concurrent calls on one channel, large and
    # small, each get their own bytes back, and none waits on another's flush.
    rng = np.random.default_rng(7)
    sizes = [(3 << 20) // 4 + 5, 1, 257, (1 << 20) // 4, 4096 + 3, 20_000]
    arrays = [rng.random(n, dtype=np.float32) for n in sizes for _ in range(4)]

    def round_trip(x: np.ndarray) -> bool:
        got = client.infer("identity", _identity_inputs(x), timeout=60)["out_FP32"]
        return got.dtype == np.float32 and np.array_equal(got, x)

    with ThreadPoolExecutor(len(arrays)) as pool:
        results = list(pool.map(round_trip, arrays))
    assert all(results), [x.size for x, ok in zip(arrays, results, strict=True) if not ok]


def test_a_large_stream_reply_arrives_before_the_next_request(server) -> None:
    # A stream's reply has no trailers behind it: nothing but the reply itself may bring
    # its last DATA frames out. Each request is sent only once the previous reply arrived.
    rng = np.random.default_rng(11)
    arrays = [rng.random(n, dtype=np.float32) for n in ((1 << 20) // 4, 9, (2 << 20) // 4 + 1)]
    requests: queue.Queue = queue.Queue()
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        replies = stub.ModelStreamInfer(iter(requests.get, None), timeout=60)
        for i, x in enumerate(arrays):
            requests.put(encode_request("identity", _identity_inputs(x), request_id=str(i)))
            reply = next(replies)
            assert reply.error_message == "" and reply.infer_response.id == str(i)
            np.testing.assert_array_equal(decode_response(reply.infer_response)["out_FP32"], x)
        requests.put(None)
        assert list(replies) == []


def test_bf16_round_trips(client: Client) -> None:
    import ml_dtypes

    x = np.array([1.5, -2.0, 0.0, 3.25], dtype=ml_dtypes.bfloat16)
    result = client.infer("bf16", {"in_BF16": x, "in_FP32": x.astype(np.float32)})
    assert result["out_BF16"].dtype == x.dtype
    np.testing.assert_array_equal(result["out_BF16"], x)


_TYPED_FIELD = {
    "BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
    "UINT32": "uint_contents", "UINT64": "uint64_contents", "INT8": "int_contents",
    "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}  # fmt: skip


def test_every_datatype_round_trips_in_typed_contents(stub) -> None:
    req = pb.ModelInferRequest(model_name="identity")
    values = {}
    for dt in IDENTITY_DATATYPES:
        if dt == "FP16":  # no typed field for FP16 in the protocol: raw only
            continue
        v = _identity_value(dt)
        values[dt] = v
        t = req.inputs.add(name=f"in_{dt}", datatype=dt, shape=[len(v)])
        getattr(t.contents, _TYPED_FIELD[dt]).extend(v.tolist())
        req.outputs.add(name=f"out_{dt}")
    req.inputs.add(name="in_FP16", datatype="FP16", shape=[1])
    # FP16 cannot be typed; the request must be refused and name the problem.
    expect_error(stub, req, grpc.StatusCode.INVALID_ARGUMENT, "in_FP16", "raw_input_contents")
    del req.inputs[-1]
    # ...and without FP16 the server says the model input is missing:
    expect_error(stub, req, grpc.StatusCode.INVALID_ARGUMENT, "missing input", "in_FP16")


def test_typed_contents_decode_to_the_same_values(client: Client, stub) -> None:
    x = x64(2)
    req = pb.ModelInferRequest(model_name="scorer", model_version="onnx")
    req.inputs.add(name="input", datatype="FP32", shape=[2, 64]).contents.fp32_contents.extend(
        x.reshape(-1).tolist()
    )
    reply = stub.ModelInfer(req, timeout=30)
    out = np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(2, 10)
    np.testing.assert_allclose(out, mlp_reference(x, mlp_weights()), atol=1e-5)


def test_async_face_of_the_client(server) -> None:
    async def main() -> list[str]:
        client = Client(server.address)
        try:
            calls = [
                client.aio.infer("scorer", {"input": x64(1)}, version=v) for v in SCORER_VARIANTS
            ]
            results = await asyncio.gather(*calls)
            assert await client.aio.is_ready()
            return [r.variant for r in results]
        finally:
            await client.aio.close()
            client.close()

    assert asyncio.run(main()) == list(SCORER_VARIANTS)


# -- bad input ---------------------------------------------------------------------------


def test_unknown_model_is_not_found_worded_as_triton(stub) -> None:
    req = raw_request("nosuch", input=("FP32", [1, 64], x64(1).tobytes()))
    expect_error(stub, req, grpc.StatusCode.NOT_FOUND, "Request for unknown model: 'nosuch'")


def test_unknown_version_is_not_found(stub) -> None:
    req = raw_request("scorer", "jax", input=("FP32", [1, 64], x64(1).tobytes()))
    expect_error(stub, req, grpc.StatusCode.NOT_FOUND, "'scorer' version jax is not found")


@pytest.mark.parametrize(
    ("tensors", "fragments"),
    [
        ({"input": ("FP64", [1, 64], np.zeros((1, 64)).tobytes())}, ["datatype FP64", "FP32"]),
        ({"input": ("FP32", [1, 32], np.zeros((1, 32), np.float32).tobytes())}, ["shape [1, 32]"]),
        ({"input": ("FP32", [64], np.zeros(64, np.float32).tobytes())}, ["shape [64]"]),
        ({"input": ("FP32", [1, 64], b"\x00" * 100)}, ["100 bytes", "256"]),
        ({"input": ("FP32", [1, -64], b"")}, ["negative"]),
        ({"input": ("FP32", [1 << 20, 1 << 20], b"")}, ["elements", "limit"]),
        ({"input": ("FLOAT", [1, 64], b"")}, ["unknown datatype 'FLOAT'"]),
        (
            {"wrong": ("FP32", [1, 64], np.zeros((1, 64), np.float32).tobytes())},
            ["no input 'wrong'"],
        ),
        ({}, ["missing input", "input"]),
    ],
    ids=["datatype", "shape", "rank", "bytes", "negative", "huge", "unknown-dt", "name", "missing"],
)
def test_malformed_inputs_are_invalid_argument(stub, tensors, fragments) -> None:
    req = raw_request("scorer", "onnx", **tensors)
    expect_error(stub, req, grpc.StatusCode.INVALID_ARGUMENT, *fragments)


def test_raw_and_typed_contents_mixed_are_refused(stub) -> None:
    req = raw_request("scorer", "onnx", input=("FP32", [1, 64], x64(1).tobytes()))
    req.inputs[0].contents.fp32_contents.extend([0.0] * 64)
    expect_error(stub, req, grpc.StatusCode.INVALID_ARGUMENT, "typed contents and raw")


def test_raw_contents_count_must_match_inputs(stub) -> None:
    req = raw_request("pair", a=("FP32", [1], b"\x00" * 4), b=("FP32", [1], b"\x00" * 4))
    del req.raw_input_contents[-1]
    expect_error(stub, req, grpc.StatusCode.INVALID_ARGUMENT, "raw_input_contents has 1")


def test_typed_contents_with_wrong_count_or_field(stub) -> None:
    req = pb.ModelInferRequest(model_name="scorer", model_version="onnx")
    req.inputs.add(name="input", datatype="FP32", shape=[1, 64]).contents.fp32_contents.extend(
        [1.0]
    )
    expect_error(stub, req, grpc.StatusCode.INVALID_ARGUMENT, "holds 1 value", "needs 64")
    req = pb.ModelInferRequest(model_name="scorer", model_version="onnx")
    req.inputs.add(name="input", datatype="FP32", shape=[1, 64]).contents.int_contents.extend(
        [1] * 64
    )
    expect_error(stub, req, grpc.StatusCode.INVALID_ARGUMENT, "fp32_contents", "int_contents")


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"\x05\x00\x00\x00abc", "declares 5 bytes"),
        (serialize_bytes(np.array([b"a"], dtype=object)) + b"\x01\x00", "trailing byte"),
        (serialize_bytes(np.array([b"a", b"b", b"c"], dtype=object)), "at least"),
        (b"", "holds 0 element"),
    ],
)
def test_malformed_bytes_are_invalid_argument(stub, raw, fragment) -> None:
    req = raw_request("strings", "onnx", text=("BYTES", [2], raw))
    expect_error(stub, req, grpc.StatusCode.INVALID_ARGUMENT, "input 'text'", fragment)


def test_bytes_a_framework_cannot_take_are_invalid_argument(stub) -> None:
    # ONNX Runtime string tensors must be UTF-8: refused as the caller's error, not ours.
    req = raw_request("strings", "onnx", text=("BYTES", [1], b"\x02\x00\x00\x00\xff\xfe"))
    expect_error(stub, req, grpc.StatusCode.INVALID_ARGUMENT, "input 'text'", "UTF-8")


def test_unknown_requested_output(stub) -> None:
    req = raw_request("scorer", "onnx", input=("FP32", [1, 64], x64(1).tobytes()))
    req.outputs.add(name="logits")
    expect_error(stub, req, grpc.StatusCode.INVALID_ARGUMENT, "no output 'logits'")


def test_bad_requests_do_not_disturb_good_ones(client: Client, stub) -> None:
    bad = raw_request("scorer", "onnx", input=("FP32", [1, 64], b"\x00"))
    for _ in range(20):
        with pytest.raises(grpc.RpcError):
            stub.ModelInfer(bad, timeout=30)
    x = x64(1)
    result = client.infer("scorer", {"input": x}, version="onnx")
    np.testing.assert_allclose(result["output"], mlp_reference(x, mlp_weights()), atol=1e-5)


def test_client_raises_inference_error_with_code(client: Client) -> None:
    with pytest.raises(InferenceError) as info:
        client.infer("nosuch", {"input": x64(1)})
    assert info.value.code == grpc.StatusCode.NOT_FOUND


# -- models that fail to load ------------------------------------------------------------


def _index(client: Client) -> dict[tuple[str, str], dict]:
    return {(e["name"], e.get("version", "")): e for e in client.repository_index()}


def test_broken_model_is_reported_and_others_serve(client: Client, stub) -> None:
    index = _index(client)
    broken = index[("broken", "1")]
    assert broken["state"] == "UNAVAILABLE"
    assert "failed to load" in broken["reason"]
    assert not client.is_model_ready("broken")
    req = raw_request("broken", input=("FP32", [1], b"\x00" * 4))
    expect_error(stub, req, grpc.StatusCode.UNAVAILABLE, "broken")
    assert client.is_model_ready("scorer")


def test_a_broken_version_leaves_the_good_one_serving(client: Client) -> None:
    index = _index(client)
    assert index[("partial", "1")]["state"] == "READY"
    assert index[("partial", "2")]["state"] == "UNAVAILABLE"
    assert client.is_model_ready("partial")
    assert client.is_model_ready("partial", "1") and not client.is_model_ready("partial", "2")
    # The newest version is broken, so an unpinned request goes to the newest ready one.
    assert client.infer("partial", {"input": x64(1)}).variant == "1"


def test_signature_mismatch_is_refused_naming_the_variants(client: Client) -> None:
    index = _index(client)
    reason = index[("mismatch", "a")]["reason"]
    assert index[("mismatch", "a")]["state"] == "UNAVAILABLE"
    assert "mismatch" in reason and "'a'" in reason and "'b'" in reason
    assert not client.is_model_ready("mismatch")


def test_config_error_names_file_and_field(client: Client) -> None:
    entries = [e for e in client.repository_index() if e["name"] == "badconfig"]
    assert entries and all(e["state"] == "UNAVAILABLE" for e in entries)
    reason = entries[0]["reason"]
    assert "config.toml" in reason and "max_batch_sise" in reason


# -- metadata, config, health, reflection, metrics --------------------------------------


def test_model_metadata(client: Client) -> None:
    meta = client.model_metadata("scorer")
    assert meta["name"] == "scorer"
    # Each variant, then the integer version the demo's config.toml gives it.
    assert meta["versions"] == ["onnx", "3", "pt2", "4", "tf", "2", "torch", "1"]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "64"]}]
    assert meta["outputs"] == [{"name": "output", "datatype": "FP32", "shape": ["-1", "10"]}]
    platforms = {v: client.model_metadata("scorer", v)["platform"] for v in SCORER_VARIANTS}
    assert platforms == {
        "torch": "pytorch_libtorch",
        "tf": "tensorflow_savedmodel",
        "onnx": "onnxruntime_onnx",
        "pt2": "pytorch_export",
    }
    assert client.model_metadata("detector")["platform"] == "onnxruntime_onnx"
    assert client.model_metadata("detector_lite")["platform"] == "tensorflow_lite"


def test_model_config_is_triton_shaped(client: Client) -> None:
    config = client.model_config("detector")
    assert config["name"] == "detector"
    assert config["platform"] == "onnxruntime_onnx"
    assert config.get("max_batch_size", 0) == 0
    assert config["input"][0]["name"] == "image"
    assert config["input"][0]["data_type"] == "TYPE_FP32"
    assert config["input"][0]["dims"] == ["-1", "3", "32", "32"]
    assert config["output"][0]["dims"] == ["-1", "4"]


def test_server_metadata_and_readiness(client: Client) -> None:
    meta = client.server_metadata()
    assert meta["name"] == "tensorgate" and "model_repository" in meta["extensions"]
    assert client.is_live() and client.is_ready()


def test_stream_infer_serves_many_requests_on_one_stream(stub) -> None:
    xs = [x64(1) for _ in range(20)]
    requests = []
    for i, x in enumerate(xs):
        req = raw_request("scorer", "onnx", input=("FP32", [1, 64], x.tobytes()))
        req.id = f"r{i}"
        requests.append(req)
    bad = raw_request("scorer", "onnx", input=("FP32", [1, 64], b"\x00"))
    bad.id = "bad"
    requests.insert(5, bad)
    replies = {r.infer_response.id: r for r in stub.ModelStreamInfer(iter(requests), timeout=60)}
    assert set(replies) == {f"r{i}" for i in range(20)} | {"bad"}
    # A bad request gets an error reply; the stream and the other requests go on.
    assert replies["bad"].error_message.startswith("INVALID_ARGUMENT")
    weights = mlp_weights()
    for i, x in enumerate(xs):
        reply = replies[f"r{i}"]
        assert not reply.error_message
        assert reply.infer_response.model_version == "onnx"
        out = np.frombuffer(reply.infer_response.raw_output_contents[0], np.float32)
        np.testing.assert_allclose(out.reshape(1, 10), mlp_reference(x, weights), atol=1e-5)


def _stats(stub, name: str, version: str = "") -> dict[str, pb.ModelStatistics]:
    reply = stub.ModelStatistics(pb.ModelStatisticsRequest(name=name, version=version), timeout=10)
    return {s.version: s for s in reply.model_stats}


def test_model_statistics_count_what_was_served(client: Client, stub) -> None:
    # Unpinned, the scorer's variants answer under the integers the demo gives them (Triton
    # tools parse versions as integers; named variants without one are summed under "0",
    # see test_versions.py); pinned, each variant answers under the version asked for.
    assert set(_stats(stub, "scorer")) == {"1", "2", "3", "4"}
    assert set(_stats(stub, "partial")) == {"1", "2"}
    before = {v: _stats(stub, "scorer", v)[v] for v in SCORER_VARIANTS}
    total_before = _stats(stub, "scorer")["3"].inference_stats.success.count
    for _ in range(4):
        client.infer("scorer", {"input": x64(2)}, version="onnx")
    with pytest.raises(InferenceError):
        client.infer("scorer", {"input": x64(1)[:, :8]}, version="onnx")
    after = _stats(stub, "scorer", "onnx")["onnx"]
    old = before["onnx"]
    stats, prev = after.inference_stats, old.inference_stats
    assert stats.success.count - prev.success.count == 4
    assert stats.fail.count - prev.fail.count == 1
    for part in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert getattr(stats, part).count - getattr(prev, part).count == 4, part
        assert getattr(stats, part).ns > getattr(prev, part).ns, part
    assert after.execution_count - old.execution_count == 4
    assert after.last_inference > 0
    assert sum(b.compute_infer.count for b in after.batch_stats) == after.execution_count
    assert _stats(stub, "scorer")["3"].inference_stats.success.count - total_before == 4
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelStatistics(pb.ModelStatisticsRequest(name="nosuch"), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_check_and_watch(server) -> None:
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService", "scorer"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
        assert (
            health.Check(health_pb2.HealthCheckRequest(service="broken"), timeout=10).status
            == health_pb2.HealthCheckResponse.NOT_SERVING
        )
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
        first = next(iter(watch))
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()


@pytest.mark.parametrize("package", ["grpc.reflection.v1alpha", "grpc.reflection.v1"])
def test_reflection_lists_and_describes_the_service(server, package: str) -> None:
    with grpc.insecure_channel(server.address) as channel:
        method = f"/{package}.ServerReflection/ServerReflectionInfo"
        call = channel.stream_stream(
            method,
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(
                file_containing_symbol="inference.GRPCInferenceService"
            ),
        ]
        listed, described = list(call(iter(requests), timeout=10))
    names = {s.name for s in listed.list_services_response.service}
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names
    files = described.file_descriptor_response.file_descriptor_proto
    assert files, described


def test_reflection_client_resolves_model_infer(server) -> None:
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with grpc.insecure_channel(server.address) as channel:
        pool = DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        service = pool.FindServiceByName("inference.GRPCInferenceService")
        method = service.methods_by_name["ModelInfer"]
        assert method.input_type.full_name == "inference.ModelInferRequest"
        assert method.input_type.fields_by_name["raw_input_contents"].number == 7


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_count_requests_per_backend(server, client: Client) -> None:
    before = _samples(server.scrape())
    for v in SCORER_VARIANTS:
        for _ in range(3):
            client.infer("scorer", {"input": x64(1)}, version=v)
    after = _samples(server.scrape())
    for v, backend in zip(
        SCORER_VARIANTS,
        ("torchscript", "tf_savedmodel", "onnxruntime", "torch_export"),
        strict=True,
    ):
        labels = (("backend", backend), ("model", "scorer"), ("variant", v))
        key = ("tensorgate_request_duration_seconds_count", labels)
        assert after[key] - before.get(key, 0) == 3
        ok = ("tensorgate_requests_total", tuple(sorted((*labels, ("code", "OK")))))
        assert after[ok] - before.get(ok, 0) == 3
    ready = (
        "tensorgate_model_ready",
        (("backend", "onnxruntime"), ("model", "scorer"), ("variant", "onnx")),
    )
    assert after[ready] == 1


def test_a_large_request_to_a_small_model_does_not_hold_the_event_loop(server, client) -> None:
    # The demo MLP in ONNX Runtime computes a row in microseconds, so its small requests
    # run on the event loop; a 100k-row request costs ~0.4 s and must not: ServerLive and
    # ModelReady (answered on the loop) keep answering while it computes.
    for _ in range(40):
        client.infer("scorer", {"input": x64(1)}, version="onnx")
    big = np.random.default_rng(0).random((100_000, 64), dtype=np.float32)
    done = threading.Event()
    result: list[np.ndarray] = []

    def send_big() -> None:
        try:
            result.append(
                client.infer("scorer", {"input": big}, version="onnx", timeout=120)["output"]
            )
        finally:
            done.set()

    sender = threading.Thread(target=send_big)
    sender.start()
    answered_while_computing = 0
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while not done.is_set():
            assert stub.ServerLive(pb.ServerLiveRequest(), timeout=30).live
            assert stub.ModelReady(pb.ModelReadyRequest(name="scorer"), timeout=30).ready
            answered_while_computing += not done.is_set()
    sender.join()
    assert result and result[0].shape == (100_000, 10)
    assert answered_while_computing >= 20, answered_while_computing
