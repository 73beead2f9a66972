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
#: Raw tensor contents: bytes, or any object with the buffer protocol (numpy arrays, the
#: native front end's views over a request's bytes).
Buffer = bytes | bytearray | memoryview | np.ndarray
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
    buf: Buffer,
    dt: Datatype,
    shape: tuple[int, ...],
    what: str,
    max_elements: int = MAX_ELEMENTS,
) -> np.ndarray:
    """A tensor over ``buf`` (bytes, or any read-only buffer: the native front end's views
    of the request), without a copy where the datatype allows."""
    count = element_count(shape, what, max_elements)
    if dt.name == "BYTES":
        return deserialize_bytes(buf, count, what).reshape(shape)
    expected = count * dt.itemsize
    size = len(buf) if isinstance(buf, bytes) else memoryview(buf).nbytes
    if size != expected:
        raise InvalidInput(
            f"{what}: raw contents hold {size} bytes, but {dt.name} {list(shape)} needs "
            f"{expected} ({count} elements x {dt.itemsize} bytes)"
        )
    return np.frombuffer(buf, dtype=dt.numpy).reshape(shape)


def typed_fields(contents: pb.InferTensorContents) -> dict[str, Sequence[object]]:
    """The non-empty typed fields of an ``InferTensorContents``, by field name: the form
    ``decode_typed`` and ``decode_parts`` take (the native front end builds it in Rust)."""
    return {f: v for f in _CONTENT_FIELDS if len(v := getattr(contents, f))}


def decode_typed(
    contents: Mapping[str, Sequence[object]],
    dt: Datatype,
    shape: tuple[int, ...],
    what: str,
    max_elements: int = MAX_ELEMENTS,
) -> np.ndarray:
    """A tensor from typed contents: ``contents`` maps the non-empty fields of
    InferTensorContents (``typed_fields``) to their values (sequences or 1-D arrays)."""
    count = element_count(shape, what, max_elements)
    if dt.contents_field is None:
        raise InvalidInput(
            f"{what}: {dt.name} has no typed contents field in the protocol; send it in "
            "raw_input_contents"
        )
    for field in _CONTENT_FIELDS:
        if field != dt.contents_field and len(contents.get(field, ())):
            raise InvalidInput(
                f"{what}: datatype {dt.name} expects its values in '{dt.contents_field}', "
                f"but '{field}' is set"
            )
    values = contents.get(dt.contents_field, ())
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


#: An input as ``decode_parts`` takes it: (name, datatype, shape, typed contents).
InputParts = tuple[str, str, Sequence[int], Mapping[str, Sequence[object]]]


def decode_request(msg: pb.ModelInferRequest, max_elements: int = MAX_ELEMENTS) -> InferenceRequest:
    """ModelInferRequest -> InferenceRequest (``decode_parts`` over the message's fields)."""
    raw = msg.raw_input_contents
    return decode_parts(
        msg.model_name,
        msg.model_version,
        msg.id,
        [
            (
                t.name,
                t.datatype,
                t.shape,
                typed_fields(t.contents) if not raw or t.HasField("contents") else {},
            )
            for t in msg.inputs
        ],
        raw,
        [o.name for o in msg.outputs],
        decode_parameters(msg.parameters),
        max_elements,
    )


def decode_parts(
    model: str,
    version: str,
    request_id: str,
    inputs: Sequence[InputParts],
    raw: Sequence[Buffer],
    outputs: Sequence[str],
    parameters: dict[str, object],
    max_elements: int = MAX_ELEMENTS,
) -> InferenceRequest:
    """A ModelInferRequest's parts -> InferenceRequest: the one decoder of both front ends
    (the grpcio one reads the parts from a protobuf message, the native one gets them from
    Rust). ``inputs`` are (name, datatype, shape, typed contents by field name, only the
    non-empty fields), ``raw`` the raw_input_contents buffers, ``parameters`` decoded.
    Raises InvalidInput for anything malformed at the wire level, including a tensor of
    more than ``max_elements`` elements (the model's signature is checked later, by the
    pipeline)."""
    if raw and len(raw) != len(inputs):
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries but the request has {len(inputs)} "
            "inputs; with raw contents every input needs exactly one entry, in input order"
        )
    tensors: list[InputTensor] = []
    seen: set[str] = set()
    for i, (name, datatype, dims, contents) in enumerate(inputs):
        what = f"input '{name}'"
        if name in seen:
            raise InvalidInput(f"{what} appears more than once in the request")
        seen.add(name)
        dt = _datatype(datatype, what)
        shape = tuple(dims)
        if raw:
            if contents:
                raise InvalidInput(
                    f"{what} has typed contents and raw_input_contents; use one or the other"
                )
            data = decode_raw(raw[i], dt, shape, what, max_elements)
        else:
            data = decode_typed(contents, dt, shape, what, max_elements)
        tensors.append(InputTensor(name, dt.name, shape, data))
    if len(set(outputs)) != len(outputs):
        twice = sorted({n for n in outputs if outputs.count(n) > 1})
        raise InvalidInput(f"the request names output(s) {twice} more than once")
    return InferenceRequest(
        model=model,
        version=version,
        id=request_id,
        inputs=tensors,
        requested_outputs=list(outputs),
        parameters=parameters,
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


def encode_outputs(resp: InferenceResponse) -> list[tuple[str, str, tuple[int, ...], Buffer]]:
    """A reply's outputs as (name, datatype, shape, raw contents): a C-contiguous array for
    numeric tensors (the native front end copies it into the reply once), length-prefixed
    bytes for BYTES."""
    encoded: list[tuple[str, str, tuple[int, ...], Buffer]] = []
    for out in resp.outputs:
        arr = out.data
        if from_numpy(arr.dtype).name == "BYTES":
            data: Buffer = serialize_bytes(arr)
        else:
            data = np.ascontiguousarray(arr)
        encoded.append((out.name, out.datatype, arr.shape, data))
    return encoded


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
            out[t.name] = decode_typed(typed_fields(t.contents), dt, shape, what)
    return out
