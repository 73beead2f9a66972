"""Tiny real models for tests, one builder per model, each writing into the path it is given.

Frameworks are imported inside the builders, so a test module that needs only ONNX never
imports torch or tensorflow. The scorer MLP builders live in ``tensorgate.server.demo``.
"""

from __future__ import annotations

import os
from pathlib import Path

from tensorgate.server.demo import import_tensorflow, save_onnx

#: Datatypes the identity ONNX model carries, one ``in_<DT>`` -> ``out_<DT>`` pair each.
#: BF16 is not among them: onnxruntime supports a bfloat16 Identity, but its Python API can
#: fetch bfloat16 outputs only through OrtValues, which cannot hold strings, so one model
#: cannot have both BYTES inputs and BF16 outputs. ``build_identity_bf16_onnx`` covers BF16.
IDENTITY_DATATYPES: tuple[str, ...] = (
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
)

ONNX_TYPE_NAMES = {
    "BOOL": "BOOL",
    "UINT8": "UINT8",
    "UINT16": "UINT16",
    "UINT32": "UINT32",
    "UINT64": "UINT64",
    "INT8": "INT8",
    "INT16": "INT16",
    "INT32": "INT32",
    "INT64": "INT64",
    "FP16": "FLOAT16",
    "FP32": "FLOAT",
    "FP64": "DOUBLE",
    "BF16": "BFLOAT16",
    "BYTES": "STRING",
}


def build_identity_onnx(path: Path, datatypes: tuple[str, ...], name: str = "identity") -> Path:
    """An ONNX model with ``in_<DT>`` [n] -> Identity -> ``out_<DT>`` [n] per datatype."""
    from onnx import TensorProto, helper

    nodes, inputs, outputs = [], [], []
    for dt in datatypes:
        elem = getattr(TensorProto, ONNX_TYPE_NAMES[dt])
        nodes.append(helper.make_node("Identity", [f"in_{dt}"], [f"out_{dt}"]))
        inputs.append(helper.make_tensor_value_info(f"in_{dt}", elem, ["n"]))
        outputs.append(helper.make_tensor_value_info(f"out_{dt}", elem, ["n"]))
    return save_onnx(helper.make_graph(nodes, name, inputs, outputs), path)


def build_identity_all_onnx(path: Path) -> Path:
    """One ONNX model: ``in_<DT>`` [n] -> Identity -> ``out_<DT>`` [n] per
    ``IDENTITY_DATATYPES`` (every OIP datatype but BF16, see there)."""
    return build_identity_onnx(path, IDENTITY_DATATYPES, "identity_all")


def build_identity_bf16_onnx(path: Path) -> Path:
    """``in_BF16`` [n] -> Identity -> ``out_BF16`` [n], plus the same for FP32."""
    return build_identity_onnx(path, ("BF16", "FP32"), "identity_bf16")


def build_string_onnx(path: Path) -> Path:
    """StringNormalizer(UPPER): ``text`` STRING [-1] -> ``upper`` STRING [-1]."""
    from onnx import TensorProto, helper

    # The "C" locale exists everywhere; ORT's default (en_US.UTF-8) is missing from slim
    # images and fails the session. It upper-cases ASCII only, like TorchScript and TF do.
    node = helper.make_node(
        "StringNormalizer", ["text"], ["upper"], case_change_action="UPPER", locale="C"
    )
    graph = helper.make_graph(
        [node],
        "string_upper",
        [helper.make_tensor_value_info("text", TensorProto.STRING, [None])],
        [helper.make_tensor_value_info("upper", TensorProto.STRING, [None])],
    )
    return save_onnx(graph, path)


def build_string_torchscript(path: Path) -> Path:
    """A scripted ``forward(self, texts: List[str]) -> List[str]`` that upper-cases."""
    import torch

    class Upper(torch.nn.Module):
        def forward(self, texts: list[str]) -> list[str]:
            return [t.upper() for t in texts]

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(Upper()), str(path))
    return path


def build_string_savedmodel(directory: Path) -> Path:
    """``serving_default``: ``text`` tf.string [None] -> {"upper": tf.strings.upper(text)}."""
    tf = import_tensorflow()

    class Upper(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
        def serve(self, text: object) -> dict[str, object]:
            return {"upper": tf.strings.upper(text)}

    module = Upper()
    tf.saved_model.save(module, str(directory), signatures={"serving_default": module.serve})
    return directory


def build_two_output_torchscript(path: Path) -> Path:
    """A scripted ``forward(self, a, b) -> Tuple[Tensor, Tensor]`` returning (a+b, a*b)."""
    import torch

    class SumProduct(torch.nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return a + b, a * b

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(SumProduct()), str(path))
    return path


def write_broken_model(path: Path) -> Path:
    """Garbage bytes at ``path`` (name it ``model.onnx``, ``model.pt``, ``saved_model.pb``...),
    so detection finds a model file that no framework can load."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not a model\x00\xff\xfe" + os.urandom(64))
    return path


def build_labels_torchscript(path: Path) -> Path:
    """A scripted ``forward(self, x) -> Tuple[Tensor, List[str]]``: ``2 * x``, and per element
    "pos" or "neg". TorchScript says nothing of the list's length (BYTES [-1])."""
    import torch

    class Labels(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
            labels: list[str] = []
            for i in range(x.numel()):
                labels.append("pos" if bool(x[i] > 0) else "neg")
            return 2 * x, labels

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(Labels()), str(path))
    return path


def build_double_onnx(path: Path, dims: list[int | str]) -> Path:
    """``x`` FP32 -> ``y = 2 * x``, both of shape ``dims`` (a string is a dynamic axis)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    two = numpy_helper.from_array(np.array(2.0, np.float32), name="two")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["y"])],
        "double",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)],
        initializer=[two],
    )
    return save_onnx(graph, path)


def build_warmup_probe_torchscript(path: Path, refuse_zeros: bool = False) -> Path:
    """A scripted model that remembers its calls: ``x`` FP32 [rows, 4] -> ``y = 2 * x``, and
    ``seen`` FP64 [3]: (calls so far, rows of the previous call, sum of the previous call's
    input), taken before this call. The first request after a warmup thus reports what the
    warmup ran. With ``refuse_zeros`` it raises on an all-zero input."""
    import torch

    class WarmupProbe(torch.nn.Module):
        # Attribute types are inferred from __init__'s values (annotations here would be
        # strings under `from __future__ import annotations`, which TorchScript refuses).
        def __init__(self, refuse_zeros: bool) -> None:
            super().__init__()
            self.refuse_zeros = refuse_zeros
            self.calls = 0
            self.last_rows = 0
            self.last_sum = 0.0

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if self.refuse_zeros and not bool(x.any()):
                raise RuntimeError("an all-zero basket cannot be scored")
            seen = torch.tensor(
                [float(self.calls), float(self.last_rows), self.last_sum], dtype=torch.float64
            )
            self.calls += 1
            self.last_rows = x.shape[0]
            self.last_sum = float(x.sum())
            return 2 * x, seen

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(WarmupProbe(refuse_zeros)), str(path))
    return path
