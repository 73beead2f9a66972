"""What the PyTorch backends (``torchscript``, ``torch_export``) share: importing torch, its
thread pools, the device a variant runs on, the precision it computes in, and tensors in
and out of numpy.

torch is imported by ``import_torch``, from a backend's ``load``; nothing here imports it at
module level.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np

from tensorgate.datatypes import by_name, from_numpy

from .base import BackendError, BackendOptions, BackendUnavailable, Device, Signature, TensorSpec

logger = logging.getLogger(__name__)

_BF16 = by_name("BF16").numpy


def import_torch(path: Path, what: str) -> Any:
    """torch, or BackendUnavailable naming the model (``what`` ``path``) that needs it."""
    try:
        import torch
    except ImportError as exc:
        raise BackendUnavailable(
            f"{what} {path} needs PyTorch, which is not installed: "
            f"pip install 'tensorgate[torch]' ({exc})"
        ) from exc
    # The codec hands over read-only views of the request buffers. Inputs are never
    # written to under inference_mode, so sharing them is safe; silence torch's one-time
    # warning about it rather than copy every request.
    warnings.filterwarnings(
        "ignore", message="The given NumPy array is not writable", category=UserWarning
    )
    return torch


def set_process_threads(torch: Any, options: BackendOptions) -> None:
    """Size torch's intra-op and inter-op pools from the variant's options.

    Both settings are process-wide: the last PyTorch variant loaded decides the intra-op
    pool, and the inter-op pool can only be sized before any parallel work.
    """
    if options.intra_op_threads > 0 and torch.get_num_threads() != options.intra_op_threads:
        torch.set_num_threads(options.intra_op_threads)
    if options.inter_op_threads > 0 and torch.get_num_interop_threads() != options.inter_op_threads:
        try:
            torch.set_num_interop_threads(options.inter_op_threads)
        except RuntimeError as exc:
            logger.info(
                "torch inter-op threads stay at %d (asked for %d): %s",
                torch.get_num_interop_threads(),
                options.inter_op_threads,
                exc,
            )


def torch_device(torch: Any, device: Device) -> Any:
    """The ``torch.device`` for a variant's device. Raises BackendError when CUDA is not
    there, or has fewer GPUs than the number asked for."""
    if device.kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise BackendError(
            f"device '{device}' asked for, but CUDA is not available to PyTorch here"
        )
    if device.gpu >= torch.cuda.device_count():
        raise BackendError(
            f"device '{device}' asked for, but PyTorch sees {torch.cuda.device_count()} GPU(s)"
        )
    return torch.device("cuda", device.gpu)


#: What ``precision = "bf16"`` means to the PyTorch backends.
PRECISIONS = ("fp32", "bf16")


def autocast(torch: Any, device: Any, precision: str) -> Callable[[], AbstractContextManager]:
    """A factory of the context an execution runs in: torch's autocast to bfloat16 on the
    variant's device type (the CPU's, or the GPU's) for ``precision = "bf16"``, else none.
    Autocast runs matmuls, convolutions and the like in bfloat16 and keeps the ops that
    need the range (softmax, norms, reductions) in float32."""
    if precision == "fp32":
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)


class OutputCast:
    """Casts results back to the datatypes the model's signature states: what a variant
    computing in bfloat16 returns where the file returns float32. A no-op in FP32."""

    def __init__(self) -> None:
        self._dtypes: list[Any] = []

    def bind(self, torch: Any, precision: str, outputs: Sequence[TensorSpec]) -> None:
        """Called from ``Backend.bind`` with the completed signature's outputs."""
        self._dtypes = [] if precision == "fp32" else [torch_dtype(torch, s) for s in outputs]

    def __call__(self, values: Sequence[Any]) -> Sequence[Any]:
        if not self._dtypes:
            return values
        return [
            v.to(d) if d is not None and getattr(v, "dtype", d) != d else v
            for v, d in zip(values, self._dtypes, strict=True)
        ]


def torch_dtype(torch: Any, spec: TensorSpec) -> Any:
    """The ``torch.dtype`` of an OIP datatype, or None (BYTES, or not stated)."""
    if spec.datatype is None or spec.datatype == "BYTES":
        return None
    if spec.datatype == "BF16":
        return torch.bfloat16
    return torch.from_numpy(np.zeros(0, by_name(spec.datatype).numpy)).dtype


class InferThreads:
    """Applies the variant's intra-op thread count on each thread that runs ``infer``.

    OpenMP's thread count is per calling thread: ``torch.set_num_threads`` in ``load`` does
    not reach the pool threads that run ``infer``, which would then use one thread per core
    and spin. Each infer thread sets it once (measured +67 % req/s with 2 cores).
    """

    def __init__(self, torch: Any, intra_op_threads: int) -> None:
        self._torch = torch
        self._threads = intra_op_threads
        self._state = threading.local()

    def enter(self) -> None:
        """Called at the start of every ``infer``; cheap after the first call on a thread."""
        if self._threads > 0 and not getattr(self._state, "threads_set", False):
            self._torch.set_num_threads(self._threads)
            self._state.threads_set = True


def to_tensor(torch: Any, array: np.ndarray, device: Any) -> Any:
    """A request array as a tensor on ``device``, sharing its memory on the CPU."""
    array = np.ascontiguousarray(array)
    if array.dtype == _BF16:
        # torch knows no numpy bfloat16: share the bits as uint16 and reinterpret.
        tensor = torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
    else:
        tensor = torch.from_numpy(array)
    return tensor if device.type == "cpu" else tensor.to(device)


def to_numpy(torch: Any, tensor: Any) -> np.ndarray:
    """A result tensor as a numpy array on the CPU (BF16 as ml_dtypes' bfloat16)."""
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(_BF16)
    return tensor.numpy()


def oip_datatype(torch_dtype: Any) -> str | None:
    """The OIP datatype name of a ``torch.dtype`` ("FP32"), or None when the protocol has
    none (complex, quantized, float8...)."""
    name = str(torch_dtype).removeprefix("torch.")
    if name == "bfloat16":
        return "BF16"
    try:
        return from_numpy(np.dtype(name)).name
    except (TypeError, KeyError):
        return None


def positional_names(
    what: str, signature: Signature, n_inputs: int, n_outputs: int
) -> tuple[list[str], list[str]]:
    """The model-level names of a positional program's inputs and outputs, in its order,
    from the completed ``signature`` that ``Backend.bind`` receives.

    ``what`` names the model in errors ("TorchScript model m.pt"). Raises BackendError when
    the counts differ from what the program takes and returns, or a name is missing.
    """
    if len(signature.inputs) != n_inputs:
        raise BackendError(
            f"{what}: forward() takes {n_inputs} tensors but the model declares "
            f"{len(signature.inputs)} inputs"
        )
    if len(signature.outputs) != n_outputs:
        raise BackendError(
            f"{what}: forward() returns {n_outputs} tensors but the model declares "
            f"{len(signature.outputs)} outputs"
        )
    inputs = [s.name for s in signature.inputs]
    outputs = [s.name for s in signature.outputs]
    if None in inputs or None in outputs:
        raise BackendError(
            f"{what}: every input and output needs a name (give them in config.toml)"
        )
    return inputs, outputs  # type: ignore[return-value]
