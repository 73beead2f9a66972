"""Demo models as ONNX graphs, written node by node with ``onnx.helper`` (no exporter).
onnx is imported inside the builders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .weights import DETECTOR_CLASSES, layer_count

#: ONNX opset and IR version of the generated models: old enough for any recent runtime
#: (Triton, onnxruntime >= 1.14), new enough for bfloat16 Identity and Softmax(axis=-1).
ONNX_OPSET = 17
ONNX_IR_VERSION = 8


def save_onnx(graph: Any, path: Path) -> Path:
    """Wrap an ONNX ``graph`` in a model pinned to ``ONNX_OPSET``/``ONNX_IR_VERSION``, check
    it and write it to ``path``.

    onnx's own defaults follow the newest spec, which released runtimes may not load yet.
    """
    import onnx

    model = onnx.helper.make_model(
        graph,
        producer_name="tensorgate",
        opset_imports=[onnx.helper.make_opsetid("", ONNX_OPSET)],
    )
    model.ir_version = ONNX_IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def build_dense_onnx(path: Path, weights: dict[str, np.ndarray], name: str = "dense") -> Path:
    """Write a ``dense_weights`` MLP as ONNX: input FP32 [batch, in] -> output FP32
    [batch, out]."""
    from onnx import TensorProto, helper, numpy_helper

    n = layer_count(weights)
    nodes, current = [], "input"
    for i in range(1, n + 1):
        gemm = "output" if i == n else f"h{i}"
        nodes.append(helper.make_node("Gemm", [current, f"w{i}", f"b{i}"], [gemm]))
        if i < n:
            nodes.append(helper.make_node("Relu", [gemm], [f"a{i}"]))
            current = f"a{i}"
    graph = helper.make_graph(
        nodes,
        name,
        [
            helper.make_tensor_value_info(
                "input", TensorProto.FLOAT, ["batch", weights["w1"].shape[0]]
            )
        ],
        [
            helper.make_tensor_value_info(
                "output", TensorProto.FLOAT, ["batch", weights[f"w{n}"].shape[1]]
            )
        ],
        initializer=[numpy_helper.from_array(v, name=k) for k, v in weights.items()],
    )
    return save_onnx(graph, path)


def build_mlp_onnx(path: Path, weights: dict[str, np.ndarray]) -> Path:
    """Write the scorer as an ONNX graph: input FP32 [batch, 64] -> output FP32 [batch, 10]."""
    return build_dense_onnx(path, weights, "scorer")


def build_detector_onnx(path: Path, weights: dict[str, np.ndarray]) -> Path:
    """Write the detector: image FP32 [batch, 3, 32, 32] -> scores FP32 [batch, 4]."""
    from onnx import TensorProto, helper, numpy_helper

    initializers = [numpy_helper.from_array(v, name=k) for k, v in weights.items()]
    nodes = [
        helper.make_node("Conv", ["image", "conv_w", "conv_b"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["features"]),
        helper.make_node("Gemm", ["features", "fc_w", "fc_b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["scores"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "detector",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", DETECTOR_CLASSES])],
        initializer=initializers,
    )
    return save_onnx(graph, path)
