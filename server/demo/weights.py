"""The demo models' seeded weights and their forward passes in numpy (no framework).

Every variant of a demo model is written from the same weights, and the numpy forward pass
is what tests and benchmarks compare each framework's output with.
"""

from __future__ import annotations

import itertools

import numpy as np

MLP_SIZES = (64, 256, 256, 10)
DETECTOR_CLASSES = 4
DETECTOR_FILTERS = 8

#: The benchmarks' compute-bound workload: an MLP as wide as the scorer is small. At batch
#: 1 every call streams its ~68 MB of FP32 weights from memory (~2.5 ms on one core here),
#: so the framework, not the serving path, sets the pace, and stacking requests into one
#: call (dynamic batching) reuses each weight for many rows (batch 32: ~9x the rows/s).
WIDE_MLP_SIZES = (64, 4096, 4096, 10)


def mlp_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """FP32 weights ``w1..w3`` (shape (in, out)) and biases ``b1..b3`` of the scorer MLP."""
    return dense_weights(MLP_SIZES, seed)


def mlp_reference(x: np.ndarray, weights: dict[str, np.ndarray]) -> np.ndarray:
    """The scorer's forward pass in numpy (computed in FP64, returned as FP32)."""
    return dense_reference(x, weights)


def detector_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """Conv (8x3x3x3), its bias, and the (8, 4) classifier with its bias, FP32."""
    rng = np.random.default_rng(seed)
    return {
        "conv_w": (rng.standard_normal((DETECTOR_FILTERS, 3, 3, 3)) * np.sqrt(2.0 / 27)).astype(
            np.float32
        ),
        "conv_b": (rng.standard_normal(DETECTOR_FILTERS) * 0.1).astype(np.float32),
        "fc_w": rng.standard_normal((DETECTOR_FILTERS, DETECTOR_CLASSES)).astype(np.float32),
        "fc_b": (rng.standard_normal(DETECTOR_CLASSES) * 0.1).astype(np.float32),
    }


def detector_reference(x: np.ndarray, weights: dict[str, np.ndarray]) -> np.ndarray:
    """The detector's forward pass in numpy: x FP32 [n, 3, 32, 32] -> scores FP32 [n, 4]."""
    x = np.asarray(x, dtype=np.float64)
    n, _, height, width = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    conv = np.zeros((n, DETECTOR_FILTERS, height, width))
    for dy in range(3):
        for dx in range(3):
            patch = padded[:, :, dy : dy + height, dx : dx + width]
            conv += np.einsum("nchw,fc->nfhw", patch, weights["conv_w"][:, :, dy, dx])
    conv += weights["conv_b"][None, :, None, None]
    pooled = np.maximum(conv, 0.0).mean(axis=(2, 3))
    logits = pooled @ weights["fc_w"] + weights["fc_b"]
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


def dense_weights(sizes: tuple[int, ...], seed: int = 0) -> dict[str, np.ndarray]:
    """FP32 weights ``w1..wN`` (shape (in, out)) and biases ``b1..bN`` of a ReLU MLP with
    layer widths ``sizes`` (He initialisation, like ``mlp_weights``)."""
    rng = np.random.default_rng(seed)
    weights: dict[str, np.ndarray] = {}
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes), start=1):
        weights[f"w{i}"] = (rng.standard_normal((n_in, n_out)) * np.sqrt(2.0 / n_in)).astype(
            np.float32
        )
        weights[f"b{i}"] = (rng.standard_normal(n_out) * 0.1).astype(np.float32)
    return weights


def layer_count(weights: dict[str, np.ndarray]) -> int:
    """How many layers a ``dense_weights`` MLP has."""
    return sum(1 for k in weights if k.startswith("w"))


def dense_reference(x: np.ndarray, weights: dict[str, np.ndarray]) -> np.ndarray:
    """Forward pass of a ``dense_weights`` MLP in numpy (FP64, returned as FP32)."""
    h = np.asarray(x, dtype=np.float64)
    n = layer_count(weights)
    for i in range(1, n + 1):
        h = h @ weights[f"w{i}"] + weights[f"b{i}"]
        if i < n:
            h = np.maximum(h, 0.0)
    return h.astype(np.float32)
