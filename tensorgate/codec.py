"""Protobuf <-> numpy for the Open Inference Protocol: pure functions, used by the servicer
and by the Python client, so both ends speak exactly the same encoding.

Raw tensors are decoded as numpy views over the request's bytes (no copy); replies carry
``raw_output_contents`` (one copy out of the framework's array). BYTES elements are framed
with a 4-byte little-endian length prefix.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from tensorgate.protos import grpc_service_pb2 as pb

from .datatypes import DATATYPES, Datatype, from_numpy
from .errors import InvalidInput
from .inference import InferenceRequest, InferenceResponse, InputTensor
from .limits import MAX_ELEMENTS

_LEN = struct.Struct("<I")
_CONTENT_FIELDS = (
    "bool_contents",
    "int_contents",
    "int64_contents",
    "uint_contents",
    "uint64_contents",
    "fp32_contents",
    "fp64_contents",
    "bytes_contents",
)


def _datatype(name: str, what: str) -> Datatype:
    dt = DATATYPES.get(name)
    if dt is None:
        raise InvalidInput(
            f"{what}: unknown datatype '{name}'; expected one of {', '.join(DATATYPES)}"
        )
    return dt


def element_count(shape: Sequence[int], what: str, max_elements: int = MAX_ELEMENTS) -> int:
    """Number of elements of ``shape``; negative dimensions, or more than ``max_elements``
    elements (the server's ``--max-tensor-elements``), are InvalidInput."""
    for d in shape:
        if d < 0:
            raise InvalidInput(f"{what}: shape {list(shape)} has a negative dimension")
        if d > max_elements:
            raise InvalidInput(
                f"{what}: shape {list(shape)} has a dimension larger than the limit of "
                f"{max_elements} elements"
            )
    count = math.prod(shape)
    if count > max_elements:
        raise InvalidInput(
            f"{what}: shape {list(shape)} has {count} elements, more than the limit of "
            f"{max_elements}"
        )
    # An empty tensor (a 0 dimension) whose other dimensions multiply past the limit cannot
    # be built by numpy either, and no real tensor looks like that.
    if count == 0 and math.prod(d for d in shape if d) > max_elements:
        raise InvalidInput(
            f"{what}: shape {list(shape)}: its non-zero dimensions multiply to more than the "
            f"limit of {max_elements} elements"
        )
    return count


def deserialize_bytes(buf: bytes | memoryview, count: int, what: str) -> np.ndarray:
    """Split length-prefixed BYTES elements; never reads past ``buf``."""
    view = memoryview(buf)
    items: list[bytes] = []
    pos, end = 0, len(view)
    while pos < end:
        if end - pos < 4:
            raise InvalidInput(
                f"{what}: malformed BYTES: {end - pos} trailing byte(s) at offset {pos} are too "
                "few for a 4-byte length prefix"
            )
        (n,) = _LEN.unpack_from(view, pos)
        pos += 4
        if n > end - pos:
            raise InvalidInput(
                f"{what}: malformed BYTES: element {len(items)} declares {n} bytes at offset "
                f"{pos - 4} but only {end - pos} remain"
            )
        items.append(bytes(view[pos : pos + n]))
        pos += n
        if len(items) > count:
            break
    if len(items) != count:
        raise InvalidInput(
            f"{what}: BYTES tensor holds {'at least ' if len(items) > count else ''}"
            f"{len(items)} element(s) but its shape needs {count}"
        )
    out = np.empty(count, dtype=object)
    out[:] = items
    return out


def serialize_bytes(arr: np.ndarray) -> bytes:
    """Length-prefix every element of a BYTES (object/str/bytes) array, in C order."""
    parts: list[bytes] = []
    for item in arr.reshape(-1):
        if isinstance(item, str):
            b = item.encode("utf-8")
        elif isinstance(item, bytes | bytearray | memoryview | np.bytes_):
            b = bytes(item)
        else:
            raise TypeError(f"BYTES elements must be bytes or str, not {type(item).__name__}")
        parts.append(_LEN.pack(len(b)))
        parts.append(b)
    return b"".join(parts)


def decode_raw(
    buf: bytes,
    dt: Datatype,
    shape: tuple[int, ...],
    what: str,
    max_elements: int = MAX_ELEMENTS,
) -> np.ndarray:
    count = element_count(shape, what, max_elements)
    if dt.name == "BYTES":
        return deserialize_bytes(buf, count, what).reshape(shape)
    expected = count * dt.itemsize
    if len(buf) != expected:
        raise InvalidInput(
            f"{what}: raw contents hold {len(buf)} bytes, but {dt.name} {list(shape)} needs "
            f"{expected} ({count} elements x {dt.itemsize} bytes)"
        )
    return np.frombuffer(buf, dtype=dt.numpy).reshape(shape)


def decode_typed(
    contents: pb.InferTensorContents,
    dt: Datatype,
    shape: tuple[int, ...],
    what: str,
    max_elements: int = MAX_ELEMENTS,
) -> np.ndarray:
    count = element_count(shape, what, max_elements)
    if dt.contents_field is None:
        raise InvalidInput(
            f"{what}: {dt.name} has no typed contents field in the protocol; send it in "
            "raw_input_contents"
        )
    for field in _CONTENT_FIELDS:
        if field != dt.contents_field and len(getattr(contents, field)):
            raise InvalidInput(
                f"{what}: datatype {dt.name} expects its values in '{dt.contents_field}', "
                f"but '{field}' is set"
            )
    values = getattr(contents, dt.contents_field)
    if len(values) != count:
        raise InvalidInput(
            f"{what}: '{dt.contents_field}' holds {len(values)} value(s) but shape "
            f"{list(shape)} needs {count}"
        )
    if dt.name == "BYTES":
        arr = np.empty(count, dtype=object)
        arr[:] = list(values)
        return arr.reshape(shape)
    wide = np.asarray(values)
    if dt.numpy.kind in "iu" and wide.size:
        info = np.iinfo(dt.numpy)
        low, high = wide.min(), wide.max()
        if low < info.min or high > info.max:
            bad = low if low < info.min else high
            raise InvalidInput(
                f"{what}: value {bad} does not fit {dt.name} ({info.min}..{info.max})"
            )
    return wide.astype(dt.numpy).reshape(shape)


def decode_request(msg: pb.ModelInferRequest, max_elements: int = MAX_ELEMENTS) -> InferenceRequest:
    """ModelInferRequest -> InferenceRequest. Raises InvalidInput for anything malformed
    at the wire level, including a tensor of more than ``max_elements`` elements (the
    model's signature is checked later, by the pipeline)."""
    raw = msg.raw_input_contents
    if raw and len(raw) != len(msg.inputs):
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries but the request has {len(msg.inputs)} "
            "inputs; with raw contents every input needs exactly one entry, in input order"
        )
    inputs: list[InputTensor] = []
    seen: set[str] = set()
    for i, t in enumerate(msg.inputs):
        what = f"input '{t.name}'"
        if t.name in seen:
            raise InvalidInput(f"{what} appears more than once in the request")
        seen.add(t.name)
        dt = _datatype(t.datatype, what)
        shape = tuple(t.shape)
        if raw:
            if t.HasField("contents") and any(len(getattr(t.contents, f)) for f in _CONTENT_FIELDS):
                raise InvalidInput(
                    f"{what} has typed contents and raw_input_contents; use one or the other"
                )
            data = decode_raw(raw[i], dt, shape, what, max_elements)
        else:
            data = decode_typed(t.contents, dt, shape, what, max_elements)
        inputs.append(InputTensor(t.name, dt.name, shape, data))
    outputs = [o.name for o in msg.outputs]
    if len(set(outputs)) != len(outputs):
        twice = sorted({n for n in outputs if outputs.count(n) > 1})
        raise InvalidInput(f"the request names output(s) {twice} more than once")
    return InferenceRequest(
        model=msg.model_name,
        version=msg.model_version,
        id=msg.id,
        inputs=inputs,
        requested_outputs=outputs,
        parameters=decode_parameters(msg.parameters),
    )


def decode_parameters(params: Mapping[str, pb.InferParameter]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, p in params.items():
        kind = p.WhichOneof("parameter_choice")
        out[key] = getattr(p, kind) if kind else None
    return out


def encode_parameters(
    target: Mapping[str, pb.InferParameter], params: Mapping[str, object]
) -> None:
    for key, value in params.items():
        p = target[key]  # type: ignore[index]
        if isinstance(value, bool):
            p.bool_param = value
        elif isinstance(value, int):
            p.int64_param = value
        elif isinstance(value, float):
            p.double_param = value
        else:
            p.string_param = str(value)


def encode_array(arr: np.ndarray) -> tuple[str, bytes]:
    """(OIP datatype, raw bytes) for an array; object/str arrays are BYTES."""
    dt = from_numpy(arr.dtype)
    if dt.name == "BYTES":
        return dt.name, serialize_bytes(arr)
    return dt.name, np.ascontiguousarray(arr).tobytes()


def encode_response(resp: InferenceResponse) -> pb.ModelInferResponse:
    msg = pb.ModelInferResponse(model_name=resp.model, model_version=resp.variant, id=resp.id)
    for out in resp.outputs:
        _, raw = encode_array(out.data)
        msg.outputs.add(name=out.name, datatype=out.datatype, shape=out.data.shape)
        msg.raw_output_contents.append(raw)
    return msg


def encode_request(
    model: str,
    inputs: Mapping[str, np.ndarray],
    version: str = "",
    outputs: Iterable[str] = (),
    request_id: str = "",
    parameters: Mapping[str, object] | None = None,
) -> pb.ModelInferRequest:
    """Build a ModelInferRequest with every input in raw_input_contents (client side)."""
    msg = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    for name, value in inputs.items():
        arr = np.asarray(value)
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("="))
        if arr.dtype.kind in "SU":
            arr = arr.astype(object)
        datatype, raw = encode_array(arr)
        msg.inputs.add(name=name, datatype=datatype, shape=arr.shape)
        msg.raw_input_contents.append(raw)
    for name in outputs:
        msg.outputs.add(name=name)
    if parameters:
        encode_parameters(msg.parameters, parameters)
    return msg


def decode_response(msg: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """ModelInferResponse -> {name: array}, from raw or typed contents (client side)."""
    raw = msg.raw_output_contents
    if raw and len(raw) != len(msg.outputs):
        raise InvalidInput(
            f"raw_output_contents has {len(raw)} entries but the reply has {len(msg.outputs)} "
            "outputs"
        )
    out: dict[str, np.ndarray] = {}
    for i, t in enumerate(msg.outputs):
        what = f"output '{t.name}'"
        dt = _datatype(t.datatype, what)
        shape = tuple(t.shape)
        if raw:
            out[t.name] = decode_raw(raw[i], dt, shape, what)
        else:
            out[t.name] = decode_typed(t.contents, dt, shape, what)
    return out
