"""Demo models as TorchScript (``torch.jit.save``), and the ``nn.Module`` every PyTorch
variant of the demo is made from. torch is imported inside the builders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .weights import layer_count


def dense_module(weights: dict[str, np.ndarray]) -> Any:
    """A ``dense_weights`` MLP as an ``nn.Module`` in eval mode: ``forward(input)``."""
    import torch

    layers: list[torch.nn.Module] = []
    n = layer_count(weights)
    for i in range(1, n + 1):
        w = weights[f"w{i}"]
        linear = torch.nn.Linear(w.shape[0], w.shape[1])
        with torch.no_grad():
            # nn.Linear stores (out, in); the numpy weights are (in, out).
            linear.weight.copy_(torch.from_numpy(np.ascontiguousarray(w.T)))
            linear.bias.copy_(torch.from_numpy(weights[f"b{i}"]))
        layers.append(linear)
        if i < n:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers).eval()


def build_dense_torchscript(path: Path, weights: dict[str, np.ndarray]) -> Path:
    """Write a ``dense_weights`` MLP as a scripted TorchScript module: forward(input)."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(dense_module(weights)), str(path))
    return path


def build_mlp_torchscript(path: Path, weights: dict[str, np.ndarray]) -> Path:
    """Write the scorer as a scripted TorchScript module to ``path``."""
    return build_dense_torchscript(path, weights)
