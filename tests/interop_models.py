"""The models of the interoperability matrix (``test_tritonclient_matrix.py``): per framework,
one tensor per OIP datatype it carries, built from real framework files, and the framework's
own execution of each file to compare the gateway's answers with.

Every model maps ``in_<DT>`` to ``out_<DT>`` for each datatype ``DT``: numbers and booleans
come back reversed along their last axis (so an element out of place shows), BYTES
upper-cased. Per framework there are four models:

- ``<backend>_main_flat`` / ``<backend>_main_batched``: every datatype with a typed
  ``contents`` field (BOOL, the integers, FP32, FP64, BYTES), sent raw and typed;
- ``<backend>_half_flat`` / ``<backend>_half_batched``: FP16 and BF16, which travel raw only;

``flat`` models have no batch dimension (``max_batch_size = 0``, numbers ``[2, 3]``, BYTES
``[3]``); ``batched`` ones do (``max_batch_size = 4``, numbers ``[-1, 3]``, BYTES ``[-1]``).

Extension point: a backend that arrives later (``torch_export`` for ``.pt2``, ``litert`` for
``.tflite``) adds one ``Framework`` to ``FRAMEWORKS`` - its backend name, the datatypes it
carries, a builder and a runner - and the matrix covers it with no other change.
"""

from __future__ import annotations

import ctypes
import importlib.util
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tensorgate.datatypes import by_name
from tensorgate.server.demo import import_tensorflow, save_onnx

from .modelfactory import ONNX_TYPE_NAMES

#: Datatypes with a typed ``contents`` field, and those that travel raw only.
MAIN = ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
        "FP32", "FP64", "BYTES")  # fmt: skip
HALF = ("FP16", "BF16")
COLUMNS = 3
MAX_BATCH_SIZE = 4
ROWS = 2  # rows a request sends: the batch of a batched model, the fixed rows of a flat one


@dataclass(frozen=True)
class ModelSpec:
    """One matrix model: its name, framework, datatypes and whether it has a batch dim."""

    backend: str
    group: str  # "main" | "half"
    batched: bool
    datatypes: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.backend}_{self.group}_{'batched' if self.batched else 'flat'}"

    def shape(self, datatype: str) -> tuple[int, ...]:
        """The shape the model declares for ``in_<datatype>`` (and its output)."""
        rows = -1 if self.batched else ROWS
        if datatype == "BYTES":  # string tensors are 1-D in TorchScript and ONNX's normaliser
            return (-1,) if self.batched else (COLUMNS,)
        return (rows, COLUMNS)

    def request_shape(self, datatype: str) -> tuple[int, ...]:
        return tuple(ROWS if d == -1 else d for d in self.shape(datatype))

    def config(self, with_tables: bool) -> str:
        """config.toml: the batch size, and for positional frameworks the tensor tables."""
        text = f"max_batch_size = {MAX_BATCH_SIZE if self.batched else 0}\n"
        if with_tables:
            for kind in ("input", "output"):
                for dt in self.datatypes:
                    text += (
                        f'\n[[{kind}]]\nname = "{kind[:-3]}_{dt}"\ndatatype = "{dt}"\n'
                        f"shape = {list(self.shape(dt))}\n"
                    )
        return text


Runner = Callable[[Path, Mapping[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass(frozen=True)
class Framework:
    """A backend in the matrix: how to build its model files and run them directly."""

    backend: str
    datatypes: tuple[str, ...]
    #: Writes the model for ``spec`` into the variant directory; returns the model path.
    build: Callable[[Path, ModelSpec], Path]
    #: The framework's own execution of a model file: {in_DT: array} -> {out_DT: array}.
    run: Runner
    #: TorchScript carries no tensor names or datatypes: config.toml gives them.
    needs_tables: bool = False

    def models(self) -> list[ModelSpec]:
        groups = {"main": MAIN, "half": HALF}
        return [
            ModelSpec(self.backend, group, batched, tuple(d for d in dts if d in self.datatypes))
            for group, dts in groups.items()
            for batched in (False, True)
        ]


# --- TorchScript --------------------------------------------------------------------------

_TORCH_SOURCE = """\
from typing import List, Tuple

import torch


def reversed_columns(x: torch.Tensor) -> torch.Tensor:
    # torch.flip has no kernel for UINT16/32/64; slicing and cat work for every dtype.
    columns: List[torch.Tensor] = []
    for i in range(x.shape[-1] - 1, -1, -1):
        columns.append(x[..., i : i + 1])
    return torch.cat(columns, -1)


class Matrix(torch.nn.Module):
    def forward(self, {args}) -> Tuple[{returns}]:
        return ({values},)
"""


def build_torchscript(variant_dir: Path, spec: ModelSpec) -> Path:
    """A scripted module with one forward() argument per datatype (named like the model's
    inputs, so the gateway binds them by name)."""
    import torch

    def arg(dt: str) -> str:
        return f"in_{dt}: List[str]" if dt == "BYTES" else f"in_{dt}: torch.Tensor"

    def value(dt: str) -> str:
        return "[s.upper() for s in in_BYTES]" if dt == "BYTES" else f"reversed_columns(in_{dt})"

    source = _TORCH_SOURCE.format(
        args=", ".join(arg(dt) for dt in spec.datatypes),
        returns=", ".join(
            "List[str]" if dt == "BYTES" else "torch.Tensor" for dt in spec.datatypes
        ),
        values=", ".join(value(dt) for dt in spec.datatypes),
    )
    # TorchScript compiles from source that inspect can find: a real module file.
    source_file = variant_dir / "matrix_source.py"
    variant_dir.mkdir(parents=True, exist_ok=True)
    source_file.write_text(source)
    name = f"matrix_{spec.name}"
    loader = importlib.util.spec_from_file_location(name, source_file)
    assert loader is not None and loader.loader is not None
    module = importlib.util.module_from_spec(loader)
    sys.modules[name] = module
    loader.loader.exec_module(module)
    path = variant_dir / "model.pt"
    torch.jit.save(torch.jit.script(module.Matrix()), str(path))
    source_file.unlink()
    return path


def run_torchscript(path: Path, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    import torch

    module = torch.jit.load(str(path)).eval()
    names = [a.name for a in module.forward.schema.arguments[1:]]
    bf16 = by_name("BF16").numpy

    def tensor(array: np.ndarray) -> object:
        if array.dtype == object:
            return [v.decode() for v in array]
        if array.dtype == bf16:
            return torch.from_numpy(array.view(np.uint16).copy()).view(torch.bfloat16)
        return torch.from_numpy(array.copy())

    def numpy(value: object) -> np.ndarray:
        if isinstance(value, list):
            return np.array([v.encode() for v in value], dtype=object)
        assert isinstance(value, torch.Tensor)
        if value.dtype == torch.bfloat16:
            return value.view(torch.int16).numpy().view(bf16)
        return value.numpy()

    with torch.inference_mode():
        results = module(*(tensor(inputs[n]) for n in names))
    return {"out_" + n[3:]: numpy(r) for n, r in zip(names, results, strict=True)}


# --- TensorFlow SavedModel ----------------------------------------------------------------


def build_savedmodel(variant_dir: Path, spec: ModelSpec) -> Path:
    """``serving_default`` takes ``in_<DT>`` tensors and returns ``{"out_<DT>": ...}``."""
    tf = import_tensorflow()
    specs = [
        tf.TensorSpec(
            [None if d == -1 else d for d in spec.shape(dt)],
            tf.string if dt == "BYTES" else tf.as_dtype(by_name(dt).numpy),
            name=f"in_{dt}",
        )
        for dt in spec.datatypes
    ]

    class Matrix(tf.Module):
        @tf.function(input_signature=specs)
        def serve(self, *tensors: object) -> dict[str, object]:
            return {
                "out_" + s.name[3:]: tf.strings.upper(t)
                if s.dtype == tf.string
                else tf.reverse(t, axis=[-1])
                for s, t in zip(specs, tensors, strict=True)
            }

    module = Matrix()
    path = variant_dir / "model.savedmodel"
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    return path


def run_savedmodel(path: Path, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    tf = import_tensorflow()
    serve = tf.saved_model.load(str(path)).signatures["serving_default"]
    results = serve(**{n: tf.constant(a) for n, a in inputs.items()})
    return {n: r.numpy() for n, r in results.items()}


# --- ONNX Runtime -------------------------------------------------------------------------

_ONNX_BFLOAT16 = 16


def build_onnx(variant_dir: Path, spec: ModelSpec) -> Path:
    """Slice with step -1 on the last axis for numbers, StringNormalizer(UPPER) for BYTES."""
    from onnx import TensorProto, helper, numpy_helper

    def dims(dt: str) -> list[int | str]:
        return ["batch" if d == -1 else d for d in spec.shape(dt)]

    reverse = [
        numpy_helper.from_array(np.array([v], np.int64), name)
        for name, v in (("starts", -1), ("ends", np.iinfo(np.int64).min), ("axes", -1),
                        ("steps", -1))
    ]  # fmt: skip
    nodes, inputs, outputs = [], [], []
    for dt in spec.datatypes:
        elem = getattr(TensorProto, ONNX_TYPE_NAMES[dt])
        if dt == "BYTES":
            # The "C" locale exists everywhere (see modelfactory.build_string_onnx).
            nodes.append(
                helper.make_node(
                    "StringNormalizer",
                    [f"in_{dt}"],
                    [f"out_{dt}"],
                    case_change_action="UPPER",
                    locale="C",
                )
            )
        else:
            nodes.append(
                helper.make_node(
                    "Slice", [f"in_{dt}", "starts", "ends", "axes", "steps"], [f"out_{dt}"]
                )
            )
        inputs.append(helper.make_tensor_value_info(f"in_{dt}", elem, dims(dt)))
        outputs.append(helper.make_tensor_value_info(f"out_{dt}", elem, dims(dt)))
    graph = helper.make_graph(nodes, spec.name, inputs, outputs, initializer=reverse)
    return save_onnx(graph, variant_dir / "model.onnx")


def run_onnx(path: Path, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    bf16 = by_name("BF16").numpy
    if not any(a.dtype == bf16 for a in inputs.values()):
        feeds = {
            n: np.array([v.decode() for v in a], dtype=object) if a.dtype == object else a
            for n, a in inputs.items()
        }
        results = session.run(names, feeds)
        return {
            n: np.array([v.encode() for v in r], dtype=object) if r.dtype == object else r
            for n, r in zip(names, results, strict=True)
        }
    # onnxruntime's numpy API has no bfloat16: OrtValues in, and the raw buffer out.
    ort_value = onnxruntime.OrtValue
    feeds = {
        n: ort_value.ortvalue_from_numpy_with_onnx_type(a.view(np.uint16), _ONNX_BFLOAT16)
        if a.dtype == bf16
        else ort_value.ortvalue_from_numpy(a)
        for n, a in inputs.items()
    }
    out: dict[str, np.ndarray] = {}
    for n, value in zip(names, session.run_with_ort_values(names, feeds), strict=True):
        if value.data_type() == "tensor(bfloat16)":
            array = np.empty(value.shape(), bf16)
            ctypes.memmove(array.ctypes.data, value.data_ptr(), array.nbytes)
            out[n] = array
        else:
            out[n] = value.numpy()
    return out


ALL = MAIN + HALF

FRAMEWORKS: tuple[Framework, ...] = (
    Framework("torchscript", ALL, build_torchscript, run_torchscript, needs_tables=True),
    Framework("tf_savedmodel", ALL, build_savedmodel, run_savedmodel),
    Framework("onnxruntime", ALL, build_onnx, run_onnx),
)


def write_models(root: Path) -> dict[str, tuple[Framework, ModelSpec, Path]]:
    """Every framework's models under ``root`` (a model repository): {model name:
    (framework, spec, model file)}. Each model has one variant, named after its backend."""
    written: dict[str, tuple[Framework, ModelSpec, Path]] = {}
    for fw in FRAMEWORKS:
        for spec in fw.models():
            model_dir = root / spec.name
            path = fw.build(model_dir / fw.backend, spec)
            (model_dir / "config.toml").write_text(spec.config(fw.needs_tables))
            written[spec.name] = (fw, spec, path)
    return written


def sample_inputs(spec: ModelSpec, seed: int) -> dict[str, np.ndarray]:
    """Request data for ``spec``: integers over each type's whole range, floats with NaN,
    infinities and signed zeros among normal values, UTF-8 text with an empty string."""
    rng = np.random.default_rng(seed)
    inputs: dict[str, np.ndarray] = {}
    for dt in spec.datatypes:
        shape = spec.request_shape(dt)
        dtype = by_name(dt).numpy
        if dt == "BYTES":
            words = ["hello", "", "Grüße, world 42", "mixed Case", "ünïcode"]
            inputs[f"in_{dt}"] = np.array(
                [words[i].encode() for i in rng.integers(0, len(words), shape)], dtype=object
            )
        elif dt == "BOOL":
            inputs[f"in_{dt}"] = rng.integers(0, 2, shape).astype(bool)
        elif dt.startswith(("INT", "UINT")):
            info = np.iinfo(dtype)
            inputs[f"in_{dt}"] = rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
        else:
            values = rng.standard_normal(shape) * 100
            values.flat[:4] = [np.nan, np.inf, -np.inf, -0.0]
            inputs[f"in_{dt}"] = values.astype(dtype)
    return inputs
