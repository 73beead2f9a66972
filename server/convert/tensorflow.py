"""``tensorgate convert tensorflow``: a SavedModel to a served SavedModel, LiteRT and ONNX.

The SavedModel's ``serving_default`` signature gives the names, datatypes and shapes, read
by the same backend that serves it (``tf_savedmodel``), which also computes the reference
outputs. LiteRT comes from TensorFlow's own converter (built-in ops only: what the LiteRT
runtime runs without TensorFlow); ONNX from tf2onnx, run as its command-line tool.
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
from .layout import Target
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

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The source model's outputs for one sample."""
        return self._backend.infer(inputs)

    def export(self, target: Target, path: Path) -> str:
        """Write ``target``'s model at ``path``; raises ExportFailed with the reason."""
        write = {"savedmodel": self._savedmodel, "tflite": self._tflite, "onnx": self._onnx}
        try:
            return write[target.name](path)
        except ExportFailed:
            raise
        except Exception as exc:
            raise ExportFailed(exporter_reason(exc)) from exc

    def _savedmodel(self, path: Path) -> str:
        shutil.copytree(self.directory, path)
        return "copied"

    def _tflite(self, path: Path) -> str:
        import tensorflow as tf

        converter = tf.lite.TFLiteConverter.from_saved_model(
            str(self.directory), signature_keys=[DEFAULT_SIGNATURE]
        )
        path.write_bytes(converter.convert())
        return "TFLite converter"

    def _onnx(self, path: Path) -> str:
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
