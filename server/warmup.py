"""``[warmup]``: sample executions of each variant before it reports ready.

The first calls to a TorchScript or TensorFlow model pay for graph optimisation (the
profiling executor's specialisation, grappler); with a warmup, a freshly loaded variant
pays it before it takes traffic. The repository runs ``warm_up`` for each variant after its
scheduler starts and before the variant is marked READY or swapped in on a reload, so a
variant whose warmup fails never serves, and on a reload the old version keeps serving.

Warmup requests go through the variant's scheduler (its queue, its thread, the same backend
calls as requests) but not through the pipeline, so they are not counted in metrics or
ModelStatistics.

A warmup is bounded by ``[warmup] timeout_s`` (default 60 s): past it, the variant fails to
load with a reason that says so (``WarmupTimeout``) and the other variants and models load
as usual. An execution in the gateway process cannot be interrupted: it finishes in the
background, and its variant is released when it returns. An isolated variant's worker is
killed instead, and a worker restarted after a crash is warmed up again before it takes
requests (``backends/isolated``).
"""

from __future__ import annotations

import asyncio
import time
import zipfile
from pathlib import Path

import numpy as np

from tensorgate.datatypes import by_name
from tensorgate.errors import ConfigError, InvalidInput, Unavailable
from tensorgate.inference import InputTensor

from .config import CONFIG_FILE, WarmupConfig
from .scheduler import Scheduler, Timings
from .signature import ModelSignature, validate_inputs

#: Seed of ``data = "random"``: the same sample data at every load.
RANDOM_SEED = 0
#: Length of each random ASCII string for BYTES inputs.
RANDOM_STRING_LENGTH = 8


def sample_shape(shape: tuple[int, ...], batch_size: int) -> tuple[int, ...]:
    """A concrete shape for ``shape``: a variable first dimension (the rows) becomes
    ``batch_size``, any other variable dimension 1."""
    return tuple(d if d != -1 else (batch_size if i == 0 else 1) for i, d in enumerate(shape))


def _generated(
    datatype: str, shape: tuple[int, ...], rng: np.random.Generator | None
) -> np.ndarray:
    """Zeros (``rng`` None) or seeded random data of one input."""
    dtype = by_name(datatype).numpy
    if datatype == "BYTES":
        if rng is None:
            return np.full(shape, b"", dtype=object)
        letters = rng.integers(ord("a"), ord("z") + 1, size=(*shape, RANDOM_STRING_LENGTH))
        flat = [bytes(row.astype(np.uint8)) for row in letters.reshape(-1, RANDOM_STRING_LENGTH)]
        return np.array(flat, dtype=object).reshape(shape)
    if rng is None:
        return np.zeros(shape, dtype)
    if datatype == "BOOL":
        return rng.integers(0, 2, size=shape).astype(bool)
    if datatype.startswith(("INT", "UINT")):
        # Small values: integer inputs are often indices (tokens, classes).
        return rng.integers(0, 10, size=shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def _from_file(model: str, path: Path, signature: ModelSignature) -> dict[str, np.ndarray]:
    field = f"{path.parent / CONFIG_FILE}: field 'warmup.data'"
    if not path.is_file():
        raise ConfigError(
            f"{field}: no file {path}; save one array per input name with numpy.savez, "
            'or use data = "zeros"'
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ConfigError(f"{field}: {path} is not a .npz file numpy can read: {e}") from None
    names = [s.name for s in signature.inputs]
    unknown = sorted(set(arrays) - set(names))
    missing = [n for n in names if n not in arrays]
    if unknown or missing:
        raise ConfigError(
            f"{field}: {path.name} must hold one array per input of model '{model}' "
            f"{names}; missing {missing}, unknown {unknown}"
        )
    inputs: dict[str, np.ndarray] = {}
    for spec in signature.inputs:
        assert spec.name is not None and spec.datatype is not None
        array = arrays[spec.name]
        if spec.datatype == "BYTES":
            if array.dtype.kind not in "SU":
                raise ConfigError(
                    f"{field}: array '{spec.name}' in {path.name} is {array.dtype}, but the "
                    "input is BYTES: save strings (numpy 'S' or 'U' arrays)"
                )
            encoded = [v.encode() if isinstance(v, str) else bytes(v) for v in array.flat]
            inputs[spec.name] = np.array(encoded, dtype=object).reshape(array.shape)
            continue
        want = by_name(spec.datatype).numpy
        if not np.can_cast(array.dtype, want, casting="same_kind"):
            raise ConfigError(
                f"{field}: array '{spec.name}' in {path.name} is {array.dtype}, which cannot "
                f"become {spec.datatype} ({want}); save it as {want}"
            )
        inputs[spec.name] = array.astype(want, copy=False)
    return inputs


def warmup_inputs(
    model: str, directory: Path, config: WarmupConfig, signature: ModelSignature
) -> dict[str, np.ndarray]:
    """The inputs of one warmup request of ``model`` (its directory and signature).

    Raises ConfigError naming config.toml's ``warmup`` field and the fix: a .npz file that
    is missing, unreadable, or does not fit the model's inputs.
    """
    if config.data in ("zeros", "random"):
        rng = np.random.default_rng(RANDOM_SEED) if config.data == "random" else None
        shape_of = {
            s.name: sample_shape(s.shape or (), config.batch_size) for s in signature.inputs
        }
        inputs = {
            s.name: _generated(s.datatype, shape_of[s.name], rng)  # type: ignore[arg-type]
            for s in signature.inputs
        }
    else:
        inputs = _from_file(model, directory / config.data, signature)
    tensors = [
        InputTensor(name, spec.datatype, array.shape, array)  # type: ignore[arg-type]
        for spec in signature.inputs
        for name, array in [(spec.name, inputs[spec.name])]  # type: ignore[index]
    ]
    try:
        return validate_inputs(model, signature, tensors)  # type: ignore[return-value]
    except InvalidInput as e:
        raise ConfigError(
            f"{directory / CONFIG_FILE}: field 'warmup': the warmup data does not fit: {e}; "
            "give a .npz file with arrays of the model's shapes"
        ) from None


class WarmupTimeout(Unavailable):
    """A warmup ran past ``[warmup] timeout_s``."""


async def warm_up(
    scheduler: Scheduler,
    inputs: dict[str, np.ndarray],
    requests: int,
    timeout_s: float = WarmupConfig.model_fields["timeout_s"].default,
) -> None:
    """Run ``requests`` executions of ``inputs`` on a started scheduler, one after another,
    all within ``timeout_s`` seconds.

    Raises WarmupTimeout when they take longer (the execution running then is not stopped:
    the scheduler still holds it), else the scheduler's TensorgateError (BackendFailed,
    InvalidInput...) of the first execution that fails.
    """
    done = 0
    started = time.monotonic()
    try:
        async with asyncio.timeout(timeout_s):
            for done in range(requests):  # noqa: B007 - read after a timeout
                await scheduler.submit(inputs, None, None, Timings())
    except TimeoutError:
        raise WarmupTimeout(
            f"it took longer than [warmup] timeout_s = {timeout_s:g} s ({done} of {requests} "
            f"execution(s) done after {time.monotonic() - started:.1f} s); raise timeout_s, or "
            "find why the model is slow on the warmup data"
        ) from None
