"""``tensorgate convert pytorch``: an ``nn.Module`` to TorchScript, a PyTorch 2 AOTInductor
package and ONNX, in FP32 and in reduced precisions.

The module comes from ``FILE.py:FUNCTION``: the file is imported as a module of its own and
``FUNCTION()`` returns the model. Each declared dynamic dimension (-1) becomes a
``torch.export.Dim.DYNAMIC`` for the exporters that trace through ``torch.export`` (``pt2``
and the dynamo ONNX exporter), so a model that fixes such a dimension is refused there with
the exporter's reason instead of being written with a shape nobody asked for.

Reduced precisions (``--precision``): ``fp16``/``bf16`` export a copy of the module with its
weights in that type, wrapped so that it takes and returns the original's datatypes (float
inputs cast on the way in, outputs cast back); ``int8`` exports torch's dynamic quantization
(``torch.ao.quantization.quantize_dynamic``: int8 weights for Linear and recurrent layers).
Reduced ONNX variants are made from the FP32 ONNX file instead (``precision.py``).
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tensorgate.datatypes import by_name, from_numpy

from .exporting import ExportFailed, exporter_reason
from .layout import FP32, Target
from .precision import check_onnxruntime
from .tensors import TensorDecl

#: Above this many bytes of weights an ONNX file keeps them in ``model.onnx.data`` beside
#: it (protobuf's 2 GiB limit); below, one self-contained file.
_ONNX_INLINE_WEIGHTS = 1 << 30
#: The size every dynamic dimension has in the example the exporters trace with: not 0 or
#: 1, which torch.export would specialise on.
_EXAMPLE_SIZE = 2


def _import_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise ValueError(
            "converting a PyTorch model needs torch: pip install 'tensorgate[torch]'"
        ) from None
    return torch


def load_module(spec: str) -> Any:
    """The ``nn.Module`` that ``FUNCTION()`` in ``FILE.py`` returns, in eval mode.

    Raises ValueError saying what is wrong with ``spec`` or with what it returned.
    """
    torch = _import_torch()
    file, sep, function = spec.rpartition(":")
    if not sep or not file or not function:
        raise ValueError(f"'{spec}': use FILE.py:FUNCTION (FUNCTION returns the nn.Module)")
    path = Path(file)
    if not path.is_file():
        raise ValueError(f"'{spec}': no such file {path}")
    module_name = f"_tensorgate_convert_{path.stem}"
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise ValueError(f"'{spec}': {path} cannot be imported as a Python module")
    source = importlib.util.module_from_spec(loader_spec)
    # Registered so that classes defined in the file can be found by name (pickling,
    # dataclasses, torch.jit.script's source lookup).
    sys.modules[module_name] = source
    sys.path.insert(0, str(path.parent.resolve()))  # the file's own sibling imports
    try:
        loader_spec.loader.exec_module(source)
        factory = getattr(source, function, None)
        if not callable(factory):
            raise ValueError(f"'{spec}': {path} defines no function '{function}'")
        model = factory()
    except ValueError:
        raise
    except Exception as exc:
        raise ValueError(f"'{spec}' failed: {type(exc).__name__}: {exc}") from exc
    finally:
        sys.path.remove(str(path.parent.resolve()))
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"'{spec}' returned {type(model).__name__}; it must return an nn.Module")
    return model.eval()


def _flatten(result: Any, spec: str) -> tuple[list[str | None], list[Any]]:
    """A forward() result as (names or None, tensors), in the order every exporter
    flattens it (dict insertion order, tuple order)."""
    torch = sys.modules["torch"]
    if isinstance(result, torch.Tensor):
        return [None], [result]
    if isinstance(result, Mapping):
        names, values = [str(k) for k in result], list(result.values())
    elif isinstance(result, tuple) and hasattr(result, "_fields"):
        names, values = list(result._fields), list(result)
    elif isinstance(result, (tuple, list)):
        names, values = [None] * len(result), list(result)
    else:
        names, values = [], [result]
    if not values or not all(isinstance(v, torch.Tensor) for v in values):
        raise ValueError(
            f"'{spec}': forward() returns {type(result).__name__}; convert takes models that "
            "return a tensor, a tuple or list of tensors, or a dict of tensors"
        )
    return names, values


def _output_names(names: list[str | None]) -> list[str]:
    """The model's own names when it has them, else output, output_1, ..."""
    if all(n is not None for n in names):
        return [str(n) for n in names]
    return ["output" if i == 0 else f"output_{i}" for i in range(len(names))]


@dataclass(frozen=True)
class _Prepared:
    """The module an exporter writes for one precision."""

    module: Any
    how: str  # for the note: "" for FP32, else what was done ("bfloat16 weights")
    flat: bool  # returns a tensor or a flat tuple of them, in config.toml's output order
    wrapped: bool  # a wrapper whose forward takes *args (so export's shapes nest once more)


class PyTorchSource:
    """An ``nn.Module`` and its declared inputs, converted to the ``pytorch`` targets."""

    framework = "pytorch"
    source_variant = "torch"
    targets = ("torchscript", "pt2", "onnx")
    precisions = ("fp32", "fp16", "bf16", "int8")

    def __init__(self, spec: str, inputs: Sequence[TensorDecl]) -> None:
        if not inputs:
            raise ValueError("declare every input with --input NAME:DATATYPE:SHAPE")
        if any(d.datatype == "BYTES" for d in inputs):
            raise ValueError("PyTorch models take tensors: BYTES inputs cannot be converted")
        self.description = spec
        self.inputs = tuple(inputs)
        self._torch = _import_torch()
        self.module = load_module(spec)
        self._example = self._tensors(self.example(_EXAMPLE_SIZE))
        try:
            result = self._forward(self._example)
            larger = self._forward(self._tensors(self.example(_EXAMPLE_SIZE + 1)))
        except Exception as exc:
            declared = " ".join(f"--input {d}" for d in self.inputs)
            raise ValueError(
                f"'{spec}' fails on the declared inputs ({declared}; dynamic dimensions "
                f"{_EXAMPLE_SIZE} and {_EXAMPLE_SIZE + 1} long): {type(exc).__name__}: {exc}"
            ) from exc
        self._result_type = type(result)
        names, first = self._arrays(result)
        _, second = self._arrays(larger)
        self.outputs = tuple(
            TensorDecl(
                name,
                from_numpy(a.dtype).name,
                # A dimension that follows the dynamic input dimensions is dynamic too.
                tuple(-1 if x != y else x for x, y in zip(a.shape, b.shape, strict=True)),
            )
            for name, a, b in zip(_output_names(names), first, second, strict=True)
        )

    # -- running the source model -------------------------------------------------------
    def example(self, size: int) -> dict[str, np.ndarray]:
        """Zeros shaped as declared, with every dynamic dimension ``size`` long."""
        return {
            d.name: np.zeros([size if n < 0 else n for n in d.shape], by_name(d.datatype).numpy)
            for d in self.inputs
        }

    def _tensors(self, arrays: Mapping[str, np.ndarray]) -> tuple[Any, ...]:
        return tuple(
            self._torch.from_numpy(np.ascontiguousarray(arrays[d.name])) for d in self.inputs
        )

    def _forward(self, args: tuple[Any, ...]) -> Any:
        with self._torch.inference_mode():
            return self.module(*args)

    def _arrays(self, result: Any) -> tuple[list[str | None], list[np.ndarray]]:
        names, values = _flatten(result, self.description)
        return names, [v.detach().cpu().numpy() for v in values]

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The source model's outputs for one sample: the reference every variant matches."""
        _, values = self._arrays(self._forward(self._tensors(inputs)))
        return {d.name: v for d, v in zip(self.outputs, values, strict=True)}

    # -- exporting ----------------------------------------------------------------------
    def export(self, target: Target, path: Path) -> str:
        """Write ``target``'s model file at ``path``; returns a note on how (may be empty).
        Raises ExportFailed with the exporter's reason."""
        write = {"torchscript": self._torchscript, "pt2": self._pt2, "onnx": self._onnx}
        with warnings.catch_warnings():
            # TorchScript's deprecation and tracer warnings: the parity check is what tells
            # whether the result is right.
            warnings.simplefilter("ignore")
            try:
                model = self._prepare(target.precision)
                note = write[target.name](model, path)
                if target.name == "onnx" and target.precision != FP32:
                    check_onnxruntime(path)
            except ExportFailed:
                raise
            except Exception as exc:
                raise ExportFailed(exporter_reason(exc)) from exc
        return f"{note}, {model.how}" if model.how else note

    def _prepare(self, precision: str) -> _Prepared:
        torch = self._torch
        plain = self._result_type is torch.Tensor or self._result_type is tuple
        if precision == FP32:
            return _Prepared(self.module, "", plain, wrapped=False)
        if precision == "int8":
            quantized = torch.ao.quantization.quantize_dynamic(
                copy.deepcopy(self.module), dtype=torch.qint8
            )
            if not any(
                type(m).__module__.startswith("torch.ao.nn.quantized") for m in quantized.modules()
            ):
                raise ExportFailed(
                    "torch.ao.quantization.quantize_dynamic found no layer to quantize (it "
                    "quantizes nn.Linear, nn.LSTM, nn.GRU, ...)"
                )
            return _Prepared(quantized, "dynamic int8 (torch.ao)", plain, wrapped=False)
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        out_dtypes = [by_name(d.datatype).numpy for d in self.outputs]
        torch_dtypes = [torch.from_numpy(np.zeros(0, t)).dtype for t in out_dtypes]
        wrapper = _in_precision(self.module, dtype, torch_dtypes)
        return _Prepared(wrapper, f"{dtype} weights".removeprefix("torch."), True, wrapped=True)

    def _dynamic_shapes(self, model: _Prepared) -> Any:
        dim = self._torch.export.Dim.DYNAMIC
        shapes = tuple(
            {axis: dim for axis, n in enumerate(d.shape) if n < 0} or None for d in self.inputs
        )
        return (shapes,) if model.wrapped else shapes

    def _torchscript(self, model: _Prepared, path: Path) -> str:
        torch = self._torch
        note = ""
        # Scripting keeps control flow; the TorchScript backend serves a tensor or a tuple of
        # them. Anything else (a dict, a named tuple, a list) is traced through a wrapper
        # that returns the outputs as a tuple, in the order config.toml names them. A
        # reduced-precision wrapper (forward(*args)) is traced.
        if model.flat and not model.wrapped:
            try:
                torch.jit.script(model.module).save(str(path))
                return "scripted"
            except Exception as exc:
                note = f"traced: torch.jit.script failed ({exporter_reason(exc)})"
        module = model.module if model.flat else _as_tuple(model.module)
        traced = torch.jit.trace(module, self._example, check_trace=False)
        traced.save(str(path))
        return note or "traced"

    def _pt2(self, model: _Prepared, path: Path) -> str:
        torch = self._torch
        program = torch.export.export(
            model.module, self._example, dynamic_shapes=self._dynamic_shapes(model)
        )
        torch._inductor.aoti_compile_and_package(program, package_path=str(path))
        return "AOTInductor"

    def _onnx(self, model: _Prepared, path: Path) -> str:
        torch = self._torch
        weights = sum(t.numel() * t.element_size() for t in self.module.state_dict().values())
        # The exporter warns for every torchvision op it cannot register: noise here.
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        torch.onnx.export(
            model.module,
            self._example,
            str(path),
            dynamo=True,
            input_names=[d.name for d in self.inputs],
            output_names=[d.name for d in self.outputs],
            dynamic_shapes=self._dynamic_shapes(model),
            external_data=weights > _ONNX_INLINE_WEIGHTS,
            verbose=False,
        )
        return "dynamo exporter"


def _in_precision(module: Any, dtype: Any, output_dtypes: Sequence[Any]) -> Any:
    """A copy of ``module`` with its floating-point weights in ``dtype`` that takes and
    returns what ``module`` does: float inputs are cast to ``dtype``, outputs back to
    ``output_dtypes``, as a flat tuple (a lone tensor as itself)."""
    torch = sys.modules["torch"]

    class InPrecision(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = copy.deepcopy(module).to(dtype)

        def forward(self, *args: Any) -> Any:
            cast = [a.to(dtype) if a.is_floating_point() else a for a in args]
            _, values = _flatten(self.module(*cast), "")
            values = [v.to(t) for v, t in zip(values, output_dtypes, strict=True)]
            return values[0] if len(values) == 1 else tuple(values)

    return InPrecision().eval()


def _as_tuple(module: Any) -> Any:
    """``module`` wrapped to return its outputs as a flat tuple (a lone tensor as itself)."""
    torch = sys.modules["torch"]

    class AsTuple(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = module

        def forward(self, *args: Any) -> Any:
            _, values = _flatten(self.module(*args), "")
            return values[0] if len(values) == 1 else tuple(values)

    return AsTuple()
