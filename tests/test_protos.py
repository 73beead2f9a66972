"""Tests for the wire contract in protos/.

* The committed generated modules are exactly what ``protos/generate.py`` produces.
* Our ``inference`` descriptors agree with tritonclient's: every message, field and
  enum value we define exists there identically, and every RPC of its service exists
  in ours with the same request/response types and streaming flags.
* Messages cross between our classes and tritonclient's byte for byte, both ways.

tritonclient registers its own ``inference`` protos in the default descriptor pool,
which would clash with ours, so it is never imported here: it runs in a subprocess
under the interpreter named by ``TENSORGATE_TRITON_PYTHON`` (default
``<repo>/.venv-triton/bin/python``).
"""

from __future__ import annotations

import base64
import functools
import inspect
import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from google.protobuf.message import Message

from tensorgate.protos import (
    generate,
    grpc_service_pb2,
    grpc_service_pb2_grpc,
    model_config_pb2,
)

REPO = Path(__file__).resolve().parents[1]
PROTOS = REPO / "protos"
TRITON_VERSION = "2.73.0"
CREATE_TRITON_VENV = (
    "python -m venv .venv-triton && "
    f".venv-triton/bin/pip install 'tritonclient[grpc]=={TRITON_VERSION}'"
)

# Our proto files (by stem) and their generated modules. tritonclient's counterparts
# are tritonclient.grpc.service_pb2 and tritonclient.grpc.model_config_pb2.
OUR_MODULES: dict[str, Any] = {"grpc_service": grpc_service_pb2, "model_config": model_config_pb2}


# ---------------------------------------------------------------------------
# Generated code


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    assert generate.main(["--out", str(tmp_path)]) == 0
    stale = generate.differences(generate.existing(tmp_path), generate.existing(PROTOS))
    assert not stale, (
        "protos/ generated code does not match protos/*.proto:\n  "
        + "\n  ".join(stale)
        + "\nregenerate with: python protos/generate.py"
    )


def test_generation_is_deterministic() -> None:
    assert generate.render() == generate.render()


def test_generated_modules_load_from_the_package() -> None:
    assert model_config_pb2.__name__ == "tensorgate.protos.model_config_pb2"
    # A leftover absolute import would have loaded a second, top-level copy.
    assert "model_config_pb2" not in sys.modules
    assert "grpc_service_pb2" not in sys.modules
    assert (
        grpc_service_pb2.ModelConfigResponse.DESCRIPTOR.fields_by_name["config"].message_type
        is model_config_pb2.ModelConfig.DESCRIPTOR
    )


def test_every_rpc_has_a_stub_and_servicer_method() -> None:
    service = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for method in service.methods:
        assert hasattr(grpc_service_pb2_grpc.GRPCInferenceServiceServicer, method.name)
    assert callable(grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server)


def test_model_metadata_response_has_no_field_6() -> None:
    # docs: its meaning differs between Triton, MLServer and the OIP spec.
    numbers = [f.number for f in grpc_service_pb2.ModelMetadataResponse.DESCRIPTOR.fields]
    assert 6 not in numbers


# ---------------------------------------------------------------------------
# Running code under tritonclient's interpreter


def triton_python() -> Path:
    """The interpreter that has tritonclient; fails the calling test when it is missing."""
    configured = os.environ.get("TENSORGATE_TRITON_PYTHON")
    python = Path(configured) if configured else REPO / ".venv-triton" / "bin" / "python"
    if not python.exists():
        pytest.fail(
            f"no tritonclient interpreter at {python}; the wire-compatibility tests need "
            f"one. From the repository root run:\n    {CREATE_TRITON_VENV}\n"
            "or point TENSORGATE_TRITON_PYTHON at a Python that has "
            f"tritonclient[grpc]=={TRITON_VERSION}."
        )
    return python


def run_under_triton(script: str, payload: Any = None) -> Any:
    """Run ``script`` with tritonclient's interpreter; JSON ``payload`` in, JSON out."""
    python = triton_python()
    # -I: ignore PYTHONPATH and the working directory, so only that venv's packages load.
    proc = subprocess.run(
        [str(python), "-I", "-c", script],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(
            f"the tritonclient subprocess ({python}) failed with status {proc.returncode}:\n"
            f"{proc.stderr}\nIf tritonclient is missing there: {CREATE_TRITON_VENV}"
        )
    return json.loads(proc.stdout)


def describe_file(serialized: bytes) -> dict[str, Any]:
    """Flatten a serialized FileDescriptorProto into JSON-able data.

    Also runs under tritonclient's interpreter (its source is sent there), so it
    imports what it needs itself and reads only ``descriptor_pb2``, whose shape is
    the same in every protobuf release.
    """
    from google.protobuf import descriptor_pb2

    proto = descriptor_pb2.FileDescriptorProto.FromString(serialized)
    type_name = descriptor_pb2.FieldDescriptorProto.Type.Name
    label_name = descriptor_pb2.FieldDescriptorProto.Label.Name
    messages: dict[str, Any] = {}
    enums: dict[str, dict[str, int]] = {}

    def add_enum(enum: Any, scope: str) -> None:
        enums[f"{scope}.{enum.name}"] = {value.name: value.number for value in enum.value}

    def add_message(message: Any, scope: str) -> None:
        name = f"{scope}.{message.name}"
        oneofs = [oneof.name for oneof in message.oneof_decl]
        messages[name] = {
            "map_entry": message.options.map_entry,
            "fields": {
                field.name: {
                    "number": field.number,
                    "type": type_name(field.type),
                    "label": label_name(field.label),
                    "type_name": field.type_name,
                    "oneof": oneofs[field.oneof_index] if field.HasField("oneof_index") else None,
                    "proto3_optional": field.proto3_optional,
                }
                for field in message.field
            },
        }
        for enum in message.enum_type:
            add_enum(enum, name)
        for nested in message.nested_type:
            add_message(nested, name)

    for enum in proto.enum_type:
        add_enum(enum, proto.package)
    for message in proto.message_type:
        add_message(message, proto.package)
    services = {
        f"{proto.package}.{service.name}": {
            method.name: {
                "input_type": method.input_type,
                "output_type": method.output_type,
                "client_streaming": method.client_streaming,
                "server_streaming": method.server_streaming,
            }
            for method in service.method
        }
        for service in proto.service
    }
    return {
        "name": proto.name,
        "package": proto.package,
        "syntax": proto.syntax,
        "dependencies": list(proto.dependency),
        "messages": messages,
        "enums": enums,
        "services": services,
    }


_DESCRIBE_SCRIPT = f"""\
from __future__ import annotations
import json, sys
from typing import Any
from tritonclient.grpc import model_config_pb2, service_pb2

{inspect.getsource(describe_file)}

json.dump(
    {{
        "grpc_service": describe_file(service_pb2.DESCRIPTOR.serialized_pb),
        "model_config": describe_file(model_config_pb2.DESCRIPTOR.serialized_pb),
    }},
    sys.stdout,
)
"""


@functools.cache
def triton_descriptors() -> dict[str, Any]:
    return run_under_triton(_DESCRIBE_SCRIPT)  # type: ignore[no-any-return]


def our_descriptors(file: str) -> dict[str, Any]:
    return describe_file(OUR_MODULES[file].DESCRIPTOR.serialized_pb)


# ---------------------------------------------------------------------------
# Descriptor compatibility


@pytest.mark.parametrize("file", sorted(OUR_MODULES))
def test_file_identity_matches_tritonclient(file: str) -> None:
    ours, theirs = our_descriptors(file), triton_descriptors()[file]
    assert ours["package"] == theirs["package"] == "inference"
    assert ours["name"] == theirs["name"] == f"{file}.proto"
    assert ours["syntax"] == theirs["syntax"]
    assert ours["dependencies"] == theirs["dependencies"]


@pytest.mark.parametrize("file", sorted(OUR_MODULES))
def test_every_field_we_define_matches_tritonclient(file: str) -> None:
    ours, theirs = our_descriptors(file), triton_descriptors()[file]
    problems: list[str] = []
    for name, message in ours["messages"].items():
        their_message = theirs["messages"].get(name)
        if their_message is None:
            problems.append(f"message {name}: not in tritonclient")
            continue
        if message["map_entry"] != their_message["map_entry"]:
            problems.append(f"message {name}: map_entry differs")
        for field_name, field in message["fields"].items():
            their_field = their_message["fields"].get(field_name)
            if their_field is None:
                problems.append(f"field {name}.{field_name}: not in tritonclient")
            elif field != their_field:
                problems.append(f"field {name}.{field_name}: ours {field} != theirs {their_field}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("file", sorted(OUR_MODULES))
def test_every_enum_we_define_matches_tritonclient(file: str) -> None:
    # Enums must be complete, not just a subset: a value we lack would reach our
    # code as a bare number.
    ours, theirs = our_descriptors(file), triton_descriptors()[file]
    for name, values in ours["enums"].items():
        assert values == theirs["enums"].get(name), f"enum {name}"


def test_grpc_service_messages_are_complete() -> None:
    # Every request/response of the service carries every field tritonclient sends:
    # a field we lacked would be dropped silently by a proxying gateway.
    ours, theirs = our_descriptors("grpc_service"), triton_descriptors()["grpc_service"]
    missing = [
        f"{name}.{field}"
        for name, message in theirs["messages"].items()
        for field in message["fields"]
        if field not in ours["messages"].get(name, {}).get("fields", {})
    ]
    assert not missing, f"fields tritonclient has and we do not: {missing}"
    assert ours["messages"].keys() == theirs["messages"].keys()


def test_every_tritonclient_rpc_exists_with_the_same_signature() -> None:
    ours, theirs = our_descriptors("grpc_service"), triton_descriptors()["grpc_service"]
    assert list(theirs["services"]) == ["inference.GRPCInferenceService"]
    our_service = ours["services"]["inference.GRPCInferenceService"]
    for name, method in theirs["services"]["inference.GRPCInferenceService"].items():
        assert our_service.get(name) == method, f"rpc {name}"


# ---------------------------------------------------------------------------
# Byte-level round trips


def _pack(fmt: str, *values: float | int) -> bytes:
    return struct.pack("<" + fmt, *values)


def _bytes_tensor(*elements: bytes) -> bytes:
    """BYTES tensor in raw form: each element behind a 4-byte little-endian length."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def _set_request_parameters(
    parameters: Any,  # the generated map type has no public name
) -> None:
    parameters["sequence_id"].int64_param = -42
    parameters["priority"].uint64_param = 2**63 + 5  # beyond int64: must stay unsigned
    parameters["sequence_start"].bool_param = True
    parameters["routing_key"].string_param = "user-7"
    parameters["temperature"].double_param = 0.25


def raw_infer_request() -> grpc_service_pb2.ModelInferRequest:
    request = grpc_service_pb2.ModelInferRequest(
        model_name="scorer", model_version="torch", id="req-1"
    )
    _set_request_parameters(request.parameters)
    dense = request.inputs.add(name="INPUT0", datatype="FP32", shape=[2, 2])
    dense.parameters["binary_data_size"].int64_param = 16
    request.inputs.add(name="TEXT", datatype="BYTES", shape=[3])
    request.inputs.add(name="HALF", datatype="FP16", shape=[1])
    request.raw_input_contents.extend(
        [
            _pack("4f", 1.5, -2.25, 0.0, 3.0e38),
            _bytes_tensor(b"hi", b"", b"\x00\xff\xfe bin"),
            _pack("e", 0.5),
        ]
    )
    output = request.outputs.add(name="OUTPUT0")
    output.parameters["binary_data"].bool_param = True
    request.outputs.add(name="LABELS").parameters["classification"].int64_param = 3
    return request


def typed_infer_request() -> grpc_service_pb2.ModelInferRequest:
    request = grpc_service_pb2.ModelInferRequest(model_name="detector", model_version="1")
    _set_request_parameters(request.parameters)
    typed = [
        ("F32", "FP32", "fp32_contents", [1.5, -2.25, 0.0, 3.0e38]),
        ("F64", "FP64", "fp64_contents", [0.1, -1e300]),
        ("STR", "BYTES", "bytes_contents", [b"hello", b"", b"\x00\xff"]),
        ("I32", "INT32", "int_contents", [-(2**31), 7]),
        ("I64", "INT64", "int64_contents", [-(2**63), 2**62]),
        ("U32", "UINT32", "uint_contents", [2**32 - 1, 0]),
        ("U64", "UINT64", "uint64_contents", [2**64 - 1, 1]),
        ("B", "BOOL", "bool_contents", [True, False, True]),
    ]
    for name, datatype, field, values in typed:
        tensor = request.inputs.add(name=name, datatype=datatype, shape=[len(values)])
        getattr(tensor.contents, field).extend(values)
    return request


def raw_infer_response() -> grpc_service_pb2.ModelInferResponse:
    response = grpc_service_pb2.ModelInferResponse(
        model_name="scorer", model_version="tf", id="req-1"
    )
    response.parameters["served_by"].string_param = "tf"
    response.outputs.add(name="OUTPUT0", datatype="INT64", shape=[2])
    response.outputs.add(name="TEXT", datatype="BYTES", shape=[1])
    response.raw_output_contents.extend([_pack("2q", -1, 2**40), _bytes_tensor(b"ok")])
    return response


def stream_response() -> grpc_service_pb2.ModelStreamInferResponse:
    return grpc_service_pb2.ModelStreamInferResponse(
        error_message="", infer_response=raw_infer_response()
    )


def model_config_response() -> grpc_service_pb2.ModelConfigResponse:
    config = model_config_pb2.ModelConfig(
        name="scorer",
        platform="onnxruntime_onnx",
        backend="onnxruntime",
        max_batch_size=8,
        default_model_filename="model.onnx",
    )
    config.version_policy.latest.num_versions = 1
    config.input.add(
        name="INPUT0",
        data_type=model_config_pb2.TYPE_FP32,
        format=model_config_pb2.ModelInput.FORMAT_NCHW,
        dims=[3, -1, -1],
        optional=True,
    ).reshape.shape.extend([3, 224, 224])
    config.output.add(name="OUTPUT0", data_type=model_config_pb2.TYPE_BF16, dims=[1000])
    config.instance_group.add(
        name="gpu", kind=model_config_pb2.ModelInstanceGroup.KIND_GPU, count=2, gpus=[0, 1]
    )
    batching = config.dynamic_batching
    batching.preferred_batch_size.extend([4, 8])
    batching.max_queue_delay_microseconds = 500
    batching.preserve_ordering = True
    batching.default_queue_policy.max_queue_size = 64
    config.parameters["variant"].string_value = "torch"
    config.model_transaction_policy.decoupled = False
    return grpc_service_pb2.ModelConfigResponse(config=config)


ROUND_TRIP_CASES: dict[str, tuple[str, Message]] = {
    "raw request": ("grpc_service", raw_infer_request()),
    "typed request": ("grpc_service", typed_infer_request()),
    "raw response": ("grpc_service", raw_infer_response()),
    "stream response": ("grpc_service", stream_response()),
    "model config response": ("grpc_service", model_config_response()),
    "model config": ("model_config", model_config_response().config),
}

_ROUND_TRIP_SCRIPT = """\
import base64, json, sys
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2, service_pb2

modules = {"grpc_service": service_pb2, "model_config": model_config_pb2}
results = {}
for case, spec in json.load(sys.stdin).items():
    cls = getattr(modules[spec["file"]], spec["type"])
    parsed = cls.FromString(base64.b64decode(spec["wire"]))
    built = json_format.ParseDict(spec["json"], cls())
    results[case] = {
        "parsed_json": json_format.MessageToDict(parsed, preserving_proto_field_name=True),
        "reserialized": base64.b64encode(parsed.SerializeToString(deterministic=True)).decode(),
        "built": base64.b64encode(built.SerializeToString(deterministic=True)).decode(),
    }
json.dump(results, sys.stdout)
"""


def _to_json(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


@functools.cache
def triton_round_trips() -> dict[str, Any]:
    payload = {
        case: {
            "file": file,
            "type": message.DESCRIPTOR.name,
            "wire": base64.b64encode(message.SerializeToString(deterministic=True)).decode(),
            "json": _to_json(message),
        }
        for case, (file, message) in ROUND_TRIP_CASES.items()
    }
    return run_under_triton(_ROUND_TRIP_SCRIPT, payload)  # type: ignore[no-any-return]


@pytest.mark.parametrize("case", sorted(ROUND_TRIP_CASES))
def test_tritonclient_reads_our_bytes(case: str) -> None:
    _, ours = ROUND_TRIP_CASES[case]
    result = triton_round_trips()[case]
    # Every value landed in the field of the same name on their side ...
    assert result["parsed_json"] == _to_json(ours)
    # ... and nothing was left over as unknown fields or changed on the way back.
    assert base64.b64decode(result["reserialized"]) == ours.SerializeToString(deterministic=True)


@pytest.mark.parametrize("case", sorted(ROUND_TRIP_CASES))
def test_we_read_tritonclient_bytes(case: str) -> None:
    _, ours = ROUND_TRIP_CASES[case]
    theirs = base64.b64decode(triton_round_trips()[case]["built"])
    # The same message built with tritonclient's classes encodes to the same bytes ...
    assert theirs == ours.SerializeToString(deterministic=True)
    # ... and parses back with ours to an equal message.
    parsed = type(ours).FromString(theirs)
    assert parsed == ours
    assert parsed.SerializeToString(deterministic=True) == theirs
