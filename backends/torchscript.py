"""TorchScript backend: serves ``*.pt`` / ``*.ts`` files saved with ``torch.jit.save``.

TorchScript binds tensors by position and carries no tensor names, dtypes or shapes; the
signature it reports holds what ``forward()``'s schema does say (argument names, the
number of outputs, ``List[str]`` for strings). The gateway completes it from config.toml or a
sibling variant and hands the result to ``bind``, which maps model-level names onto
positions. torch is imported inside ``load``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .base import (
    Backend,
    BackendError,
    BackendOptions,
    Signature,
    TensorSpec,
    require_inputs,
    utf8_strings,
)
from .torch_runtime import (
    PRECISIONS,
    InferThreads,
    OutputCast,
    autocast,
    import_torch,
    positional_names,
    set_process_threads,
    to_numpy,
    to_tensor,
    torch_device,
)

_STRINGS = TensorSpec(name=None, datatype="BYTES", shape=(-1,))


def _is_tensor(type_: Any) -> bool:
    if type_.kind() == "OptionalType":
        type_ = type_.getElementType()
    return type_.kind() == "TensorType"


def _is_string_list(type_: Any) -> bool:
    return type_.kind() == "ListType" and type_.getElementType().kind() == "StringType"


def _output_spec(type_: Any, path: Path) -> TensorSpec:
    if _is_tensor(type_):
        return TensorSpec(name=None)
    if _is_string_list(type_):
        return _STRINGS
    raise BackendError(
        f"TorchScript model {path}: forward() returns {type_}; tensorgate serves Tensor, "
        "List[str] or a Tuple of those"
    )


class TorchScriptBackend(Backend):
    """Serves one TorchScript module (``torch.jit.load``), in eval mode, without autograd.

    ``infer`` may be called from several threads at once: a loaded ScriptModule's forward
    is reentrant under ``torch.inference_mode``. With ``precision = "bf16"`` it runs under
    torch's autocast and returns the signature's datatypes.
    """

    name: ClassVar[str] = "torchscript"
    platform: ClassVar[str] = "pytorch_libtorch"
    precisions: ClassVar[tuple[str, ...]] = PRECISIONS

    def __init__(self) -> None:
        self._torch: Any = None
        self._module: Any = None
        self._device: Any = None
        self._path: Path | None = None
        self._input_names: list[str] = []
        self._string_inputs: list[bool] = []
        self._output_names: list[str] = []
        self._n_outputs = 0
        self._tuple_output = False
        self._threads: InferThreads | None = None
        self._precision = "fp32"
        self._autocast = autocast(None, None, "fp32")
        self._cast = OutputCast()

    @classmethod
    def find_model_file(cls, variant_dir: Path) -> Path | None:
        preferred = variant_dir / "model.pt"
        if preferred.is_file():
            return preferred
        candidates = sorted(
            p for pattern in ("*.pt", "*.ts") for p in variant_dir.glob(pattern) if p.is_file()
        )
        return candidates[0] if candidates else None

    def load(self, path: Path, options: BackendOptions) -> Signature:
        torch = import_torch(path, "TorchScript model")
        set_process_threads(torch, options)
        device = torch_device(torch, options.device)
        try:
            module = torch.jit.load(str(path), map_location=device)
            module.eval()
            schema = module.forward.schema
        except Exception as exc:
            raise BackendError(f"cannot load TorchScript model {path}: {exc}") from exc

        inputs: list[TensorSpec] = []
        for arg in schema.arguments[1:]:  # [0] is self
            if _is_string_list(arg.type):
                inputs.append(TensorSpec(name=arg.name, datatype="BYTES", shape=(-1,)))
            elif _is_tensor(arg.type):
                inputs.append(TensorSpec(name=arg.name))
            elif not arg.has_default_value():
                raise BackendError(
                    f"TorchScript model {path}: forward() argument {arg.name!r} has type "
                    f"{arg.type}; tensorgate can pass Tensor or List[str] arguments only"
                )
            # Other arguments with a default keep it: the protocol has no way to set them.

        returns = schema.returns
        if len(returns) != 1:
            raise BackendError(f"TorchScript model {path}: unexpected forward() schema {schema}")
        ret = returns[0].type
        if ret.kind() == "TupleType":
            outputs = [_output_spec(t, path) for t in ret.elements()]
            self._tuple_output = True
        else:
            outputs = [_output_spec(ret, path)]
            self._tuple_output = False

        self._torch = torch
        self._module = module
        self._device = device
        self._threads = InferThreads(torch, options.intra_op_threads)
        self._precision = options.precision
        self._autocast = autocast(torch, device, options.precision)
        self._path = path
        self._string_inputs = [spec.datatype == "BYTES" for spec in inputs]
        self._n_outputs = len(outputs)
        # Until bind() says otherwise, address tensors by the names the file suggests.
        self._input_names = [spec.name or f"input__{i}" for i, spec in enumerate(inputs)]
        self._output_names = [f"output__{i}" for i in range(len(outputs))]
        return Signature(inputs=tuple(inputs), outputs=tuple(outputs), positional=True)

    def bind(self, signature: Signature) -> None:
        self._input_names, self._output_names = positional_names(
            f"TorchScript model {self._path}", signature, len(self._string_inputs), self._n_outputs
        )
        self._cast.bind(self._torch, self._precision, signature.outputs)

    def infer(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        module, torch = self._module, self._torch
        if module is None or self._threads is None:
            raise BackendError("TorchScript model is not loaded")
        self._threads.enter()
        require_inputs(self._input_names, inputs)
        try:
            args = [
                self._to_list(name, inputs[name])
                if is_str
                else to_tensor(torch, inputs[name], self._device)
                for name, is_str in zip(self._input_names, self._string_inputs, strict=True)
            ]
            with torch.inference_mode(), self._autocast():
                result = module(*args)
            values = self._cast(list(result) if self._tuple_output else [result])
            return {
                name: self._to_numpy(value)
                for name, value in zip(self._output_names, values, strict=True)
            }
        except BackendError:
            raise
        except Exception as exc:
            raise BackendError(f"TorchScript model failed: {exc}") from exc

    @staticmethod
    def _to_list(name: str, array: np.ndarray) -> list[str]:
        return utf8_strings(name, array, "TorchScript")

    def _to_numpy(self, value: Any) -> np.ndarray:
        torch = self._torch
        if isinstance(value, torch.Tensor):
            return to_numpy(torch, value)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return np.array([v.encode("utf-8") for v in value], dtype=object)
        raise BackendError(f"TorchScript model returned {type(value).__name__}, not a tensor")

    def unload(self) -> None:
        self._module = None
