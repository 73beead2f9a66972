"""``tensorgate convert tensorflow``: a SavedModel to a served SavedModel, LiteRT and ONNX.

The SavedModel's ``serving_default`` signature gives the names, datatypes and shapes, read
by the same backend that serves it (``tf_savedmodel``), which also computes the reference
outputs. LiteRT comes from TensorFlow's own converter (built-in ops only: what the LiteRT
runtime runs without TensorFlow); ONNX from tf2onnx, run as its command-line tool.

Reduced precisions (``--precision``): ``tflite-fp16`` stores the weights in float16
(``target_spec.supported_types = [tf.float16]``); ``tflite-int8`` is dynamic-range
quantization (int8 weights, ``Optimize.DEFAULT``), or full-integer quantization when
calibration samples are given (``representative_dataset``; int8 kernels only, inputs and
outputs kept in their float type). A SavedModel stays in the precision it was trained in.
Reduced ONNX variants are made from the FP32 ONNX file (``precision.py``).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tensorgate.backends import BackendError, BackendOptions
from tensorgate.backends.tf_savedmodel import DEFAULT_SIGNATURE, TFSavedModelBackend

from .exporting import ExportFailed, exporter_reason
from .layout import FP32, Target
from .tensors import TensorDecl

#: How long tf2onnx may take for one model.
_TF2ONNX_TIMEOUT_S = 1800


def _decls(specs: Any, kind: str, directory: Path) -> tuple[TensorDecl, ...]:
    out = []
    for spec in specs:
        if not spec.complete():
            raise ValueError(
                f"SavedModel {directory}: {kind} {spec.name!r} has no fixed rank or datatype "
                f"in signature {DEFAULT_SIGNATURE!r}; convert needs both"
            )
        out.append(TensorDecl(spec.name, spec.datatype, tuple(spec.shape)))
    return tuple(out)


class SavedModelSource:
    """A SavedModel directory, converted to the ``tensorflow`` targets."""

    framework = "tensorflow"
    source_variant = "tf"
    targets = ("savedmodel", "tflite", "onnx")
    precisions = ("fp32", "fp16", "int8")

    def __init__(self, directory: Path) -> None:
        if not (directory / "saved_model.pb").is_file():
            raise ValueError(f"{directory} is not a SavedModel directory (no saved_model.pb)")
        self.description = str(directory)
        self.directory = directory
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        self._backend = TFSavedModelBackend()
        try:
            signature = self._backend.load(directory, BackendOptions())
        except BackendError as exc:
            raise ValueError(str(exc)) from None
        self.inputs = _decls(signature.inputs, "input", directory)
        self.outputs = _decls(signature.outputs, "output", directory)
        #: Samples that calibrate full-integer quantization (``--calibration``); None:
        #: tflite-int8 is dynamic-range quantized.
        self.calibration: list[dict[str, np.ndarray]] | None = None

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The source model's outputs for one sample."""
        return self._backend.infer(inputs)

    def export(self, target: Target, path: Path) -> str:
        """Write ``target``'s model at ``path``; raises ExportFailed with the reason."""
        write = {"savedmodel": self._savedmodel, "tflite": self._tflite, "onnx": self._onnx}
        try:
            return write[target.name](target, path)
        except ExportFailed:
            raise
        except Exception as exc:
            raise ExportFailed(exporter_reason(exc)) from exc

    def _savedmodel(self, target: Target, path: Path) -> str:
        if target.precision != FP32:
            raise ExportFailed(
                "TensorFlow has no converter from a SavedModel to a SavedModel in "
                f"{target.precision}: its reduced-precision output is LiteRT (tflite-"
                f"{target.precision}), or convert to onnx-{target.precision}"
            )
        shutil.copytree(self.directory, path)
        return "copied"

    def _tflite(self, target: Target, path: Path) -> str:
        import tensorflow as tf

        converter = tf.lite.TFLiteConverter.from_saved_model(
            str(self.directory), signature_keys=[DEFAULT_SIGNATURE]
        )
        note = "TFLite converter"
        if target.precision == "fp16":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.target_spec.supported_types = [tf.float16]
            note += ", float16 weights"
        elif target.precision == "int8" and self.calibration is None:
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            note += ", dynamic range int8"
        elif target.precision == "int8":
            samples = self.calibration
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = lambda: iter(samples)
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            note += f", full integer int8 ({len(samples)} calibration samples)"
        path.write_bytes(converter.convert())
        return note

    def _onnx(self, target: Target, path: Path) -> str:
        if importlib.util.find_spec("tf2onnx") is None:
            raise ExportFailed(
                "needs tf2onnx, which is not installed: pip install 'tensorgate[tf]'"
            )
        # Its command-line tool is tf2onnx's documented interface; a process of its own
        # also keeps the graph-mode state it sets up out of this one.
        command = [
            sys.executable, "-m", "tf2onnx.convert",
            "--saved-model", str(self.directory),
            "--signature_def", DEFAULT_SIGNATURE,
            "--output", str(path),
        ]  # fmt: skip
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
        run = subprocess.run(
            command, capture_output=True, text=True, timeout=_TF2ONNX_TIMEOUT_S, env=env
        )
        if run.returncode != 0 or not path.is_file():
            lines = [line.strip() for line in run.stderr.splitlines() if line.strip()]
            errors = [line for line in lines if "Error" in line or "ERROR" in line]
            raise ExportFailed(
                f"tf2onnx: {(errors or lines or ['exited with status ' + str(run.returncode)])[-1]}"
            )
        return "tf2onnx"
