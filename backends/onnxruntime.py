"""ONNX Runtime backend: serves ``*.onnx`` files through an ``InferenceSession``.

ONNX models carry their full signature (names, element types, shapes), so nothing needs to
come from config. onnxruntime is imported inside ``load`` so that scanning a repository, or
serving other frameworks, never pays for it.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from tensorgate.datatypes import by_name

from .base import (
    Backend,
    BackendError,
    BackendInputError,
    BackendOptions,
    BackendUnavailable,
    Device,
    Signature,
    TensorSpec,
    utf8_strings,
)

logger = logging.getLogger(__name__)

#: ORT type strings -> OIP datatype names.
_ORT_TYPES: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(bfloat16)": "BF16",
    "tensor(string)": "BYTES",
}

# onnx.TensorProto.BFLOAT16; spelled out so that serving needs onnxruntime only, not onnx.
_ONNX_BFLOAT16 = 16
_BF16 = by_name("BF16").numpy


def _strings_in(name: str, array: np.ndarray) -> np.ndarray:
    """A BYTES tensor (object array of bytes) as ORT wants it: object array of str."""
    decoded = utf8_strings(name, array, "ONNX Runtime")
    return np.array(decoded, dtype=object).reshape(array.shape)


def _strings_out(array: np.ndarray) -> np.ndarray:
    encoded = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in array.flat]
    return np.array(encoded, dtype=object).reshape(array.shape)


def _bf16_from_ortvalue(value: Any) -> np.ndarray:
    # onnxruntime has no numpy type for bfloat16 (OrtValue.numpy() raises), so copy the raw
    # buffer into an ml_dtypes array.
    if value.device_name().lower() != "cpu":
        raise BackendError("ONNX Runtime returned a BF16 output on a device other than the CPU")
    shape = tuple(value.shape())
    out = np.empty(shape, dtype=_BF16)
    if out.nbytes:
        ctypes.memmove(out.ctypes.data, value.data_ptr(), out.nbytes)
    return out


class OnnxRuntimeBackend(Backend):
    """Serves one ``.onnx`` file with onnxruntime (CPU, or CUDA when asked for and present).

    ``infer`` may be called from several threads at once: ``InferenceSession.run`` is
    thread-safe.
    """

    name: ClassVar[str] = "onnxruntime"
    platform: ClassVar[str] = "onnxruntime_onnx"

    def __init__(self) -> None:
        self._ort: Any = None
        self._session: Any = None
        self._path: Path | None = None
        self._input_types: dict[str, str] = {}
        self._output_types: dict[str, str] = {}

    @classmethod
    def find_model_file(cls, variant_dir: Path) -> Path | None:
        preferred = variant_dir / "model.onnx"
        if preferred.is_file():
            return preferred
        candidates = sorted(p for p in variant_dir.glob("*.onnx") if p.is_file())
        return candidates[0] if candidates else None

    def load(self, path: Path, options: BackendOptions) -> Signature:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendUnavailable(
                f"ONNX model {path} needs ONNX Runtime, which is not installed: "
                f"pip install 'tensorgate[onnx]' ({exc})"
            ) from exc

        providers = self._providers(ort, options.device)
        session_options = ort.SessionOptions()
        # 0 lets onnxruntime choose; the defaults in BackendOptions are 1 because idle
        # pools that spin steal the cores the other runtimes in this process need.
        if options.intra_op_threads > 0:
            session_options.intra_op_num_threads = options.intra_op_threads
        if options.inter_op_threads > 0:
            session_options.inter_op_num_threads = options.inter_op_threads
        session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session_options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        try:
            session = ort.InferenceSession(str(path), session_options, providers=providers)
        except Exception as exc:
            raise BackendError(f"cannot load ONNX model {path}: {exc}") from exc

        inputs = tuple(self._spec(arg, path, "input") for arg in session.get_inputs())
        outputs = tuple(self._spec(arg, path, "output") for arg in session.get_outputs())
        self._ort = ort
        self._session = session
        self._path = path
        self._input_types = {s.name: s.datatype for s in inputs if s.name and s.datatype}
        self._output_types = {s.name: s.datatype for s in outputs if s.name and s.datatype}
        self._all_outputs = list(self._output_types)
        # Outputs fetched as OrtValues (ORT's Python API returns no BF16 numpy arrays).
        self._bf16_outputs = frozenset(n for n, t in self._output_types.items() if t == "BF16")
        logger.debug("loaded %s with providers %s", path, session.get_providers())
        return Signature(inputs=inputs, outputs=outputs)

    @staticmethod
    def _providers(ort: Any, device: Device) -> list[Any]:
        if device.kind == "cpu":
            return ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BackendError(
                f"device '{device}' asked for, but this onnxruntime has no "
                "CUDAExecutionProvider (install onnxruntime-gpu on a machine with CUDA)"
            )
        return [("CUDAExecutionProvider", {"device_id": device.gpu}), "CPUExecutionProvider"]

    @staticmethod
    def _spec(arg: Any, path: Path, kind: str) -> TensorSpec:
        datatype = _ORT_TYPES.get(arg.type)
        if datatype is None:
            raise BackendError(
                f"ONNX model {path}: {kind} {arg.name!r} has type {arg.type}, which the "
                "Open Inference Protocol cannot carry (tensors only)"
            )
        shape = None
        if arg.shape is not None:
            # Symbolic ('batch') and unknown (None) dimensions are both variable.
            shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape)
        return TensorSpec(name=arg.name, datatype=datatype, shape=shape)

    def infer(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        session = self._session
        if session is None:
            raise BackendError("ONNX model is not loaded")
        names = list(outputs) if outputs is not None else self._all_outputs
        bf16_out = bool(self._bf16_outputs) and not self._bf16_outputs.isdisjoint(names)

        try:
            feeds = {name: self._feed(name, a, bf16_out) for name, a in inputs.items()}
            if not bf16_out:
                results = session.run(names, feeds)
                return {
                    n: _strings_out(r) if r.dtype == object else r
                    for n, r in zip(names, results, strict=True)
                }
            values = session.run_with_ort_values(names, feeds)
            return {n: self._from_ortvalue(n, v) for n, v in zip(names, values, strict=True)}
        except BackendError:
            raise
        except Exception as exc:
            # ORT's INVALID_ARGUMENT status: these inputs fit the signature but not what the
            # graph's operators accept (e.g. an empty string tensor): the caller's to fix.
            if isinstance(exc, self._ort.capi.onnxruntime_pybind11_state.InvalidArgument):
                raise BackendInputError(f"ONNX Runtime refused the input: {exc}") from exc
            raise BackendError(f"ONNX Runtime failed: {exc}") from exc

    def _feed(self, name: str, array: np.ndarray, bf16_out: bool) -> Any:
        if self._input_types.get(name) == "BYTES" or array.dtype == object:
            if bf16_out:
                # Fetching BF16 needs OrtValues in and out, and OrtValues cannot hold strings.
                raise BackendInputError(
                    "onnxruntime's Python API cannot run a model with string inputs and "
                    f"BF16 outputs in one call (input {name!r}); ask for the non-BF16 "
                    "outputs only"
                )
            return _strings_in(name, array)
        if array.dtype == _BF16 or bf16_out:
            return self._ortvalue(array)
        # Plain numpy arrays go in as they are: ORT reads them in place.
        return array

    def _ortvalue(self, array: np.ndarray) -> Any:
        array = np.ascontiguousarray(array)
        if array.dtype == _BF16:
            # ORT can't map ml_dtypes' bfloat16 to its own type; hand it the same bits.
            return self._ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
                array.view(np.uint16), _ONNX_BFLOAT16
            )
        return self._ort.OrtValue.ortvalue_from_numpy(array)

    def _from_ortvalue(self, name: str, value: Any) -> np.ndarray:
        datatype = self._output_types.get(name)
        if datatype == "BF16":
            return _bf16_from_ortvalue(value)
        result = value.numpy()
        return _strings_out(result) if result.dtype == object else result

    def unload(self) -> None:
        self._session = None
