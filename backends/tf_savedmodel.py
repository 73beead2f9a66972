"""TensorFlow SavedModel backend: serves one signature (``serving_default`` unless config says
otherwise) of a SavedModel directory.

The signature's structured input and output specs give names, dtypes and shapes, so nothing
needs to come from config. tensorflow is imported inside ``load``: it takes seconds and
hundreds of MiB, and a gateway without it still serves the other frameworks.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .base import (
    Backend,
    BackendError,
    BackendOptions,
    BackendUnavailable,
    Device,
    Signature,
    TensorSpec,
    require_inputs,
)

logger = logging.getLogger(__name__)

#: tf.DType names -> OIP datatype names.
_TF_TYPES: dict[str, str] = {
    "bool": "BOOL",
    "uint8": "UINT8",
    "uint16": "UINT16",
    "uint32": "UINT32",
    "uint64": "UINT64",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "float16": "FP16",
    "float32": "FP32",
    "float64": "FP64",
    "bfloat16": "BF16",
    "string": "BYTES",
}

DEFAULT_SIGNATURE = "serving_default"
_MARKER = "saved_model.pb"


def _import_tensorflow(path: Path) -> Any:
    # Must be set before the first import: it quiets TF's C++ start-up logging.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    try:
        import tensorflow as tf
    except ImportError as exc:
        raise BackendUnavailable(
            f"SavedModel {path} needs TensorFlow, which is not installed: "
            f"pip install 'tensorgate[tf]' ({exc})"
        ) from exc
    return tf


def _set_threads(tf: Any, options: BackendOptions) -> None:
    # Process-wide, and only settable before TensorFlow initialises its runtime: the first
    # SavedModel loaded decides for all of them.
    threading = tf.config.threading
    for wanted, get, set_, what in (
        (
            options.intra_op_threads,
            threading.get_intra_op_parallelism_threads,
            threading.set_intra_op_parallelism_threads,
            "intra-op",
        ),
        (
            options.inter_op_threads,
            threading.get_inter_op_parallelism_threads,
            threading.set_inter_op_parallelism_threads,
            "inter-op",
        ),
    ):
        if wanted <= 0 or get() == wanted:
            continue
        try:
            set_(wanted)
        except RuntimeError as exc:
            logger.info(
                "TensorFlow %s threads stay at %d (asked for %d): %s", what, get(), wanted, exc
            )


def _spec(name: str, spec: Any, path: Path, kind: str) -> TensorSpec:
    datatype = _TF_TYPES.get(spec.dtype.name)
    if datatype is None:
        raise BackendError(
            f"SavedModel {path}: {kind} {name!r} has dtype {spec.dtype.name}, which the "
            "Open Inference Protocol cannot carry"
        )
    shape = None
    if spec.shape.rank is not None:
        shape = tuple(-1 if d is None else int(d) for d in spec.shape.as_list())
    return TensorSpec(name=name, datatype=datatype, shape=shape)


class TFSavedModelBackend(Backend):
    """Serves one signature of a TF2 SavedModel through its concrete function.

    ``infer`` may be called from several threads at once: concrete functions are reentrant.
    """

    name: ClassVar[str] = "tf_savedmodel"
    platform: ClassVar[str] = "tensorflow_savedmodel"

    def __init__(self) -> None:
        self._tf: Any = None
        self._model: Any = None
        self._function: Any = None
        self._device: str | None = None
        self._input_names: tuple[str, ...] = ()
        self._output_names: tuple[str, ...] = ()

    @classmethod
    def find_model_file(cls, variant_dir: Path) -> Path | None:
        if (variant_dir / _MARKER).is_file():
            return variant_dir
        preferred = variant_dir / "model.savedmodel"
        if (preferred / _MARKER).is_file():
            return preferred
        if not variant_dir.is_dir():
            return None
        candidates = sorted(
            d for d in variant_dir.iterdir() if d.is_dir() and (d / _MARKER).is_file()
        )
        return candidates[0] if candidates else None

    def load(self, path: Path, options: BackendOptions) -> Signature:
        tf = _import_tensorflow(path)
        _set_threads(tf, options)
        device = self._device_for(tf, options.device)
        try:
            model = tf.saved_model.load(str(path))
        except Exception as exc:
            raise BackendError(f"cannot load SavedModel {path}: {exc}") from exc

        signature_name = options.signature_name or DEFAULT_SIGNATURE
        available = sorted(getattr(model, "signatures", {}) or {})
        if signature_name not in available:
            raise BackendError(
                f"SavedModel {path} has no signature {signature_name!r}; it has "
                f"{', '.join(repr(s) for s in available) or 'none'} (set signature_name "
                "in config.toml)"
            )
        function = model.signatures[signature_name]

        # Not function.inputs: that also lists the captured variable handles.
        input_specs = function.structured_input_signature[1]
        output_specs = function.structured_outputs
        if not isinstance(output_specs, Mapping):
            raise BackendError(
                f"SavedModel {path}: signature {signature_name!r} does not return a dict"
            )
        inputs = tuple(_spec(n, input_specs[n], path, "input") for n in sorted(input_specs))
        outputs = tuple(_spec(n, output_specs[n], path, "output") for n in sorted(output_specs))

        self._tf = tf
        self._model = model  # keeps the variables the function captures alive
        self._function = function
        self._device = device
        self._input_names = tuple(s.name for s in inputs if s.name is not None)
        self._output_names = tuple(s.name for s in outputs if s.name is not None)
        return Signature(inputs=inputs, outputs=outputs)

    @staticmethod
    def _device_for(tf: Any, device: Device) -> str | None:
        if device.kind == "cpu":
            return None
        gpus = tf.config.list_physical_devices("GPU")
        if device.gpu >= len(gpus):
            raise BackendError(
                f"device '{device}' asked for, but TensorFlow sees {len(gpus)} GPU(s) here"
            )
        return f"/GPU:{device.gpu}"

    def infer(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        tf, function = self._tf, self._function
        if function is None:
            raise BackendError("SavedModel is not loaded")
        wanted = self._output_names if outputs is None else outputs
        require_inputs(self._input_names, inputs)
        try:
            placement = tf.device(self._device) if self._device else contextlib.nullcontext()
            with placement:
                # Object arrays of bytes become tf.string; ml_dtypes bfloat16 is TF's own.
                feeds = {name: tf.convert_to_tensor(inputs[name]) for name in self._input_names}
                result = function(**feeds)
            return {name: result[name].numpy() for name in wanted if name in result}
        except Exception as exc:
            raise BackendError(f"TensorFlow failed: {exc}") from exc

    def unload(self) -> None:
        self._function = None
        self._model = None
