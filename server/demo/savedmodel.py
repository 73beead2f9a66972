"""Demo models as TensorFlow SavedModels, and the quiet TensorFlow import the TF-based
builders share. tensorflow is imported inside the builders."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from tensorgate.backends.base import BackendOptions

from .weights import layer_count


def import_tensorflow() -> Any:
    """Import tensorflow for exporting a model, quietly and with small thread pools.

    TensorFlow sizes its thread pools once per process, when it first runs anything, and
    exporting here runs it before any SavedModel backend can ask for its own setting. So
    pin the pools to the backends' default (``BackendOptions``) while that is still possible
    rather than leave them at one thread per core.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    import tensorflow as tf

    defaults = BackendOptions()
    threading = tf.config.threading
    with contextlib.suppress(RuntimeError):  # already initialised: nothing left to decide
        if threading.get_intra_op_parallelism_threads() == 0:
            threading.set_intra_op_parallelism_threads(defaults.intra_op_threads)
        if threading.get_inter_op_parallelism_threads() == 0:
            threading.set_inter_op_parallelism_threads(defaults.inter_op_threads)
    return tf


def build_dense_savedmodel(
    directory: Path, weights: dict[str, np.ndarray], name: str = "dense"
) -> Path:
    """Write a ``dense_weights`` MLP as a SavedModel: ``serving_default`` input -> output."""
    tf = import_tensorflow()
    n = layer_count(weights)
    width = weights["w1"].shape[0]

    class Dense(tf.Module):
        def __init__(self) -> None:
            super().__init__(name=name)
            self.params = {k: tf.Variable(v, name=k, trainable=False) for k, v in weights.items()}

        @tf.function(input_signature=[tf.TensorSpec([None, width], tf.float32, name="input")])
        def serve(self, x: Any) -> dict[str, Any]:
            h = x
            for i in range(1, n + 1):
                h = tf.matmul(h, self.params[f"w{i}"]) + self.params[f"b{i}"]
                if i < n:
                    h = tf.nn.relu(h)
            return {"output": h}

    module = Dense()
    tf.saved_model.save(module, str(directory), signatures={"serving_default": module.serve})
    return directory


def build_mlp_savedmodel(directory: Path, weights: dict[str, np.ndarray]) -> Path:
    """Write the scorer as a SavedModel whose ``serving_default`` maps input -> output."""
    return build_dense_savedmodel(directory, weights, name="scorer")
