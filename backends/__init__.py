"""Framework backends behind one contract (see ``base.py``).

Backend selection is data: a name from config.toml or the file type, mapped through
``BUILTIN`` plus the ``tensorgate.backends`` entry-point group for third-party backends.
Framework modules are imported only when a backend class is first asked for.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from pathlib import Path

from .base import (
    Backend,
    BackendError,
    BackendOptions,
    BackendUnavailable,
    BackendUnreachable,
    Device,
    Signature,
    TensorSpec,
)

__all__ = [
    "BUILTIN",
    "Backend",
    "BackendError",
    "BackendOptions",
    "BackendUnavailable",
    "BackendUnreachable",
    "Device",
    "Signature",
    "TensorSpec",
    "available_names",
    "backend_class",
    "detect",
]

#: Built-in backends: config name -> "module:Class". Detection tries them in this order.
BUILTIN: dict[str, str] = {
    "torchscript": "tensorgate.backends.torchscript:TorchScriptBackend",
    "tf_savedmodel": "tensorgate.backends.tf_savedmodel:TFSavedModelBackend",
    "onnxruntime": "tensorgate.backends.onnxruntime:OnnxRuntimeBackend",
    "torch_export": "tensorgate.backends.torch_export:TorchExportBackend",
    "litert": "tensorgate.backends.litert:LiteRTBackend",
    "remote": "tensorgate.backends.remote:RemoteBackend",
}

ENTRY_POINT_GROUP = "tensorgate.backends"


def _targets() -> dict[str, str]:
    targets = dict(BUILTIN)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        targets.setdefault(ep.name, ep.value)
    return targets


def available_names() -> list[str]:
    """Every backend name config.toml may use."""
    return list(_targets())


def backend_class(name: str) -> type[Backend]:
    """The backend class registered as ``name``. Raises KeyError for an unknown name.

    Importing the backend module does not import its framework.
    """
    target = _targets()[name]
    module_name, _, attr = target.partition(":")
    cls = getattr(importlib.import_module(module_name), attr)
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise TypeError(f"{target} is not a tensorgate Backend subclass")
    return cls


def detect(variant_dir: Path) -> tuple[type[Backend], Path] | None:
    """The first backend that finds a model file in ``variant_dir``, with that file."""
    for name in _targets():
        try:
            cls = backend_class(name)
        except (ImportError, AttributeError, TypeError):
            continue
        found = cls.find_model_file(variant_dir)
        if found is not None:
            return cls, found
    return None
