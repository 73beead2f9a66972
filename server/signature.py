"""One signature per model: merge what each variant's file says with config.toml, refuse
disagreements, and check requests against the result.

Named frameworks (SavedModel, ONNX) bind tensors by name; TorchScript binds them by
position, so its names are suggestions and it is matched by position (or by its
``forward()`` argument names when they are the model's names).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NoReturn

from tensorgate.backends import Signature, TensorSpec
from tensorgate.errors import ConfigError, InvalidInput
from tensorgate.inference import InputTensor

from .config import ModelConfig, TensorConfig


@dataclass(frozen=True)
class ModelSignature:
    """The completed signature every variant of a model presents."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int
    # Looked up per request: worked out once.
    output_names: tuple[str, ...] = field(init=False, compare=False, repr=False)
    _inputs_by_name: dict[str, TensorSpec] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "output_names", tuple(t.name for t in self.outputs))
        object.__setattr__(self, "_inputs_by_name", {t.name: t for t in self.inputs})

    def input(self, name: str) -> TensorSpec | None:
        return self._inputs_by_name.get(name)

    def dims(self, spec: TensorSpec) -> list[int]:
        """``spec``'s shape as Triton's ModelConfig gives it: without the batch dimension
        when the model is batched."""
        shape = list(spec.shape or ())
        return shape[1:] if self.max_batch_size > 0 else shape


def _fmt(spec: TensorSpec) -> str:
    shape = list(spec.shape) if spec.shape is not None else "?"
    return f"{spec.datatype or '?'} {shape}"


class _Merger:
    """Merges one tensor list (inputs or outputs) across sources, remembering who said what.

    Datatypes must be equal. Shapes must have the same rank and agree dimension by
    dimension, where a fixed size and -1 agree and the fixed size wins: config.toml (or a
    more specific variant) may narrow what a model file leaves open.
    """

    def __init__(self, model: str, kind: str, ref: list[TensorSpec], ref_source: str) -> None:
        self.model = model
        self.kind = kind
        self.specs = ref
        self.sources: list[dict[str, str]] = [
            {f: ref_source for f in ("datatype", "shape") if getattr(s, f) is not None} for s in ref
        ]
        # Per tensor, per dimension: the source that fixed its size (blamed on a conflict).
        self.dim_sources: list[list[str]] = [
            [ref_source] * len(s.shape) if s.shape is not None else [] for s in ref
        ]

    def names(self) -> list[str]:
        return [s.name for s in self.specs]  # type: ignore[misc]

    def absorb(self, index: int, spec: TensorSpec, source: str) -> None:
        cur = self.specs[index]
        if cur.datatype is not None and spec.datatype is not None and cur.datatype != spec.datatype:
            self._conflict(index, self.sources[index]["datatype"], spec, source)
        shape = cur.shape
        if cur.shape is not None and spec.shape is not None:
            shape = self._narrowed(index, spec, source)
        elif spec.shape is not None:
            self.dim_sources[index] = [source] * len(spec.shape)
        self.specs[index] = TensorSpec(
            cur.name,
            cur.datatype if cur.datatype is not None else spec.datatype,
            shape if shape is not None else spec.shape,
        )
        for f in ("datatype", "shape"):
            if getattr(spec, f) is not None:
                self.sources[index].setdefault(f, source)

    def _narrowed(self, index: int, spec: TensorSpec, source: str) -> tuple[int, ...]:
        mine, theirs = self.specs[index].shape, spec.shape
        assert mine is not None and theirs is not None
        if len(mine) != len(theirs):
            self._conflict(index, self.sources[index]["shape"], spec, source)
        dims = self.dim_sources[index]
        shape = []
        for i, (a, b) in enumerate(zip(mine, theirs, strict=True)):
            if a != -1 and b != -1 and a != b:
                self._conflict(index, dims[i], spec, source)
            if a == -1 and b != -1:
                dims[i] = source
            shape.append(a if a != -1 else b)
        return tuple(shape)

    def _conflict(self, index: int, theirs: str, spec: TensorSpec, source: str) -> NoReturn:
        cur = self.specs[index]
        raise ConfigError(
            f"model '{self.model}': {theirs} and {source} disagree on {self.kind} "
            f"'{cur.name}': {_fmt(cur)} vs {_fmt(spec)}; all variants of a model must "
            "present one signature"
        )


def _from_config(tables: list[TensorConfig]) -> list[TensorSpec]:
    return [
        TensorSpec(t.name, t.datatype, tuple(t.shape) if t.shape is not None else None)
        for t in tables
    ]


def merge_signatures(
    model: str, config: ModelConfig, variants: Mapping[str, Signature]
) -> tuple[ModelSignature, dict[str, Signature]]:
    """The model's signature, plus, for each positional variant, the signature in that
    variant's own positional order (to pass to ``Backend.bind``).

    Raises ConfigError naming the model, the variants and the difference.
    """
    named = {v: s for v, s in variants.items() if not s.positional}
    positional = {v: s for v, s in variants.items() if s.positional}
    # For each positional variant: {attr: [model-level index of its position 0, 1, ...]}
    orders: dict[str, dict[str, list[int]]] = {v: {} for v in positional}
    merged: dict[str, tuple[TensorSpec, ...]] = {}
    for kind in ("input", "output"):
        attr = kind + "s"
        cfg = getattr(config, kind)
        if cfg:
            ref, ref_source, ordered = _from_config(cfg), "config.toml", True
        elif named:
            first = next(iter(named))
            ref, ordered = list(getattr(named[first], attr)), False
            ref_source = f"variant '{first}'"
            named_rest = {v: s for v, s in named.items() if v != first}
        else:
            first = next(iter(positional))
            own = getattr(positional[first], attr)
            ref = [
                TensorSpec(s.name or f"{kind}__{i}", s.datatype, s.shape) for i, s in enumerate(own)
            ]
            ref_source, ordered = f"variant '{first}'", True
        m = _Merger(model, kind, ref, ref_source)
        for v, sig in (named if cfg or not named else named_rest).items():
            specs = getattr(sig, attr)
            theirs = sorted(s.name for s in specs)  # type: ignore[type-var]
            if theirs != sorted(m.names()):
                raise ConfigError(
                    f"model '{model}': variant '{v}' has {attr} {theirs} but {ref_source} has "
                    f"{sorted(m.names())}; all variants of a model must present one signature"
                )
            for s in specs:
                m.absorb(m.names().index(s.name), s, f"variant '{v}'")
        for v, sig in positional.items():
            specs = getattr(sig, attr)
            if len(specs) != len(m.specs):
                raise ConfigError(
                    f"model '{model}': variant '{v}' (TorchScript) takes/returns {len(specs)} "
                    f"{attr} but {ref_source} has {len(m.specs)} ({m.names()})"
                )
            own_names = [s.name for s in specs]
            if sorted(n for n in own_names if n) == sorted(m.names()):
                order = [m.names().index(n) for n in own_names]
            elif ordered or len(specs) == 1:
                order = list(range(len(specs)))
            else:
                raise ConfigError(
                    f"model '{model}': cannot tell which {kind} of variant '{v}' (TorchScript, "
                    f"bound by position) is which of {m.names()}; list the [[{kind}]] tables "
                    f"in {model}/config.toml in forward() order"
                )
            for pos, idx in enumerate(order):
                m.absorb(idx, specs[pos], f"variant '{v}'")
            orders[v][attr] = order
        merged[attr] = tuple(m.specs)
    for kind, specs in (("input", merged["inputs"]), ("output", merged["outputs"])):
        for s in specs:
            if not s.complete():
                missing = "datatype" if s.datatype is None else "shape"
                raise ConfigError(
                    f"model '{model}': {kind} '{s.name}' has no {missing}: the model files do "
                    f'not say it; add it to the [[{kind}]] table with name = "{s.name}" in '
                    f"{model}/config.toml"
                )
    sig = ModelSignature(merged["inputs"], merged["outputs"], config.max_batch_size)
    _check_batch_dim(model, sig)
    # Positional variants get the model's specs in their own positional order.
    per_variant = {
        v: Signature(
            tuple(sig.inputs[i] for i in o["inputs"]),
            tuple(sig.outputs[i] for i in o["outputs"]),
            positional=True,
        )
        for v, o in orders.items()
    }
    return sig, per_variant


def _check_batch_dim(model: str, sig: ModelSignature) -> None:
    if sig.max_batch_size <= 0:
        return
    for kind, specs in (("input", sig.inputs), ("output", sig.outputs)):
        for s in specs:
            if not s.shape or s.shape[0] != -1:
                raise ConfigError(
                    f"model '{model}': max_batch_size = {sig.max_batch_size} needs a variable "
                    f"first (batch) dimension, but {kind} '{s.name}' has shape "
                    f"{list(s.shape or ())}; use -1 as its first dimension or set "
                    "max_batch_size = 0"
                )


def validate_inputs(
    model: str, sig: ModelSignature, inputs: Sequence[InputTensor]
) -> dict[str, object]:
    """Check a request's inputs against the model's signature. Returns {name: array}.

    Raises InvalidInput naming the tensor and what was expected.
    """
    arrays: dict[str, object] = {}
    for t in inputs:  # plain loops: this runs for every request
        spec = sig.input(t.name)
        if spec is None:
            raise InvalidInput(
                f"model '{model}' has no input '{t.name}'; its inputs are "
                f"{[s.name for s in sig.inputs]}"
            )
        if t.datatype != spec.datatype:
            raise InvalidInput(
                f"input '{t.name}' of model '{model}': datatype {t.datatype}, expected "
                f"{spec.datatype}"
            )
        shape = spec.shape or ()
        fits = len(t.shape) == len(shape)
        if fits:
            for got, want in zip(t.shape, shape, strict=True):
                if want != -1 and got != want:
                    fits = False
                    break
        if not fits:
            raise InvalidInput(
                f"input '{t.name}' of model '{model}': shape {list(t.shape)}, expected "
                f"{list(shape)} (-1 = any size)"
            )
        if sig.max_batch_size > 0 and t.shape[0] > sig.max_batch_size:
            raise InvalidInput(
                f"input '{t.name}' of model '{model}': batch size {t.shape[0]} exceeds "
                f"max_batch_size {sig.max_batch_size}"
            )
        arrays[t.name] = t.data
    if len(arrays) != len(sig.inputs):  # every name given is the signature's (checked above)
        missing = [s.name for s in sig.inputs if s.name not in arrays]
        if missing:
            raise InvalidInput(f"model '{model}': missing input(s) {missing}")
    return arrays
