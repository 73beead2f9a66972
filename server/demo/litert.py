"""Demo models as LiteRT flatbuffers (``.tflite``), made with TensorFlow's converter.
tensorflow is imported inside the builders."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .savedmodel import build_mlp_savedmodel, import_tensorflow
from .weights import DETECTOR_FILTERS


def build_detector_tflite(path: Path, weights: dict[str, np.ndarray]) -> Path:
    """Write the detector as a LiteRT model converted from a ``tf.function``: signature
    ``serving_default``, image FP32 [-1, 3, 32, 32] -> scores FP32 [-1, 4].

    The input stays channels-first, like the ONNX detector's, so either answers the same
    request; the model transposes to TensorFlow's channels-last for the convolution.
    """
    tf = import_tensorflow()
    # ONNX's Conv weight is (filters, channels, h, w); TensorFlow's is (h, w, channels, filters).
    kernel = tf.constant(np.transpose(weights["conv_w"], (2, 3, 1, 0)))
    conv_b, fc_w, fc_b = (tf.constant(weights[k]) for k in ("conv_b", "fc_w", "fc_b"))

    class Detector(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 3, 32, 32], tf.float32, name="image")])
        def serve(self, image: Any) -> dict[str, Any]:
            x = tf.transpose(image, [0, 2, 3, 1])
            # SAME padding of a 3x3, stride-1 kernel is ONNX's pads=[1, 1, 1, 1].
            conv = tf.nn.conv2d(x, kernel, strides=1, padding="SAME") + conv_b
            pooled = tf.reduce_mean(tf.nn.relu(conv), axis=[1, 2])
            pooled = tf.ensure_shape(pooled, [None, DETECTOR_FILTERS])
            return {"scores": tf.nn.softmax(tf.matmul(pooled, fc_w) + fc_b, axis=-1)}

    module = Detector()
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [module.serve.get_concrete_function()], module
    )
    return _write(path, converter.convert())


def build_mlp_tflite(path: Path, weights: dict[str, np.ndarray]) -> Path:
    """Write the scorer as a LiteRT model converted from its SavedModel, as a TensorFlow
    user would: tensors ``serving_default_input:0`` etc., signature input -> output."""
    tf = import_tensorflow()
    with tempfile.TemporaryDirectory(prefix="tensorgate-tflite-") as tmp:
        saved = build_mlp_savedmodel(Path(tmp) / "model.savedmodel", weights)
        flatbuffer = tf.lite.TFLiteConverter.from_saved_model(str(saved)).convert()
    return _write(path, flatbuffer)


def _write(path: Path, flatbuffer: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(flatbuffer)
    return path
