"""The backend contract: the one narrow interface every framework implements.

A backend object serves one variant (one model file). The gateway calls, in order:

1. ``load(path, options)`` once, from a worker thread: read the model, return what the file
   says about its signature;
2. ``infer(inputs, outputs)`` many times, from the variant's own worker threads (up to
   ``options.instances`` calls at once) or, for a single-instance CPU variant whose
   execution on the request is expected to be cheap and whose class allows it
   (``may_run_inline``), from the event-loop thread itself (``server/scheduler.py``);
3. ``unload()`` once, after the last ``infer`` has returned.

Backends never see protobuf, gRPC metadata or asyncio: tensors go in and out as
``dict[str, numpy.ndarray]``. BYTES tensors are numpy object arrays of ``bytes``.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import numpy as np


class BackendError(Exception):
    """Raised by a backend when a model cannot be loaded or an inference fails.

    The message is shown to the caller (RepositoryIndex reason, or the gRPC status detail),
    so it should say what went wrong in the user's terms.
    """


class BackendInputError(BackendError):
    """The request is valid for the protocol but this framework cannot take it (e.g. BYTES
    that are not UTF-8 for an ONNX string input). Reported as INVALID_ARGUMENT, never retried.
    """


class BackendUnavailable(BackendError):
    """The framework this backend needs is not installed (e.g. no TensorFlow)."""


class BackendUnreachable(BackendError):
    """What computes the model cannot be reached right now, but may be later without a
    reload (a remote server that is down, restarting or overloaded). Reported as
    UNAVAILABLE, so callers retry or fall back.
    """


@dataclass(frozen=True)
class TensorSpec:
    """One input or output as a model file or config describes it.

    ``datatype`` is an OIP name ("FP32"), ``shape`` is the whole tensor shape with -1 for a
    variable dimension (batch dimension included). ``None`` means "the source does not say";
    the repository completes it from config.toml or sibling variants.
    """

    name: str | None
    datatype: str | None = None
    shape: tuple[int, ...] | None = None

    def complete(self) -> bool:
        return self.name is not None and self.datatype is not None and self.shape is not None

    def merged(self, other: TensorSpec) -> TensorSpec:
        """Fill the fields this spec leaves open from ``other`` (this spec wins)."""
        return replace(
            self,
            name=self.name if self.name is not None else other.name,
            datatype=self.datatype if self.datatype is not None else other.datatype,
            shape=self.shape if self.shape is not None else other.shape,
        )


@dataclass(frozen=True)
class Signature:
    """Inputs and outputs of a model, in the order the model takes and returns them.

    ``positional`` is True when the framework binds tensors by position, not by name
    (TorchScript): its names are then only suggestions (forward() argument names,
    ``output__N``) and the gateway maps the model-level names onto positions.
    """

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    positional: bool = False


_DEVICE = re.compile(r"^(cpu|cuda)(?::(\d+))?$")


@dataclass(frozen=True)
class Device:
    """Where a variant computes, parsed once from config's ``device``: "cpu", "cuda" (the
    first GPU) or "cuda:N". ``str()`` gives the config spelling back."""

    kind: str  # "cpu" or "cuda"
    index: int | None = None  # the GPU; None: the first

    @classmethod
    def parse(cls, text: str) -> Device:
        """Raises BackendError for anything but "cpu", "cuda" and "cuda:N"."""
        m = _DEVICE.match(text)
        if m is None or (m.group(1) == "cpu" and m.group(2) is not None):
            raise BackendError(f"unsupported device {text!r}: expected 'cpu', 'cuda' or 'cuda:N'")
        return cls(m.group(1), int(m.group(2)) if m.group(2) is not None else None)

    @property
    def gpu(self) -> int:
        """The GPU's number (0 for plain "cuda")."""
        return self.index or 0

    def __str__(self) -> str:
        return self.kind if self.index is None else f"{self.kind}:{self.index}"


@dataclass(frozen=True)
class BackendOptions:
    """Per-variant settings a backend honours (from MODEL/config.toml). ``device`` may be
    given as its config text; it is parsed here, once (BackendError when invalid)."""

    device: Device = Device("cpu")
    intra_op_threads: int = 1
    inter_op_threads: int = 1
    instances: int = 1
    signature_name: str | None = None  # TF SavedModel signature; default "serving_default"
    # "fp32": the file's own arithmetic. "bf16": compute in bfloat16 where the framework can
    # (autocast), inputs and outputs as the signature says; only backends whose
    # ``precisions`` list it take it.
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if isinstance(self.device, str):
            object.__setattr__(self, "device", Device.parse(self.device))


class Backend(abc.ABC):
    """One loaded variant of a model, in one framework."""

    #: Name used in config.toml's ``backend = "..."`` and in metrics labels.
    name: ClassVar[str]
    #: May the gateway run ``infer`` on its event loop thread when it is fast enough? Only
    #: for backends whose calls cannot block on anything outside the process: an isolated
    #: worker or a remote server can hang, and a hang there must never freeze the gateway.
    may_run_inline: ClassVar[bool] = True
    #: Does ``infer`` take ``deadline=`` (a ``time.monotonic()`` value, or None)? A backend
    #: that waits on something else (a remote server) uses it to stop waiting when the
    #: caller has given up. Backends that say False are called without it.
    accepts_deadline: ClassVar[bool] = False
    #: Triton platform name reported by ModelMetadata/ModelConfig. A backend that only
    #: learns it at load (``remote``) may set it on the instance in ``load``.
    platform: ClassVar[str]
    #: The ``BackendOptions.precision`` values ``load`` honours; the repository refuses a
    #: variant that asks another of this backend.
    precisions: ClassVar[tuple[str, ...]] = ("fp32",)

    @classmethod
    @abc.abstractmethod
    def find_model_file(cls, variant_dir: Path) -> Path | None:
        """The model file (or directory) in ``variant_dir`` this backend can serve, or None.

        Called during repository scanning to detect the backend from the files present.
        Must not import the framework.
        """

    @abc.abstractmethod
    def load(self, path: Path, options: BackendOptions) -> Signature:
        """Load the model at ``path`` (returned earlier by ``find_model_file``).

        Called once, in a worker thread. Returns the signature as far as the file tells it.
        Raises BackendUnavailable when the framework is missing and BackendError when the
        model cannot be loaded.
        """

    def bind(self, signature: Signature) -> None:  # noqa: B027 - optional hook
        """Receive the model's completed signature once every variant is read.

        Called after ``load`` and before the first ``infer``; positional backends use it to
        map model-level tensor names onto their positions.
        """

    @abc.abstractmethod
    def infer(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Run the model. ``inputs`` are keyed by the model-level names of the signature and
        already validated against it (datatype, shape). ``outputs`` names the outputs wanted
        (None: all); a backend may return more, the gateway filters.

        Called from a worker thread, possibly concurrently up to ``options.instances``, or
        from the event-loop thread when the execution is cheap (see ``may_run_inline``).
        Raises BackendError on a failure in the framework.
        """

    def unload(self) -> None:  # noqa: B027 - optional hook
        """Release the model. Called once, after the last ``infer`` has returned."""


def require_inputs(names: Iterable[str], inputs: Mapping[str, np.ndarray]) -> None:
    """Raise BackendInputError naming every input of ``names`` that ``inputs`` lacks."""
    missing = [name for name in names if name not in inputs]
    if missing:
        raise BackendInputError(f"missing input(s) {', '.join(map(repr, missing))}")


def utf8_strings(name: str, array: np.ndarray, framework: str) -> list[str]:
    """A BYTES tensor's elements as ``str``, for frameworks whose string tensors hold text
    (ONNX Runtime, TorchScript). Raises BackendInputError naming the input when an element
    is not UTF-8: the caller's request is what the framework cannot take."""
    try:
        return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in array.flat]
    except UnicodeDecodeError as exc:
        raise BackendInputError(
            f"input {name!r}: {framework} strings must be valid UTF-8 ({exc})"
        ) from None
