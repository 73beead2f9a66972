"""Typed model configuration: ``MODEL/config.toml``, validated when the model is loaded.

Every error names the file, the field and what to do about it. The schema is documented in
docs/repository.md; keep the two in step.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from tensorgate.backends.base import BackendError, Device
from tensorgate.datatypes import DATATYPES
from tensorgate.errors import ConfigError
from tensorgate.tomlconfig import TomlError, load_toml

CONFIG_FILE = "config.toml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorConfig(_Strict):
    """An ``[[input]]`` or ``[[output]]`` table: completes what a model file does not say."""

    name: str
    datatype: str | None = None
    shape: list[int] | None = None

    @field_validator("datatype")
    @classmethod
    def _known_datatype(cls, v: str | None) -> str | None:
        if v is not None and v not in DATATYPES:
            raise ValueError(f"unknown datatype '{v}'; use one of {', '.join(DATATYPES)}")
        return v

    @field_validator("shape")
    @classmethod
    def _valid_shape(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(d < -1 or d == 0 for d in v):
            raise ValueError(f"shape {v}: use positive sizes, or -1 for a variable dimension")
        return v


#: ``[variants.NAME] precision``: what a variant computes in.
PRECISIONS = ("fp32", "bf16")

#: Where a variant's backend runs: in the gateway process, or in a worker process.
Isolation = Literal["none", "process"]


def _check_device(v: str | None) -> str | None:
    if v is not None:
        try:
            Device.parse(v)  # the backends' own parser: one definition of a device
        except BackendError:
            raise ValueError(f"device '{v}': use 'cpu', 'cuda' or 'cuda:N'") from None
    return v


def _check_unique(tables: list[TensorConfig]) -> list[TensorConfig]:
    names = [t.name for t in tables]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"name(s) {twice} listed more than once")
    return tables


class VariantConfig(_Strict):
    """``[variants.NAME]``: settings for one variant, over the model-wide ones."""

    backend: str | None = None
    device: str | None = None
    intra_op_threads: Annotated[int, Field(ge=0)] | None = None
    inter_op_threads: Annotated[int, Field(ge=0)] | None = None
    signature_name: str | None = None
    isolation: Isolation | None = None
    execution_timeout_s: Annotated[float, Field(gt=0)] | None = None  # isolated variants
    # An integer model_version that pins this variant too: Triton's clients parse versions
    # as integers (perf_analyzer -x 3), so a named variant needs one to be pinned by them.
    version: Annotated[int, Field(ge=1)] | None = None
    # "bf16": serve an FP32 torch file in bfloat16 mixed precision (autocast), without
    # converting it. None: "fp32", the file's own arithmetic.
    precision: str | None = None

    _device = field_validator("device")(_check_device)

    @field_validator("precision")
    @classmethod
    def _known_precision(cls, v: str | None) -> str | None:
        if v is not None and v not in PRECISIONS:
            raise ValueError(
                f'precision \'{v}\': use "fp32" (the model file\'s own arithmetic) or "bf16" '
                "(a torchscript or torch_export variant run in bfloat16 autocast); files "
                "converted to fp16 or int8 need no key (see docs/convert.md)"
            )
        return v


class InstancesConfig(_Strict):
    """``[instances]``: executions of one variant that may run at once, and its queue."""

    count: Annotated[int, Field(ge=1, le=64)] = 1
    max_queue_size: Annotated[int, Field(ge=1)] = 1024


class BatchingConfig(_Strict):
    """``[batching]``: stack concurrent requests along the batch dimension and run them
    once. Needs the model's ``max_batch_size > 0`` (a batch dimension to stack along)."""

    max_batch_size: Annotated[int, Field(ge=1)] | None = None  # default: the model's
    max_queue_delay_us: Annotated[int, Field(ge=0, le=10_000_000)] = 500
    preferred_batch_sizes: list[Annotated[int, Field(ge=1)]] = Field(default_factory=list)


WARMUP_DATA = ("zeros", "random")


class WarmupConfig(_Strict):
    """``[warmup]``: executions of each variant, on sample data, before it reports ready, so
    that the first requests do not pay for the framework's graph optimisation. Checked
    against the model's signature when it loads (server/warmup.py)."""

    requests: Annotated[int, Field(ge=0, le=1000)] = 3  # executions per variant
    batch_size: Annotated[int, Field(ge=1)] = 1  # rows, for models with a batch dimension
    # "zeros" | "random" | a .npz file in the model folder, one array per input name
    data: str = "zeros"
    # Seconds the whole warmup of one variant may take; beyond, the variant fails to load.
    timeout_s: Annotated[float, Field(gt=0)] = 60.0

    @field_validator("data")
    @classmethod
    def _data_source(cls, v: str) -> str:
        if v in WARMUP_DATA:
            return v
        path = PurePosixPath(v)
        if path.suffix != ".npz" or path.is_absolute() or ".." in path.parts:
            raise ValueError(
                f'\'{v}\': use "zeros", "random", or the name of a .npz file in the model '
                'folder (one array per input name), e.g. "warmup.npz"'
            )
        return v


class ShadowConfig(_Strict):
    """``[routing] shadow``: mirror a fraction of requests to other variants and compare."""

    variants: list[str]
    fraction: float


class RoutingConfig(_Strict):
    """``[routing]``: how unpinned requests are split between variants, and what happens when
    a variant fails. Only the shapes are checked here; what needs the model's variant names
    (unknown variants, all-zero weights, fallback cycles) is checked by
    ``policy.validate_policy`` when the model loads, the same check the admin API uses."""

    weights: dict[str, float] | None = None
    sticky_key: str | None = None
    shadow: ShadowConfig | None = None
    # A list: every variant falls back to these, in order. A table: per-variant chains.
    fallback: list[str] | dict[str, list[str]] = Field(default_factory=list)
    breaker_failures: int = 5
    breaker_cooldown_s: float = 10.0
    # Give up on a variant that has not answered after this long and try the next fallback
    # (the caller's own deadline still bounds the whole request). None: wait for it.
    attempt_timeout_ms: Annotated[float, Field(gt=0)] | None = None


class ModelConfig(_Strict):
    """The whole of ``MODEL/config.toml``. Every field is optional."""

    backend: str | None = None
    max_batch_size: Annotated[int, Field(ge=0)] = 0
    default_variant: str | None = None
    device: str = "cpu"
    # One framework thread per variant by default: measured here, spinning framework
    # pools steal the cores the other variants and the gRPC loop need (TorchScript p99
    # 0.27 ms -> 24 ms right after an onnxruntime call; <= 0.35 ms with one thread each).
    intra_op_threads: Annotated[int, Field(ge=0)] = 1
    inter_op_threads: Annotated[int, Field(ge=0)] = 1
    signature_name: str | None = None
    # "process": run the backend in a worker process of its own (backends/isolated/), so
    # a framework that crashes takes down only that worker, which is restarted.
    isolation: Isolation = "none"
    # Seconds one execution of an isolated variant may run; beyond, its worker is killed and
    # restarted (backends/isolated/). None: no limit. An in-process call cannot be stopped.
    execution_timeout_s: Annotated[float, Field(gt=0)] | None = None
    input: list[TensorConfig] = Field(default_factory=list)
    output: list[TensorConfig] = Field(default_factory=list)
    variants: dict[str, VariantConfig] = Field(default_factory=dict)
    instances: InstancesConfig = Field(default_factory=InstancesConfig)
    batching: BatchingConfig | None = None
    routing: RoutingConfig | None = None
    warmup: WarmupConfig | None = None

    _device = field_validator("device")(_check_device)
    _unique = field_validator("input", "output")(_check_unique)

    @model_validator(mode="after")
    def _warmup_fits_the_batch(self) -> ModelConfig:
        w = self.warmup
        if w is not None and 0 < self.max_batch_size < w.batch_size:
            raise ValueError(
                f"[warmup] batch_size = {w.batch_size} exceeds the model's max_batch_size = "
                f"{self.max_batch_size}; use at most {self.max_batch_size}"
            )
        return self

    @model_validator(mode="after")
    def _execution_timeout_needs_isolation(self) -> ModelConfig:
        fix = 'set isolation = "process" (a call in the gateway process cannot be stopped)'
        for name, v in self.variants.items():
            if v.execution_timeout_s is not None and (v.isolation or self.isolation) == "none":
                raise ValueError(
                    f"[variants.{name}] execution_timeout_s applies to isolated variants only: "
                    f"{fix} in [variants.{name}]"
                )
        isolated = self.isolation == "process" or any(
            v.isolation == "process" for v in self.variants.values()
        )
        if self.execution_timeout_s is not None and not isolated:
            raise ValueError(
                f"execution_timeout_s applies to isolated variants only: {fix}, at the top "
                "level or in [variants.NAME]"
            )
        return self

    @model_validator(mode="after")
    def _batching_needs_batch_dimension(self) -> ModelConfig:
        b = self.batching
        if b is None:
            return self
        if self.max_batch_size == 0:
            raise ValueError(
                "[batching] needs a batch dimension: set max_batch_size = N (> 0) at the top "
                "level, with -1 as the first dimension of every input and output"
            )
        if b.max_batch_size is not None and b.max_batch_size > self.max_batch_size:
            raise ValueError(
                f"[batching] max_batch_size = {b.max_batch_size} exceeds the model's "
                f"max_batch_size = {self.max_batch_size}"
            )
        return self


def load_model_config(model_dir: Path) -> ModelConfig:
    """Read ``model_dir/config.toml`` (absent: all defaults). Raises ConfigError."""
    path = model_dir / CONFIG_FILE
    if not path.exists():
        return ModelConfig()
    try:
        return load_toml(
            path, ModelConfig, unknown_hint="check its spelling against docs/repository.md"
        )
    except TomlError as e:
        raise ConfigError(str(e)) from None
