"""Unit tests for server/codec.py: round trips for every OIP datatype, BYTES framing and
every malformed request the codec must refuse with InvalidInput."""

from __future__ import annotations

import tracemalloc

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tensorgate import codec
from tensorgate.errors import InvalidInput
from tensorgate.inference import InferenceResponse, OutputTensor
from tensorgate.protos import grpc_service_pb2 as pb

# Written out by hand (not read from backends/datatypes.py) so a wrong table entry fails here.
NUMERIC: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}
TYPED_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
SHAPES = [(), (0,), (3,), (2, 3), (0, 4), (2, 1, 2)]


def _sample(datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    """A deterministic array of ``shape`` that includes the extremes of ``datatype``."""
    n = int(np.prod(shape))
    if datatype == "BYTES":
        pool = [b"", b"a", "h\u00e9llo \u2603".encode(), b"\x00\xff", b"x" * 300]
        flat = np.empty(n, dtype=object)
        flat[:] = [pool[i % len(pool)] for i in range(n)]
        return flat.reshape(shape)
    dtype = NUMERIC[datatype]
    if datatype == "BOOL":
        pool = [True, False]
    elif dtype.kind in "iu":
        info = np.iinfo(dtype)
        pool = [info.min, info.max, 0, 1, info.max // 3]
    else:
        pool = [0.0, -1.5, 3.25, float("inf"), -float("inf")]
    return np.array([pool[i % len(pool)] for i in range(n)], dtype=dtype).reshape(shape)


def _round_trip(msg: pb.ModelInferRequest):
    return codec.decode_request(pb.ModelInferRequest.FromString(msg.SerializeToString()))


def _assert_same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    if want.dtype == object:
        assert got.dtype == object
        assert [bytes(x) for x in got.reshape(-1)] == [
            x.encode() if isinstance(x, str) else bytes(x) for x in want.reshape(-1)
        ]
    else:
        assert got.dtype == want.dtype
        assert got.tobytes() == want.tobytes()  # bit-exact, NaN and -0.0 included


def _raw_request(
    datatype: str, shape: list[int], raw: bytes, name: str = "x"
) -> pb.ModelInferRequest:
    msg = pb.ModelInferRequest(model_name="m")
    msg.inputs.add(name=name, datatype=datatype, shape=shape)
    msg.raw_input_contents.append(raw)
    return msg


def _typed_request(
    datatype: str, shape: list[int], field: str, values: list, name: str = "x"
) -> pb.ModelInferRequest:
    msg = pb.ModelInferRequest(model_name="m")
    t = msg.inputs.add(name=name, datatype=datatype, shape=shape)
    getattr(t.contents, field).extend(values)
    return msg


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("datatype", [*NUMERIC, "BYTES"])
def test_raw_round_trip_every_datatype(datatype: str, shape: tuple[int, ...]) -> None:
    arr = _sample(datatype, shape)
    msg = codec.encode_request("m", {"x": arr})
    assert msg.inputs[0].datatype == datatype
    assert tuple(msg.inputs[0].shape) == shape

    req = _round_trip(msg)

    (t,) = req.inputs
    assert (t.name, t.datatype, t.shape) == ("x", datatype, shape)
    _assert_same(t.data, arr)


@pytest.mark.parametrize("shape", [(), (0,), (4,), (2, 2)], ids=str)
@pytest.mark.parametrize("datatype", list(TYPED_FIELD))
def test_typed_round_trip_every_typed_datatype(datatype: str, shape: tuple[int, ...]) -> None:
    arr = _sample(datatype, shape)
    values = list(arr.reshape(-1)) if datatype == "BYTES" else arr.reshape(-1).tolist()
    msg = _typed_request(datatype, list(shape), TYPED_FIELD[datatype], values)

    (t,) = _round_trip(msg).inputs

    assert t.datatype == datatype
    _assert_same(t.data, arr)


@pytest.mark.parametrize("datatype", ["FP16", "BF16"])
def test_typed_contents_refused_for_datatypes_without_a_field(datatype: str) -> None:
    # Any field will do: the protocol has none that carries 16-bit floats.
    msg = _typed_request(datatype, [2], "fp32_contents", [1.0, 2.0])
    with pytest.raises(InvalidInput, match=r"input 'x'.*raw_input_contents"):
        _round_trip(msg)


@pytest.mark.parametrize("datatype", ["FP16", "BF16"])
def test_typed_refusal_holds_even_with_no_values(datatype: str) -> None:
    msg = pb.ModelInferRequest(model_name="m")
    msg.inputs.add(name="x", datatype=datatype, shape=[0])
    with pytest.raises(InvalidInput, match="input 'x'"):
        _round_trip(msg)


def test_request_metadata_and_parameters_round_trip() -> None:
    params = {"flag": True, "count": 7, "ratio": 0.5, "tag": "abc"}
    msg = codec.encode_request(
        "mdl",
        {"a": np.ones(2, np.float32), "b": np.zeros((1, 2), np.int64)},
        version="v2",
        outputs=["y", "z"],
        request_id="req-1",
        parameters=params,
    )

    req = _round_trip(msg)

    assert (req.model, req.version, req.id) == ("mdl", "v2", "req-1")
    assert [t.name for t in req.inputs] == ["a", "b"]
    assert req.requested_outputs == ["y", "z"]
    assert req.parameters == params
    assert type(req.parameters["flag"]) is bool
    assert type(req.parameters["count"]) is int


def test_python_scalars_and_strings_encode_with_their_oip_datatypes() -> None:
    msg = codec.encode_request(
        "m", {"f": 1.5, "i": 3, "b": True, "s": np.array(["x", "\u00e9"]), "y": np.array([b"q"])}
    )
    assert [t.datatype for t in msg.inputs] == ["FP64", "INT64", "BOOL", "BYTES", "BYTES"]
    data = {t.name: t.data for t in _round_trip(msg).inputs}
    assert data["f"].shape == () and data["f"][()] == 1.5
    assert list(data["s"]) == [b"x", "\u00e9".encode()]
    assert list(data["y"]) == [b"q"]


def test_non_contiguous_array_encodes_in_c_order() -> None:
    arr = np.arange(12, dtype=np.int32).reshape(3, 4).T  # Fortran-ordered view
    (t,) = _round_trip(codec.encode_request("m", {"x": arr})).inputs
    np.testing.assert_array_equal(t.data, arr)


def test_response_round_trip() -> None:
    outputs = [
        OutputTensor(name, datatype, _sample(datatype, shape))
        for name, datatype, shape in [
            ("probs", "FP32", (2, 3)),
            ("half", "FP16", (2,)),
            ("brain", "BF16", (1, 2)),
            ("label", "BYTES", (2,)),
            ("flag", "BOOL", ()),
            ("empty", "INT64", (0, 5)),
        ]
    ]
    resp = InferenceResponse(model="m", variant="onnx", id="r7", outputs=outputs)

    msg = codec.encode_response(resp)
    parsed = pb.ModelInferResponse.FromString(msg.SerializeToString())
    got = codec.decode_response(parsed)

    assert (parsed.model_name, parsed.model_version, parsed.id) == ("m", "onnx", "r7")
    assert [(o.name, o.datatype) for o in parsed.outputs] == [(o.name, o.datatype) for o in outputs]
    assert list(got) == [o.name for o in outputs]
    for o in outputs:
        _assert_same(got[o.name], o.data)


def test_decode_response_reads_typed_contents() -> None:
    msg = pb.ModelInferResponse(model_name="m")
    t = msg.outputs.add(name="y", datatype="INT32", shape=[2, 2])
    t.contents.int_contents.extend([1, -2, 3, -4])
    got = codec.decode_response(msg)
    np.testing.assert_array_equal(got["y"], np.array([[1, -2], [3, -4]], np.int32))
    assert got["y"].dtype == np.int32


def test_decode_response_refuses_raw_count_mismatch() -> None:
    msg = pb.ModelInferResponse(model_name="m")
    msg.outputs.add(name="a", datatype="FP32", shape=[1])
    msg.outputs.add(name="b", datatype="FP32", shape=[1])
    msg.raw_output_contents.append(b"\0" * 4)
    with pytest.raises(InvalidInput, match="raw_output_contents"):
        codec.decode_response(msg)


# ---------------------------------------------------------------- zero-copy


def test_decode_raw_is_a_view_over_the_buffer() -> None:
    buf = bytearray(np.arange(6, dtype=np.float32).tobytes())
    arr = codec.decode_raw(buf, codec.DATATYPES["FP32"], (2, 3), "input 'x'")

    assert np.shares_memory(arr, np.frombuffer(buf, dtype=np.uint8))
    assert not arr.flags.owndata
    buf[0:4] = np.float32(42).tobytes()  # a view sees writes to the buffer
    assert arr[0, 0] == 42


def test_decoded_request_input_does_not_copy_the_raw_bytes() -> None:
    msg = codec.encode_request("m", {"x": np.arange(4, dtype=np.int64)})
    (t,) = _round_trip(msg).inputs
    base = t.data
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    assert isinstance(base, bytes | memoryview)
    assert not t.data.flags.owndata


# ---------------------------------------------------------------- BYTES framing


def test_bytes_framing_is_little_endian_u32_length_prefixed() -> None:
    long = b"z" * 300  # 300 = 0x012C: a two-byte length shows the byte order
    arr = np.array([b"ab", b"", "\u00e9\u2603", long], dtype=object)
    expected = (
        b"\x02\x00\x00\x00ab"
        + b"\x00\x00\x00\x00"
        + b"\x05\x00\x00\x00\xc3\xa9\xe2\x98\x83"
        + b"\x2c\x01\x00\x00"
        + long
    )

    msg = codec.encode_request("m", {"s": arr})

    assert msg.raw_input_contents[0] == expected
    assert codec.serialize_bytes(arr) == expected
    (t,) = _round_trip(msg).inputs
    assert list(t.data) == [b"ab", b"", "\u00e9\u2603".encode(), long]


def test_bytes_all_empty_strings() -> None:
    msg = codec.encode_request("m", {"s": np.array([b"", b"", b""], dtype=object)})
    assert msg.raw_input_contents[0] == b"\x00" * 12
    (t,) = _round_trip(msg).inputs
    assert list(t.data) == [b"", b"", b""]


def test_bytes_decoded_elements_are_bytes_in_an_object_array() -> None:
    (t,) = _round_trip(codec.encode_request("m", {"s": np.array(["\u00fc"])})).inputs
    assert t.data.dtype == object
    assert type(t.data[0]) is bytes


# ---------------------------------------------------------------- malformed requests


def test_raw_byte_length_wrong_names_expected_count() -> None:
    msg = _raw_request("FP32", [2], b"\0" * 7)
    with pytest.raises(InvalidInput, match=r"input 'x'") as e:
        _round_trip(msg)
    assert "7 bytes" in str(e.value)
    assert "needs 8" in str(e.value)


@pytest.mark.parametrize("n_raw", [1, 3])
def test_raw_contents_count_must_match_inputs(n_raw: int) -> None:
    msg = pb.ModelInferRequest(model_name="m")
    msg.inputs.add(name="a", datatype="INT8", shape=[1])
    msg.inputs.add(name="b", datatype="INT8", shape=[1])
    msg.raw_input_contents.extend([b"\0"] * n_raw)
    with pytest.raises(InvalidInput, match=rf"raw_input_contents has {n_raw} entries.* 2 inputs"):
        _round_trip(msg)


def test_raw_and_typed_together_refused() -> None:
    msg = _raw_request("INT32", [1], b"\0" * 4)
    msg.inputs[0].contents.int_contents.append(5)
    with pytest.raises(InvalidInput, match=r"input 'x'.*typed contents and raw_input_contents"):
        _round_trip(msg)


@pytest.mark.parametrize(
    ("datatype", "wrong_field", "value"),
    [
        ("FP32", "int_contents", 1),
        ("INT64", "int_contents", 1),
        ("UINT8", "int_contents", 1),
        ("INT32", "fp32_contents", 1.0),
        ("BOOL", "int_contents", 1),
        ("BYTES", "uint_contents", 1),
    ],
)
def test_wrong_typed_field_for_datatype(datatype: str, wrong_field: str, value: object) -> None:
    msg = _typed_request(datatype, [1], wrong_field, [value])
    with pytest.raises(InvalidInput, match=rf"input 'x'.*{TYPED_FIELD[datatype]}.*{wrong_field}"):
        _round_trip(msg)


@pytest.mark.parametrize("n_values", [0, 2, 4])
def test_typed_value_count_wrong(n_values: int) -> None:
    msg = _typed_request("FP64", [3], "fp64_contents", [1.0] * n_values)
    with pytest.raises(InvalidInput, match=rf"input 'x'.*holds {n_values} value.*needs 3"):
        _round_trip(msg)


@pytest.mark.parametrize(
    ("datatype", "field", "value"),
    [
        ("INT8", "int_contents", 128),
        ("INT8", "int_contents", -129),
        ("INT16", "int_contents", 40000),
        ("UINT8", "uint_contents", 256),
        ("UINT16", "uint_contents", 70000),
    ],
)
def test_typed_value_out_of_range_refused(datatype: str, field: str, value: int) -> None:
    msg = _typed_request(datatype, [1], field, [value])
    with pytest.raises(InvalidInput, match=rf"input 'x'.*{datatype}"):
        _round_trip(msg)


def test_unknown_datatype() -> None:
    msg = _raw_request("FP8", [1], b"\0")
    with pytest.raises(InvalidInput, match=r"input 'x'.*unknown datatype 'FP8'"):
        _round_trip(msg)


def test_unknown_datatype_in_response() -> None:
    msg = pb.ModelInferResponse()
    msg.outputs.add(name="y", datatype="COMPLEX64", shape=[1])
    msg.raw_output_contents.append(b"\0" * 8)
    with pytest.raises(InvalidInput, match=r"output 'y'.*COMPLEX64"):
        codec.decode_response(msg)


@pytest.mark.parametrize("shape", [[-1], [2, -3], [0, -1]])
def test_negative_dimension(shape: list[int]) -> None:
    with pytest.raises(InvalidInput, match=r"input 'x'.*negative dimension"):
        _round_trip(_raw_request("FP32", shape, b""))


@pytest.mark.parametrize("typed", [False, True])
def test_huge_element_count_refused_without_allocating(typed: bool) -> None:
    shape = [1 << 20, 1 << 20, 4]  # 2**42 elements: 16 TiB of FP32
    if typed:
        msg = _typed_request("FP32", shape, "fp32_contents", [1.0])
    else:
        msg = _raw_request("FP32", shape, b"\0" * 4)
    tracemalloc.start()
    try:
        with pytest.raises(InvalidInput, match=r"input 'x'.*limit"):
            _round_trip(msg)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_element_count_at_the_limit_is_not_refused_by_the_limit() -> None:
    assert codec.element_count([codec.MAX_ELEMENTS], "t") == codec.MAX_ELEMENTS
    with pytest.raises(InvalidInput, match="limit"):
        codec.element_count([codec.MAX_ELEMENTS + 1], "t")


@pytest.mark.parametrize("shape", [[0, 1 << 62], [1 << 40, 0, 1 << 40]], ids=str)
def test_empty_tensor_with_absurd_dimension_is_invalid_input(shape: list[int]) -> None:
    # Zero elements, yet numpy cannot build an array of this shape: must not escape as
    # ValueError (an INTERNAL error for the caller).
    with pytest.raises(InvalidInput, match="input 'x'"):
        _round_trip(_raw_request("FP32", shape, b""))


def test_duplicate_input_names() -> None:
    msg = codec.encode_request("m", {"x": np.ones(1, np.int8)})
    msg.inputs.add(name="x", datatype="INT8", shape=[1])
    msg.raw_input_contents.append(b"\1")
    with pytest.raises(InvalidInput, match=r"input 'x'.*more than once"):
        _round_trip(msg)


def test_duplicate_requested_outputs() -> None:
    msg = codec.encode_request("m", {"x": np.ones(1, np.int8)}, outputs=["y", "z", "y"])
    with pytest.raises(InvalidInput, match="more than once") as e:
        _round_trip(msg)
    assert "'y'" in str(e.value)


def test_bytes_prefix_declares_more_than_remains() -> None:
    raw = b"\x05\x00\x00\x00ab"
    with pytest.raises(InvalidInput, match=r"input 'x'.*declares 5 bytes.*only 2 remain"):
        _round_trip(_raw_request("BYTES", [1], raw))


def test_bytes_prefix_huge_length_does_not_read_past_buffer() -> None:
    raw = b"\xff\xff\xff\xff" + b"abc"
    with pytest.raises(InvalidInput, match=r"input 'x'.*4294967295"):
        _round_trip(_raw_request("BYTES", [1], raw))


@pytest.mark.parametrize("trailing", [1, 2, 3])
def test_bytes_truncated_prefix(trailing: int) -> None:
    raw = b"\x01\x00\x00\x00a" + b"\x00" * trailing
    with pytest.raises(InvalidInput, match=rf"input 'x'.*{trailing} trailing byte"):
        _round_trip(_raw_request("BYTES", [2], raw))


@pytest.mark.parametrize(("n_elements", "shape"), [(3, [2]), (1, [2]), (0, [1]), (1, [0])])
def test_bytes_element_count_must_match_shape(n_elements: int, shape: list[int]) -> None:
    raw = b"\x01\x00\x00\x00a" * n_elements
    with pytest.raises(InvalidInput, match=rf"input 'x'.*BYTES.*needs {shape[0]}"):
        _round_trip(_raw_request("BYTES", shape, raw))


# ---------------------------------------------------------------- property


_PROPERTY_DTYPES = [d for name, d in NUMERIC.items() if name != "BF16"]


@st.composite
def _arrays(draw: st.DrawFn) -> np.ndarray:
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
    kind = draw(st.sampled_from(["BF16", "BYTES", *map(str, _PROPERTY_DTYPES)]))
    if kind == "BYTES":
        return draw(hnp.arrays(object, shape, elements=st.binary(max_size=20)))
    if kind == "BF16":
        # hypothesis knows no bfloat16: draw its 16-bit patterns (NaNs and infs included).
        return draw(hnp.arrays(np.uint16, shape)).view(ml_dtypes.bfloat16)
    return draw(hnp.arrays(np.dtype(kind), shape))


@settings(max_examples=300, deadline=None)
@given(arrays=st.lists(_arrays(), min_size=1, max_size=3))
def test_property_encode_decode_request_round_trip(arrays: list[np.ndarray]) -> None:
    inputs = {f"in{i}": a for i, a in enumerate(arrays)}
    req = _round_trip(codec.encode_request("m", inputs))
    assert [t.name for t in req.inputs] == list(inputs)
    for t in req.inputs:
        _assert_same(t.data, inputs[t.name])
