"""Reduced-precision ONNX variants, made from the FP32 ``onnx`` variant's file by ONNX
Runtime's own tools, whatever framework the model came from:

- ``onnx-int8``: dynamic quantization (``onnxruntime.quantization.quantize_dynamic``): the
  weights of MatMul/Gemm/Conv... stored as int8, activations quantized per call;
- ``onnx-fp16``: every float tensor inside in float16, the inputs and outputs kept as the
  original's (``onnxruntime.transformers.float16.convert_float_to_float16``,
  ``keep_io_types=True``), so a client sends and receives what it did before.

Each result is opened by an ONNX Runtime session before it counts as produced: a file that
the runtime cannot run is reported with the runtime's reason.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

from .exporting import ExportFailed

#: Initializer types a quantized model stores its weights in (onnx.TensorProto).
_INT8_TYPES = (2, 3)  # UINT8, INT8


def check_onnxruntime(path: Path) -> None:
    """Raise ExportFailed with ONNX Runtime's reason when it cannot open ``path`` on the CPU
    (a kernel missing for a datatype, say)."""
    import onnxruntime

    try:
        onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ExportFailed(f"onnxruntime cannot run it: {exc}".strip()) from exc


def _onnx_int8(source: Path, path: Path) -> str:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # quantize_dynamic reruns ONNX shape inference, which refuses the value_info that the
    # dynamo exporter writes for transposed weights: drop it, shape inference redoes it.
    model = onnx.load(str(source))
    del model.graph.value_info[:]
    # ONNX Runtime's quantizer logs advice (pre-processing) that is not about this model.
    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        plain = Path(scratch) / "plain.onnx"
        onnx.save(model, str(plain))
        quantize_dynamic(plain, path, weight_type=QuantType.QInt8)
    quantized = onnx.load(str(path), load_external_data=False)
    if not any(t.data_type in _INT8_TYPES for t in quantized.graph.initializer):
        raise ExportFailed(
            "onnxruntime.quantization.quantize_dynamic found no weights to quantize (it "
            "quantizes MatMul, Gemm, Conv, Attention, LSTM...)"
        )
    return "ONNX Runtime dynamic quantization"


def _onnx_fp16(source: Path, path: Path) -> str:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    onnx.save(model, str(path))
    return "float16 inside, inputs and outputs as the original's"


#: Reduced ONNX precisions made from the FP32 file: precision -> (FP32 file, out) -> note.
DERIVED_ONNX: dict[str, Callable[[Path, Path], str]] = {"int8": _onnx_int8, "fp16": _onnx_fp16}


def derive_onnx(precision: str, source: Path, path: Path) -> str:
    """Write the ``precision`` variant of the FP32 ONNX model ``source`` at ``path``.
    Raises ExportFailed with ONNX Runtime's reason."""
    if not source.is_file():
        raise ExportFailed("made from the fp32 onnx variant, which was not produced")
    note = DERIVED_ONNX[precision](source, path)
    check_onnxruntime(path)
    return note
