"""Unit tests for server/signature.py: merging variant signatures with config.toml, and
checking requests against the result."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from tensorgate.backends import Signature, TensorSpec
from tensorgate.errors import ConfigError, InvalidInput
from tensorgate.inference import InputTensor
from tensorgate.server.config import ModelConfig, TensorConfig
from tensorgate.server.signature import ModelSignature, merge_signatures, validate_inputs


def spec(name: str | None, datatype: str | None = None, *shape: int) -> TensorSpec:
    """A spec; no dimensions given means the shape is unknown (use TensorSpec for scalars)."""
    return TensorSpec(name, datatype, shape or None)


def named(inputs: list[TensorSpec], outputs: list[TensorSpec]) -> Signature:
    return Signature(tuple(inputs), tuple(outputs))


def positional(inputs: list[TensorSpec], outputs: list[TensorSpec]) -> Signature:
    return Signature(tuple(inputs), tuple(outputs), positional=True)


Row = tuple[str, str | None, tuple[int, ...] | None]  # an [[input]]/[[output]] table


def config(
    inputs: Sequence[Row] = (), outputs: Sequence[Row] = (), max_batch_size: int = 0
) -> ModelConfig:
    def tables(rows: Sequence[Row]) -> list[TensorConfig]:
        return [
            TensorConfig(name=n, datatype=d, shape=list(s) if s is not None else None)
            for n, d, s in rows
        ]

    return ModelConfig(input=tables(inputs), output=tables(outputs), max_batch_size=max_batch_size)


ONNX = named([spec("a", "FP32", -1, 3), spec("b", "INT64", -1)], [spec("y", "FP32", -1, 2)])


# ---------------------------------------------------------------- named variants


def test_agreeing_named_variants_merge() -> None:
    tf = named([spec("b", "INT64", -1), spec("a", "FP32", -1, 3)], [spec("y", "FP32", -1, 2)])
    sig, per_variant = merge_signatures("m", ModelConfig(), {"onnx": ONNX, "tf": tf})
    # The first variant's order is the model's order.
    assert sig.inputs == (spec("a", "FP32", -1, 3), spec("b", "INT64", -1))
    assert sig.outputs == (spec("y", "FP32", -1, 2),)
    assert sig.max_batch_size == 0
    assert per_variant == {}


def test_named_variants_complete_each_other() -> None:
    a = named([spec("x", "FP32")], [spec("y", None, 2)])
    b = named([spec("x", None, 1, 4)], [spec("y", "INT32")])
    sig, _ = merge_signatures("m", ModelConfig(), {"a": a, "b": b})
    assert sig.inputs == (TensorSpec("x", "FP32", (1, 4)),)
    assert sig.outputs == (TensorSpec("y", "INT32", (2,)),)


def test_named_variants_with_different_input_names() -> None:
    tf = named([spec("a", "FP32", -1, 3), spec("c", "INT64", -1)], [spec("y", "FP32", -1, 2)])
    with pytest.raises(ConfigError) as e:
        merge_signatures("mdl", ModelConfig(), {"onnx": ONNX, "tf": tf})
    msg = str(e.value)
    assert "model 'mdl'" in msg
    assert "variant 'onnx'" in msg and "variant 'tf'" in msg
    assert "'c'" in msg and "'b'" in msg


def test_named_variants_with_different_output_names() -> None:
    tf = named([spec("a", "FP32", -1, 3), spec("b", "INT64", -1)], [spec("z", "FP32", -1, 2)])
    with pytest.raises(ConfigError, match=r"model 'mdl'.*variant 'tf'.*outputs.*variant 'onnx'"):
        merge_signatures("mdl", ModelConfig(), {"onnx": ONNX, "tf": tf})


def test_named_variants_with_different_datatypes() -> None:
    tf = named([spec("a", "FP64", -1, 3), spec("b", "INT64", -1)], [spec("y", "FP32", -1, 2)])
    with pytest.raises(ConfigError) as e:
        merge_signatures("mdl", ModelConfig(), {"onnx": ONNX, "tf": tf})
    msg = str(e.value)
    assert "model 'mdl'" in msg
    assert "variant 'onnx'" in msg and "variant 'tf'" in msg
    assert "input 'a'" in msg
    assert "FP32" in msg and "FP64" in msg


def test_named_variants_with_different_shapes() -> None:
    tf = named([spec("a", "FP32", -1, 3), spec("b", "INT64", -1)], [spec("y", "FP32", -1, 5)])
    with pytest.raises(ConfigError) as e:
        merge_signatures("mdl", ModelConfig(), {"onnx": ONNX, "tf": tf})
    msg = str(e.value)
    assert "variant 'onnx'" in msg and "variant 'tf'" in msg
    assert "output 'y'" in msg
    assert "[-1, 2]" in msg and "[-1, 5]" in msg


def test_config_disagreeing_with_a_variant_names_config() -> None:
    cfg = config(inputs=[("a", "FP16", None), ("b", None, None)])
    with pytest.raises(ConfigError, match=r"config\.toml and variant 'onnx'.*input 'a'"):
        merge_signatures("m", cfg, {"onnx": ONNX})


def test_named_variant_must_have_the_config_names() -> None:
    cfg = config(inputs=[("a", None, None)])
    with pytest.raises(ConfigError, match=r"variant 'onnx'.*config\.toml"):
        merge_signatures("m", cfg, {"onnx": ONNX})


# ---------------------------------------------------------------- positional variants


def test_config_completes_a_positional_variant_without_names() -> None:
    ts = positional([spec(None), spec(None)], [spec(None)])
    cfg = config(
        inputs=[("a", "FP32", (-1, 3)), ("b", "INT64", (-1,))], outputs=[("y", "FP32", (-1, 2))]
    )
    sig, per_variant = merge_signatures("m", cfg, {"ts": ts})
    assert sig.inputs == (spec("a", "FP32", -1, 3), spec("b", "INT64", -1))
    assert sig.outputs == (spec("y", "FP32", -1, 2),)
    # Config order is forward() order.
    assert per_variant["ts"] == positional(list(sig.inputs), list(sig.outputs))


def test_config_completes_a_positional_variant_with_forward_names() -> None:
    ts = positional([spec("x0"), spec("x1")], [spec("output__0")])
    cfg = config(inputs=[("a", "FP32", (2,)), ("b", "FP32", (3,))], outputs=[("y", "FP32", (1,))])
    sig, per_variant = merge_signatures("m", cfg, {"ts": ts})
    assert [s.name for s in sig.inputs] == ["a", "b"]
    assert [s.name for s in per_variant["ts"].inputs] == ["a", "b"]


def test_positional_bound_by_forward_names_when_they_match() -> None:
    # torch forward(b, a); the model (ONNX sibling) says [a, b].
    ts = positional([spec("b"), spec("a")], [spec("output__0")])
    sig, per_variant = merge_signatures("m", ModelConfig(), {"onnx": ONNX, "ts": ts})
    assert [s.name for s in sig.inputs] == ["a", "b"]
    bound = per_variant["ts"]
    assert bound.positional
    assert bound.inputs == (spec("b", "INT64", -1), spec("a", "FP32", -1, 3))
    assert bound.outputs == (spec("y", "FP32", -1, 2),)


def test_forward_names_win_over_config_order() -> None:
    ts = positional([spec("b", "FP32"), spec("a", "INT32")], [spec(None, "FP32")])
    cfg = config(inputs=[("a", None, (1,)), ("b", None, (2,))], outputs=[("y", None, (1,))])
    sig, per_variant = merge_signatures("m", cfg, {"ts": ts})
    assert sig.inputs == (spec("a", "INT32", 1), spec("b", "FP32", 2))
    assert [s.name for s in per_variant["ts"].inputs] == ["b", "a"]


def test_positional_variant_datatypes_checked_at_their_bound_position() -> None:
    # forward(b, a) says a is INT32; the ONNX sibling says FP32.
    ts = positional([spec("b", "INT64"), spec("a", "INT32")], [spec(None)])
    with pytest.raises(ConfigError, match=r"variant 'onnx' and variant 'ts'.*input 'a'"):
        merge_signatures("m", ModelConfig(), {"onnx": ONNX, "ts": ts})


def test_single_positional_tensor_needs_no_config() -> None:
    onnx = named([spec("x", "FP32", -1, 4)], [spec("y", "FP32", -1, 1)])
    ts = positional([spec("input")], [spec(None)])
    sig, per_variant = merge_signatures("m", ModelConfig(), {"onnx": onnx, "ts": ts})
    assert sig.inputs == (spec("x", "FP32", -1, 4),)
    assert per_variant["ts"].inputs == sig.inputs
    assert per_variant["ts"].outputs == sig.outputs


def test_positional_only_model_takes_its_own_names() -> None:
    ts = positional(
        [spec("x", "FP32", 2), spec("z", "INT64", 3)],
        [spec(None, "FP32", 1), spec(None, "BOOL", 1)],
    )
    sig, per_variant = merge_signatures("m", ModelConfig(), {"ts": ts})
    assert [s.name for s in sig.inputs] == ["x", "z"]
    assert [s.name for s in sig.outputs] == ["output__0", "output__1"]
    assert per_variant["ts"].inputs == sig.inputs


def test_multiple_positional_tensors_without_config_or_matching_names() -> None:
    ts = positional([spec("p"), spec("q")], [spec(None)])
    with pytest.raises(ConfigError) as e:
        merge_signatures("mdl", ModelConfig(), {"onnx": ONNX, "ts": ts})
    msg = str(e.value)
    assert "variant 'ts'" in msg
    assert "[[input]]" in msg
    assert "mdl/config.toml" in msg


def test_multiple_positional_outputs_without_names_need_output_tables() -> None:
    onnx = named([spec("x", "FP32", 1)], [spec("y1", "FP32", 1), spec("y2", "FP32", 1)])
    ts = positional([spec("x")], [spec(None), spec(None)])
    with pytest.raises(ConfigError, match=r"\[\[output\]\]"):
        merge_signatures("m", ModelConfig(), {"onnx": onnx, "ts": ts})


def test_positional_tensor_count_must_match() -> None:
    ts = positional([spec("a")], [spec(None)])
    with pytest.raises(ConfigError, match=r"variant 'ts'.*1 inputs.*2"):
        merge_signatures("m", ModelConfig(), {"onnx": ONNX, "ts": ts})


def test_incomplete_signature_suggests_config_toml() -> None:
    ts = positional([spec("x", None, 1)], [spec(None, "FP32", 1)])
    with pytest.raises(ConfigError) as e:
        merge_signatures("mdl", ModelConfig(), {"ts": ts})
    msg = str(e.value)
    assert "input 'x' has no datatype" in msg
    assert "[[input]]" in msg and 'name = "x"' in msg
    assert "mdl/config.toml" in msg


def test_incomplete_shape_suggests_config_toml() -> None:
    onnx = named([spec("x", "FP32")], [spec("y", "FP32", 1)])
    with pytest.raises(ConfigError, match=r"input 'x' has no shape.*config\.toml"):
        merge_signatures("m", ModelConfig(), {"onnx": onnx})


# ---------------------------------------------------------------- batching


def test_max_batch_size_with_variable_first_dims() -> None:
    sig, _ = merge_signatures("m", config(max_batch_size=4), {"onnx": ONNX})
    assert sig.max_batch_size == 4


@pytest.mark.parametrize(
    "variant",
    [
        named([spec("a", "FP32", 2, 3)], [spec("y", "FP32", -1)]),
        named([spec("a", "FP32", -1, 3)], [spec("y", "FP32", 2)]),
        named([TensorSpec("a", "FP32", ())], [spec("y", "FP32", -1)]),
    ],
)
def test_max_batch_size_needs_variable_first_dim_everywhere(variant: Signature) -> None:
    with pytest.raises(ConfigError, match=r"model 'm'.*max_batch_size = 4.*-1"):
        merge_signatures("m", config(max_batch_size=4), {"v": variant})


# ---------------------------------------------------------------- validate_inputs


SIG = ModelSignature(
    inputs=(spec("a", "FP32", -1, 3), spec("b", "INT64", -1)),
    outputs=(spec("y", "FP32", -1, 2),),
    max_batch_size=4,
)


def tensor(name: str, datatype: str, *shape: int) -> InputTensor:
    return InputTensor(name, datatype, shape, np.zeros(shape))


def test_valid_inputs_pass_and_are_returned_by_name() -> None:
    a, b = tensor("a", "FP32", 2, 3), tensor("b", "INT64", 2)
    assert validate_inputs("m", SIG, [b, a]) == {"a": a.data, "b": b.data}


@pytest.mark.parametrize("batch", [1, 3, 4])
def test_variable_dims_accept_any_size_up_to_max_batch(batch: int) -> None:
    validate_inputs("m", SIG, [tensor("a", "FP32", batch, 3), tensor("b", "INT64", batch)])


def test_variable_dims_without_batching_accept_any_size() -> None:
    sig = ModelSignature((spec("t", "BYTES", -1, -1),), (), max_batch_size=0)
    for shape in [(0, 0), (1, 1000), (5000, 2)]:
        validate_inputs("m", sig, [tensor("t", "BYTES", *shape)])


def test_scalar_input() -> None:
    sig = ModelSignature((TensorSpec("s", "FP64", ()),), (), max_batch_size=0)
    validate_inputs("m", sig, [tensor("s", "FP64")])
    with pytest.raises(InvalidInput, match="input 's'"):
        validate_inputs("m", sig, [tensor("s", "FP64", 1)])


def test_unknown_input() -> None:
    with pytest.raises(InvalidInput, match=r"model 'm' has no input 'c'.*\['a', 'b'\]"):
        validate_inputs("m", SIG, [tensor("a", "FP32", 1, 3), tensor("c", "INT64", 1)])


def test_wrong_datatype() -> None:
    with pytest.raises(InvalidInput, match=r"input 'b'.*INT32.*expected INT64"):
        validate_inputs("m", SIG, [tensor("a", "FP32", 1, 3), tensor("b", "INT32", 1)])


@pytest.mark.parametrize("shape", [(3,), (1, 3, 1), ()])
def test_wrong_rank(shape: tuple[int, ...]) -> None:
    with pytest.raises(InvalidInput, match=r"input 'a'.*expected \[-1, 3\]"):
        validate_inputs("m", SIG, [tensor("a", "FP32", *shape), tensor("b", "INT64", 1)])


def test_wrong_fixed_dim() -> None:
    with pytest.raises(InvalidInput, match=r"input 'a'.*shape \[2, 4\], expected \[-1, 3\]"):
        validate_inputs("m", SIG, [tensor("a", "FP32", 2, 4), tensor("b", "INT64", 2)])


def test_batch_over_max_batch_size() -> None:
    with pytest.raises(InvalidInput, match=r"input 'a'.*batch size 5.*max_batch_size 4"):
        validate_inputs("m", SIG, [tensor("a", "FP32", 5, 3), tensor("b", "INT64", 5)])


def test_missing_input() -> None:
    with pytest.raises(InvalidInput, match=r"model 'm'.*missing input.*'b'"):
        validate_inputs("m", SIG, [tensor("a", "FP32", 1, 3)])


def test_merged_signature_validates_requests() -> None:
    sig, _ = merge_signatures("m", config(max_batch_size=2), {"onnx": ONNX})
    validate_inputs("m", sig, [tensor("a", "FP32", 2, 3), tensor("b", "INT64", 2)])
    with pytest.raises(InvalidInput, match="batch size 3"):
        validate_inputs("m", sig, [tensor("a", "FP32", 3, 3), tensor("b", "INT64", 3)])


def test_two_positional_variants_bound_by_their_own_forward_names() -> None:
    first = positional([spec("a", "FP32", 1), spec("b", "INT64", 2)], [spec(None, "FP32", 1)])
    second = positional([spec("b"), spec("a")], [spec(None)])
    sig, per_variant = merge_signatures("m", ModelConfig(), {"t1": first, "t2": second})
    assert [s.name for s in sig.inputs] == ["a", "b"]
    assert [s.name for s in per_variant["t1"].inputs] == ["a", "b"]
    assert per_variant["t2"].inputs == (spec("b", "INT64", 2), spec("a", "FP32", 1))


# ---------------------------------------------------------------- narrowing -1 to a size


def test_config_narrows_a_dynamic_onnx_axis() -> None:
    onnx = named([spec("x", "FP32", -1, -1)], [spec("y", "FP32", -1, -1)])
    cfg = config(inputs=[("x", None, (-1, 64))], outputs=[("y", "FP32", (-1, 64))])
    sig, _ = merge_signatures("m", cfg, {"onnx": onnx})
    assert sig.inputs == (spec("x", "FP32", -1, 64),)
    assert sig.outputs == (spec("y", "FP32", -1, 64),)
    validate_inputs("m", sig, [tensor("x", "FP32", 3, 64)])
    with pytest.raises(InvalidInput, match=r"input 'x'.*shape \[3, 32\], expected \[-1, 64\]"):
        validate_inputs("m", sig, [tensor("x", "FP32", 3, 32)])


def test_config_narrows_a_positional_string_list() -> None:
    # TorchScript forward() -> Tuple[Tensor, List[str]]: the list is BYTES [-1].
    ts = positional([spec("x")], [spec(None), spec(None, "BYTES", -1)])
    cfg = config(
        inputs=[("INPUT__0", "FP32", (16,))],
        outputs=[("OUTPUT__0", "FP32", (16,)), ("OUTPUT__1", "BYTES", (16,))],
    )
    sig, per_variant = merge_signatures("m", cfg, {"torch": ts})
    assert sig.outputs[1] == spec("OUTPUT__1", "BYTES", 16)
    assert per_variant["torch"].outputs[1] == spec("OUTPUT__1", "BYTES", 16)


@pytest.mark.parametrize("order", [("loose", "tight"), ("tight", "loose")])
def test_the_more_specific_variant_wins_in_either_order(order: tuple[str, str]) -> None:
    variants = {
        "loose": named([spec("x", "FP32", -1, -1)], [spec("y", "FP32", -1)]),
        "tight": named([spec("x", "FP32", -1, 64)], [spec("y", "FP32", 8)]),
    }
    sig, _ = merge_signatures("m", ModelConfig(), {v: variants[v] for v in order})
    assert sig.inputs == (spec("x", "FP32", -1, 64),)
    assert sig.outputs == (spec("y", "FP32", 8),)


def test_each_source_may_fix_a_different_dimension() -> None:
    a = named([spec("x", "FP32", 4, -1)], [spec("y", "FP32", -1)])
    b = named([spec("x", "FP32", -1, 64)], [spec("y", "FP32", -1)])
    sig, _ = merge_signatures("m", ModelConfig(), {"a": a, "b": b})
    assert sig.inputs == (spec("x", "FP32", 4, 64),)


@pytest.mark.parametrize(
    ("theirs", "detail"),
    [
        (spec("x", "FP32", -1, 8), r"FP32 \[-1, 16\] vs FP32 \[-1, 8\]"),
        (spec("x", "FP32", -1, 16, 1), r"FP32 \[-1, 16\] vs FP32 \[-1, 16, 1\]"),
        (spec("x", "FP64", -1, 16), r"FP32 \[-1, 16\] vs FP64 \[-1, 16\]"),
    ],
    ids=["size", "rank", "datatype"],
)
def test_real_conflicts_are_still_refused(theirs: TensorSpec, detail: str) -> None:
    cfg = config(inputs=[("x", "FP32", (-1, 16))])
    onnx = named([theirs], [spec("y", "FP32", -1)])
    with pytest.raises(
        ConfigError,
        match=r"model 'm': config\.toml and variant 'onnx' disagree on input 'x': " + detail,
    ):
        merge_signatures("m", cfg, {"onnx": onnx})


def test_a_conflict_names_the_source_that_fixed_the_dimension() -> None:
    # config.toml leaves dimension 1 open; variant 'a' fixes it to 64, 'b' says 32.
    cfg = config(inputs=[("x", "FP32", (-1, -1))])
    a = named([spec("x", "FP32", -1, 64)], [spec("y", "FP32", -1)])
    b = named([spec("x", "FP32", -1, 32)], [spec("y", "FP32", -1)])
    with pytest.raises(ConfigError, match=r"variant 'a' and variant 'b' disagree on input 'x'"):
        merge_signatures("m", cfg, {"a": a, "b": b})


def test_narrowing_the_batch_dimension_is_refused_with_max_batch_size() -> None:
    onnx = named([spec("x", "FP32", -1, -1)], [spec("y", "FP32", -1)])
    cfg = config(inputs=[("x", None, (4, 64))], max_batch_size=4)
    with pytest.raises(ConfigError, match=r"max_batch_size = 4 needs a variable first"):
        merge_signatures("m", cfg, {"onnx": onnx})
