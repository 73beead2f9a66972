"""A deliberately slow ONNX model for reliability tests: the caller says how long to compute,
so a test can hold a variant's only instance busy for as long as it needs, without a sleep
inside the model and without sending large tensors.

``x`` FP32 [rows, WIDTH] and ``n`` INT64 [1] -> ``n`` times (MatMul W, Tanh) -> ``y`` FP32
[rows, WIDTH]. One step of one row costs WIDTH^2 multiply-adds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tensorgate.server.demo import save_onnx

WIDTH = 256


def slow_weight(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)


def slow_reference(x: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    w = slow_weight(seed)
    h = x.astype(np.float32)
    for _ in range(n):
        h = np.tanh(h @ w)
    return h


def slow_inputs(rows: int, steps: int, seed: int = 0) -> dict[str, np.ndarray]:
    x = np.random.default_rng(seed).standard_normal((rows, WIDTH)).astype(np.float32)
    return {"x": x, "n": np.array([steps], np.int64)}


def build_slow_onnx(path: Path, seed: int = 0) -> Path:
    """Write the model to ``path``."""
    from onnx import TensorProto, helper, numpy_helper

    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("MatMul", ["h_in", "w"], ["m"]),
            helper.make_node("Tanh", ["m"], ["h_out"]),
        ],
        "step",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_in", TensorProto.FLOAT, ["rows", WIDTH]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_out", TensorProto.FLOAT, ["rows", WIDTH]),
        ],
    )
    graph = helper.make_graph(
        [
            helper.make_node("Squeeze", ["n"], ["trips"]),
            helper.make_node("Loop", ["trips", "", "x"], ["y"], body=body),
        ],
        "slow",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", WIDTH]),
            helper.make_tensor_value_info("n", TensorProto.INT64, [1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", WIDTH])],
        initializer=[numpy_helper.from_array(slow_weight(seed), name="w")],
    )
    return save_onnx(graph, path)
