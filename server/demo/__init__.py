"""The built-in demo model repository, generated from seeded numpy weights (no downloads).

``scorer`` is the "core" model: one MLP (64 -> 256 -> 256 -> 10, ReLU, FP32) with the same
weights in TorchScript, PyTorch 2 (``.pt2``), TF SavedModel and ONNX, so the variants can
back each other up and be cross-checked. ``detector`` is an "edge" model in ONNX only, and
``detector_lite`` the same detector as a LiteRT (``.tflite``) model, as edge devices run it.

One module per format writes the models (``torchscript``, ``pt2``, ``savedmodel``,
``onnxgraph``, ``litert``) from the weights in ``weights``; ``repository`` lays them out.
Frameworks are imported inside the builders; a missing one only drops its variants.
"""

from .litert import build_detector_tflite, build_mlp_tflite
from .onnxgraph import (
    ONNX_IR_VERSION,
    ONNX_OPSET,
    build_dense_onnx,
    build_detector_onnx,
    build_mlp_onnx,
    save_onnx,
)
from .pt2 import build_mlp_pt2, cpp_compiler, export_dense
from .repository import (
    MLP_TENSORS,
    SCORER_CONFIG,
    SCORER_VERSIONS,
    WIDE_MLP_CONFIG,
    scorer_config,
    write_demo_repository,
    write_wide_mlp,
)
from .savedmodel import build_dense_savedmodel, build_mlp_savedmodel, import_tensorflow
from .torchscript import build_dense_torchscript, build_mlp_torchscript, dense_module
from .weights import (
    DETECTOR_CLASSES,
    DETECTOR_FILTERS,
    MLP_SIZES,
    WIDE_MLP_SIZES,
    dense_reference,
    dense_weights,
    detector_reference,
    detector_weights,
    layer_count,
    mlp_reference,
    mlp_weights,
)

__all__ = [
    "DETECTOR_CLASSES",
    "DETECTOR_FILTERS",
    "MLP_SIZES",
    "MLP_TENSORS",
    "ONNX_IR_VERSION",
    "ONNX_OPSET",
    "SCORER_CONFIG",
    "SCORER_VERSIONS",
    "WIDE_MLP_CONFIG",
    "WIDE_MLP_SIZES",
    "build_dense_onnx",
    "build_dense_savedmodel",
    "build_dense_torchscript",
    "build_detector_onnx",
    "build_detector_tflite",
    "build_mlp_onnx",
    "build_mlp_pt2",
    "build_mlp_savedmodel",
    "build_mlp_tflite",
    "build_mlp_torchscript",
    "cpp_compiler",
    "dense_module",
    "dense_reference",
    "dense_weights",
    "detector_reference",
    "detector_weights",
    "export_dense",
    "import_tensorflow",
    "layer_count",
    "mlp_reference",
    "mlp_weights",
    "save_onnx",
    "scorer_config",
    "write_demo_repository",
    "write_wide_mlp",
]
