"""TorchScript backend: serves ``*.pt`` / ``*.ts`` files saved with ``torch.jit.save``.

TorchScript binds tensors by position and carries no tensor names, dtypes or shapes; the
signature it reports holds what ``forward()``'s schema does say (argument names, the
number of outputs, ``List[str]`` for strings). The gateway completes it from config.toml or a
sibling variant and hands the result to ``bind``, which maps model-level names onto
positions. torch is imported inside ``load``.
"""

from __future__ import annotations

import logging
import threading
import warnings
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
    Signature,
    TensorSpec,
    utf8_strings,
)

logger = logging.getLogger(__name__)

_BF16 = by_name("BF16").numpy
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
    is reentrant under ``torch.inference_mode``.
    """

    name: ClassVar[str] = "torchscript"
    platform: ClassVar[str] = "pytorch_libtorch"

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
        self._intra_threads = 0
        # OpenMP's thread count is per calling thread: torch.set_num_threads in load() does
        # not reach the pool threads that run infer(), which would then use one thread per
        # core and spin. Each infer thread sets it once (measured +67 % req/s with 2 cores).
        self._thread_state = threading.local()

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
        try:
            import torch
        except ImportError as exc:
            raise BackendUnavailable(
                f"TorchScript model {path} needs PyTorch, which is not installed: "
                f"pip install 'tensorgate[torch]' ({exc})"
            ) from exc

        self._set_threads(torch, options)
        self._intra_threads = options.intra_op_threads
        device = self._device_for(torch, options.device)
        # The codec hands over read-only views of the request buffers. Inputs are never
        # written to under inference_mode, so sharing them is safe; silence torch's
        # one-time warning about it rather than copy every request.
        warnings.filterwarnings(
            "ignore", message="The given NumPy array is not writable", category=UserWarning
        )
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
        self._path = path
        self._string_inputs = [spec.datatype == "BYTES" for spec in inputs]
        self._n_outputs = len(outputs)
        # Until bind() says otherwise, address tensors by the names the file suggests.
        self._input_names = [spec.name or f"input__{i}" for i, spec in enumerate(inputs)]
        self._output_names = [f"output__{i}" for i in range(len(outputs))]
        return Signature(inputs=tuple(inputs), outputs=tuple(outputs), positional=True)

    @staticmethod
    def _set_threads(torch: Any, options: BackendOptions) -> None:
        # Both settings are process-wide: the last TorchScript variant loaded decides the
        # intra-op pool, and the inter-op pool can only be sized before any parallel work.
        if options.intra_op_threads > 0 and torch.get_num_threads() != options.intra_op_threads:
            torch.set_num_threads(options.intra_op_threads)
        if (
            options.inter_op_threads > 0
            and torch.get_num_interop_threads() != options.inter_op_threads
        ):
            try:
                torch.set_num_interop_threads(options.inter_op_threads)
            except RuntimeError as exc:
                logger.info(
                    "torch inter-op threads stay at %d (asked for %d): %s",
                    torch.get_num_interop_threads(),
                    options.inter_op_threads,
                    exc,
                )

    @staticmethod
    def _device_for(torch: Any, device: str) -> Any:
        if device == "cpu":
            return torch.device("cpu")
        if device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise BackendError(
                    f"device {device!r} asked for, but CUDA is not available to PyTorch here"
                )
            try:
                return torch.device(device)
            except RuntimeError as exc:
                raise BackendError(f"invalid device {device!r}: {exc}") from exc
        raise BackendError(f"unsupported device {device!r}: expected 'cpu', 'cuda' or 'cuda:N'")

    def bind(self, signature: Signature) -> None:
        if len(signature.inputs) != len(self._string_inputs):
            raise BackendError(
                f"TorchScript model {self._path}: forward() takes {len(self._string_inputs)} "
                f"tensors but the model declares {len(signature.inputs)} inputs"
            )
        if len(signature.outputs) != self._n_outputs:
            raise BackendError(
                f"TorchScript model {self._path}: forward() returns {self._n_outputs} "
                f"tensors but the model declares {len(signature.outputs)} outputs"
            )
        unnamed = [s for s in (*signature.inputs, *signature.outputs) if s.name is None]
        if unnamed:
            raise BackendError(
                f"TorchScript model {self._path}: every input and output needs a name "
                "(give them in config.toml)"
            )
        self._input_names = [s.name for s in signature.inputs if s.name is not None]
        self._output_names = [s.name for s in signature.outputs if s.name is not None]

    def infer(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        module, torch = self._module, self._torch
        if module is None:
            raise BackendError("TorchScript model is not loaded")
        if self._intra_threads > 0 and not getattr(self._thread_state, "threads_set", False):
            torch.set_num_threads(self._intra_threads)
            self._thread_state.threads_set = True
        missing = [name for name in self._input_names if name not in inputs]
        if missing:
            raise BackendInputError(f"missing input(s) {', '.join(map(repr, missing))}")
        try:
            args = [
                self._to_list(name, inputs[name]) if is_str else self._to_tensor(inputs[name])
                for name, is_str in zip(self._input_names, self._string_inputs, strict=True)
            ]
            with torch.inference_mode():
                result = module(*args)
            values = list(result) if self._tuple_output else [result]
            return {
                name: self._to_numpy(value)
                for name, value in zip(self._output_names, values, strict=True)
            }
        except BackendError:
            raise
        except Exception as exc:
            raise BackendError(f"TorchScript model failed: {exc}") from exc

    def _to_tensor(self, array: np.ndarray) -> Any:
        torch = self._torch
        array = np.ascontiguousarray(array)
        if array.dtype == _BF16:
            # torch knows no numpy bfloat16: share the bits as uint16 and reinterpret.
            tensor = torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
        else:
            tensor = torch.from_numpy(array)
        return tensor if self._device.type == "cpu" else tensor.to(self._device)

    @staticmethod
    def _to_list(name: str, array: np.ndarray) -> list[str]:
        return utf8_strings(name, array, "TorchScript")

    def _to_numpy(self, value: Any) -> np.ndarray:
        torch = self._torch
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu()
            if value.dtype == torch.bfloat16:
                return value.view(torch.int16).numpy().view(_BF16)
            return value.numpy()
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return np.array([v.encode("utf-8") for v in value], dtype=object)
        raise BackendError(f"TorchScript model returned {type(value).__name__}, not a tensor")

    def unload(self) -> None:
        self._module = None
