"""LiteRT backend: serves ``*.tflite`` files (TensorFlow Lite flatbuffers) with the
``ai-edge-litert`` interpreter, the runtime edge devices use.

The signature comes from the model. Names are the SignatureDef's keys, as
``Interpreter.get_signature_runner`` exposes them: a model converted from a SavedModel
names its input tensor ``serving_default_input:0`` but its signature input ``input``. A
model without signatures (converted from a bare function by an old converter) falls back to
its tensor names. Dtypes and shapes come from the interpreter, with ``shape_signature``'s
-1 for the dynamic dimensions; a request of another size resizes the input (and so the
interpreter's buffers) before it runs.

An interpreter is not thread-safe, so each of the variant's ``[instances]`` executions gets
one of its own; ``intra_op_threads`` is each interpreter's ``num_threads``. LiteRT runs on
the CPU here (its GPU and NPU delegates are not in the Python package). ``ai_edge_litert``
is imported inside ``load``.
"""

from __future__ import annotations

import queue
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from tensorgate.datatypes import from_numpy

from .base import (
    Backend,
    BackendError,
    BackendOptions,
    BackendUnavailable,
    Signature,
    TensorSpec,
    require_inputs,
)

#: The signature a SavedModel's converter writes, served when config.toml names none.
DEFAULT_SIGNATURE = "serving_default"


@dataclass(frozen=True)
class _Tensor:
    name: str  # model-level name: the signature key, or the tensor name
    index: int  # the interpreter's tensor index
    spec: TensorSpec


def _import_interpreter(path: Path) -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as exc:
        raise BackendUnavailable(
            f"LiteRT model {path} needs LiteRT, which is not installed: "
            f"pip install 'tensorgate[litert]' ({exc})"
        ) from exc
    return Interpreter


def _spec(name: str, details: Mapping[str, Any], path: Path, kind: str) -> TensorSpec:
    try:
        datatype = from_numpy(np.dtype(details["dtype"])).name
    except (KeyError, TypeError):
        raise BackendError(
            f"LiteRT model {path}: {kind} {name!r} has dtype {details['dtype']}, which the "
            "Open Inference Protocol cannot carry"
        ) from None
    shape = details.get("shape_signature")
    if shape is None or len(shape) != len(details["shape"]):
        shape = details["shape"]
    return TensorSpec(name=name, datatype=datatype, shape=tuple(int(d) for d in shape))


class _Instance:
    """One interpreter and the way one call runs on it."""

    def __init__(
        self, interpreter: Any, signature_key: str | None, shapes: dict[int, tuple[int, ...]]
    ) -> None:
        self.interpreter = interpreter
        self.shapes = dict(shapes)  # input tensor index -> the shape it is allocated for
        # A SignatureRunner resizes its inputs to each call's shapes and allocates before
        # it runs; without signatures the interpreter's own tensor calls do the same.
        self.runner = (
            interpreter.get_signature_runner(signature_key) if signature_key is not None else None
        )


class LiteRTBackend(Backend):
    """Serves one ``.tflite`` model: one interpreter per ``[instances]`` execution.

    ``infer`` may be called from several threads at once (up to ``instances``): each call
    takes an interpreter of its own from the pool and puts it back when done.
    """

    name: ClassVar[str] = "litert"
    platform: ClassVar[str] = "tensorflow_lite"

    def __init__(self) -> None:
        self._path: Path | None = None
        self._pool: queue.SimpleQueue[_Instance] | None = None
        self._inputs: tuple[_Tensor, ...] = ()
        self._outputs: tuple[_Tensor, ...] = ()
        self._by_signature = False

    @classmethod
    def find_model_file(cls, variant_dir: Path) -> Path | None:
        preferred = variant_dir / "model.tflite"
        if preferred.is_file():
            return preferred
        candidates = sorted(p for p in variant_dir.glob("*.tflite") if p.is_file())
        return candidates[0] if candidates else None

    def load(self, path: Path, options: BackendOptions) -> Signature:
        interpreter_cls = _import_interpreter(path)
        if options.device.kind != "cpu":
            raise BackendError(
                f"LiteRT model {path}: device '{options.device}' asked for, but LiteRT serves "
                'on the CPU only here; set device = "cpu" for this variant'
            )
        # 0 means "the framework's default", which LiteRT spells -1.
        threads = options.intra_op_threads if options.intra_op_threads > 0 else -1
        try:
            interpreters = [
                interpreter_cls(model_path=str(path), num_threads=threads)
                for _ in range(max(1, options.instances))
            ]
        except Exception as exc:
            raise BackendError(f"cannot load LiteRT model {path}: {exc}") from exc

        first = interpreters[0]
        key = self._signature_key(first, path, options.signature_name)
        if key is not None:
            runner = first.get_signature_runner(key)
            inputs = self._tensors(runner.get_input_details().items(), path, "input")
            outputs = self._tensors(runner.get_output_details().items(), path, "output")
            del runner  # a live runner would keep the interpreter from being resized
        else:
            inputs = self._tensors(
                ((d["name"], d) for d in first.get_input_details()), path, "input"
            )
            outputs = self._tensors(
                ((d["name"], d) for d in first.get_output_details()), path, "output"
            )
            try:
                for interpreter in interpreters:
                    interpreter.allocate_tensors()
            except Exception as exc:
                raise BackendError(f"cannot load LiteRT model {path}: {exc}") from exc

        shapes = {
            int(d["index"]): tuple(int(n) for n in d["shape"]) for d in first.get_input_details()
        }
        pool: queue.SimpleQueue[_Instance] = queue.SimpleQueue()
        for interpreter in interpreters:
            pool.put(_Instance(interpreter, key, shapes))
        self._path, self._pool = path, pool
        self._inputs, self._outputs = inputs, outputs
        self._by_signature = key is not None
        return Signature(
            inputs=tuple(t.spec for t in inputs), outputs=tuple(t.spec for t in outputs)
        )

    @staticmethod
    def _signature_key(interpreter: Any, path: Path, wanted: str | None) -> str | None:
        """The SignatureDef to serve: the one config.toml names, else ``serving_default``,
        else the only one; None when the model has none."""
        keys = sorted(interpreter.get_signature_list())
        if wanted is not None:
            if wanted not in keys:
                raise BackendError(
                    f"LiteRT model {path} has no signature {wanted!r}; it has "
                    f"{', '.join(map(repr, keys)) or 'none'} (set signature_name in config.toml)"
                )
            return wanted
        if not keys:
            return None
        if DEFAULT_SIGNATURE in keys:
            return DEFAULT_SIGNATURE
        if len(keys) == 1:
            return keys[0]
        raise BackendError(
            f"LiteRT model {path} has signatures {', '.join(map(repr, keys))} and none is "
            f"{DEFAULT_SIGNATURE!r}; choose one with signature_name in config.toml"
        )

    @staticmethod
    def _tensors(items: Any, path: Path, kind: str) -> tuple[_Tensor, ...]:
        return tuple(
            _Tensor(name, int(details["index"]), _spec(name, details, path, kind))
            for name, details in items
        )

    def infer(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        pool = self._pool
        if pool is None:
            raise BackendError("LiteRT model is not loaded")
        require_inputs((t.name for t in self._inputs), inputs)
        instance = pool.get()
        try:
            if self._by_signature:
                return self._run_signature(instance, inputs)
            return self._run_tensors(instance, inputs)
        except BackendError:
            raise
        except Exception as exc:
            raise BackendError(f"LiteRT failed: {exc}") from exc
        finally:
            pool.put(instance)

    def _run_signature(
        self, instance: _Instance, inputs: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        feeds = {t.name: np.ascontiguousarray(inputs[t.name]) for t in self._inputs}
        # The runner returns copies of its output buffers, safe to keep after the call.
        return dict(instance.runner(**feeds))

    def _run_tensors(
        self, instance: _Instance, inputs: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        interpreter = instance.interpreter
        resized = False
        for t in self._inputs:
            shape = inputs[t.name].shape
            if instance.shapes.get(t.index) != shape:
                interpreter.resize_tensor_input(t.index, shape)
                instance.shapes[t.index] = shape
                resized = True
        if resized:
            interpreter.allocate_tensors()
        for t in self._inputs:
            interpreter.set_tensor(t.index, np.ascontiguousarray(inputs[t.name]))
        interpreter.invoke()
        return {t.name: interpreter.get_tensor(t.index) for t in self._outputs}

    def unload(self) -> None:
        self._pool = None
