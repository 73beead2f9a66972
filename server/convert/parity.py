"""Parity: run every written variant the way the server runs it and compare it with the
source model, sample by sample.

Samples are random within the declared shapes (a fixed seed, so a rerun compares the same
inputs; each sample gives every dynamic dimension one size from 1 to 4) or come from
``--data FILE.npz``. The variants are loaded from the written model directory by the
gateway's own repository (config.toml, backend detection, the merged signature) and run by
the backend classes that will serve them: a variant that passes here is one that serves.

An FP32 variant agrees when every output element satisfies
``|variant - source| <= atol + rtol * |source|`` (numpy's ``allclose`` rule). A reduced
precision's error grows with the size of the values it rounds, so its tolerance T is set
against each output's scale: ``|variant - source| <= T * max(1, max |source|)`` over every
output of every sample, and the arg-max over the last axis must agree on enough rows
(``Tolerance.min_top1``). Each call of a variant is timed: ``p50_ms`` is its median.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tensorgate.datatypes import by_name

from .tensors import TensorDecl

Sample = dict[str, np.ndarray]
SEED = 0
#: Sizes a dynamic dimension takes in the random samples.
DYNAMIC_SIZES = (1, 2, 3, 4)


# -- samples ----------------------------------------------------------------------------
def random_samples(inputs: Sequence[TensorDecl], count: int, seed: int = SEED) -> list[Sample]:
    """``count`` random samples: normal floats, integers 0-9, random booleans."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(count):
        size = int(rng.choice(DYNAMIC_SIZES))  # one size for every dynamic dimension
        sample = {}
        for d in inputs:
            shape = [size if n < 0 else n for n in d.shape]
            dtype = by_name(d.datatype).numpy
            if d.datatype == "BYTES":
                value = np.full(shape, b"tensorgate", dtype=object)
            elif d.datatype == "BOOL":
                value = rng.integers(0, 2, shape).astype(bool)
            elif dtype.kind in "iu":
                value = rng.integers(0, 10, shape).astype(dtype)
            else:
                value = rng.standard_normal(shape).astype(dtype)
            sample[d.name] = value
        samples.append(sample)
    return samples


def npz_samples(path: Path, inputs: Sequence[TensorDecl], count: int) -> list[Sample]:
    """The first ``count`` samples of ``path``: one array per input, named as the input,
    either with one more leading axis than the input's shape (one sample per entry) or, for
    an input whose first dimension is dynamic, shaped as the input (one sample per row).
    Raises ValueError saying which array does not fit."""
    with np.load(path, allow_pickle=False) as data:
        missing = [d.name for d in inputs if d.name not in data.files]
        if missing:
            raise ValueError(f"{path} has no array for input(s) {missing}; it holds {data.files}")
        arrays = {d.name: data[d.name] for d in inputs}
    per_input: dict[str, list[np.ndarray]] = {}
    for d in inputs:
        a = arrays[d.name]
        if a.ndim == len(d.shape) + 1:
            items = list(a)
        elif a.ndim == len(d.shape) and d.shape and d.shape[0] == -1:
            items = [a[i : i + 1] for i in range(len(a))]
        else:
            raise ValueError(
                f"{path}: '{d.name}' has shape {list(a.shape)}; give {list(d.shape)} with a "
                "leading axis for the samples, or rows along a dynamic first dimension"
            )
        for item in items[:1]:
            fits = all(n < 0 or n == m for n, m in zip(d.shape, item.shape, strict=True))
            if not fits:
                raise ValueError(
                    f"{path}: a sample of '{d.name}' has shape {list(item.shape)}, which "
                    f"does not fit {list(d.shape)}"
                )
        per_input[d.name] = [np.asarray(i, dtype=by_name(d.datatype).numpy) for i in items]
    lengths = {name: len(items) for name, items in per_input.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{path}: the inputs hold different numbers of samples: {lengths}")
    n = min(count, *lengths.values())
    return [{name: items[i] for name, items in per_input.items()} for i in range(n)]


# -- comparing --------------------------------------------------------------------------
@dataclass(frozen=True)
class Tolerance:
    """What a variant is judged by: the ``allclose`` rule's two terms, with ``scaled`` the
    absolute term multiplied by ``max(1, max |source|)`` of each output, and, for a reduced
    precision, the least share of rows whose arg-max must agree with the source's."""

    atol: float
    rtol: float = 0.0
    scaled: bool = False
    min_top1: float | None = None

    def as_json(self) -> dict[str, object]:
        return {
            "atol": self.atol,
            "rtol": self.rtol,
            "scaled_by_output_max": self.scaled,
            "min_top1_agreement": self.min_top1,
        }

    def __str__(self) -> str:
        if not self.scaled:
            text = f"atol {self.atol:g}, rtol {self.rtol:g}"
        else:
            text = f"|diff| <= {self.atol:g} x max(1, max |source|)"
        return text if self.min_top1 is None else f"{text}, top-1 >= {self.min_top1:.0%}"


#: The tolerance T of a reduced precision, ``--tolerance PRECISION=T``, and the top-1
#: agreement every reduced variant needs.
REDUCED_TOLERANCE = {"fp16": 1e-2, "bf16": 1e-2, "int8": 5e-2}
REDUCED_MIN_TOP1 = 0.99


def parse_tolerances(text: str, atol: float, rtol: float) -> dict[str, Tolerance]:
    """``--tolerance`` (``int8=0.1,fp16=0.02``) over the defaults, per precision. FP32 takes
    ``atol``/``rtol`` (``fp32=X`` sets its atol). Raises ValueError saying what is wrong."""
    given: dict[str, float] = {}
    for item in (i.strip() for i in text.split(",") if i.strip()):
        name, sep, value = (part.strip() for part in item.partition("="))
        if not sep or name.lower() not in ("fp32", *REDUCED_TOLERANCE):
            raise ValueError(
                f"'{item}': use PRECISION=TOLERANCE with PRECISION one of "
                f"fp32,{','.join(REDUCED_TOLERANCE)}, e.g. int8=0.1,fp16=0.02"
            )
        try:
            number = float(value)
        except ValueError:
            number = -1.0
        if not math.isfinite(number) or number < 0:
            raise ValueError(f"'{item}': the tolerance must be a number >= 0")
        given[name.lower()] = number
    tolerances = {"fp32": Tolerance(given.get("fp32", atol), rtol)}
    for name, default in REDUCED_TOLERANCE.items():
        t = given.get(name, default)
        tolerances[name] = Tolerance(t, 0.0, scaled=True, min_top1=REDUCED_MIN_TOP1)
    return tolerances


@dataclass(frozen=True)
class Comparison:
    """How one variant's outputs differ from the source model's over all samples."""

    max_abs_diff: float
    max_rel_diff: float  # over elements whose source value exceeds atol in size
    top1_agreement: float | None  # rows whose arg-max over the last axis agrees; None: no
    samples: int  # output has a last axis of 2 or more
    passed: bool

    def as_json(self) -> dict[str, object]:
        def number(x: float) -> float | None:
            return x if math.isfinite(x) else None  # JSON has no infinity

        return {
            "max_abs_diff": number(self.max_abs_diff),
            "max_rel_diff": number(self.max_rel_diff),
            "top1_agreement": self.top1_agreement,
            "samples": self.samples,
            "passed": self.passed,
        }


class OutputMismatch(Exception):
    """A variant returned an output of another shape, or none, where the source has one."""


def compare(
    references: Sequence[Mapping[str, np.ndarray]],
    results: Sequence[Mapping[str, np.ndarray]],
    outputs: Sequence[str],
    atol: float,
    rtol: float,
    *,
    scaled: bool = False,
    min_top1: float | None = None,
) -> Comparison:
    """Compare a variant's results with the source's, sample by sample, by ``Tolerance``'s
    rule: with ``scaled`` the absolute term is ``atol * max(1, max |source|)`` of each output;
    with ``min_top1``, a variant whose top-1 agreement is lower does not pass either."""
    max_abs = max_rel = 0.0
    agree = rows = 0
    passed = True
    for ref_sample, got_sample in zip(references, results, strict=True):
        for name in outputs:
            if name not in got_sample:
                raise OutputMismatch(f"returned no output '{name}'")
            ref, got = np.asarray(ref_sample[name]), np.asarray(got_sample[name])
            if ref.shape != got.shape:
                raise OutputMismatch(
                    f"output '{name}' has shape {list(got.shape)} where the source's has "
                    f"{list(ref.shape)}"
                )
            if ref.dtype == object or got.dtype == object:
                same = bool(np.array_equal(ref, got))
                max_abs = max(max_abs, 0.0 if same else math.inf)
                passed &= same
                continue
            a, b = got.astype(np.float64), ref.astype(np.float64)
            with np.errstate(invalid="ignore"):
                diff = np.abs(a - b)
            # Equal values (infinities included) and NaN where the source has NaN agree.
            diff = np.where((a == b) | (np.isnan(a) & np.isnan(b)), 0.0, diff)
            diff = np.where(np.isnan(diff), math.inf, diff)
            max_abs = max(max_abs, float(diff.max(initial=0.0)))
            sizeable = np.abs(b) > atol
            if sizeable.any():
                max_rel = max(max_rel, float((diff[sizeable] / np.abs(b[sizeable])).max()))
            limit = atol * max(1.0, float(np.abs(np.nan_to_num(b)).max(initial=0.0)))
            absolute = limit if scaled else atol
            passed &= not bool(np.any(diff > absolute + rtol * np.abs(np.nan_to_num(b))))
            if ref.ndim >= 1 and ref.shape[-1] >= 2 and ref.size:
                flat_a = a.reshape(-1, ref.shape[-1])
                flat_b = b.reshape(-1, ref.shape[-1])
                agree += int((flat_a.argmax(axis=-1) == flat_b.argmax(axis=-1)).sum())
                rows += flat_a.shape[0]
    top1 = agree / rows if rows else None
    if min_top1 is not None and top1 is not None:
        passed &= top1 >= min_top1
    return Comparison(max_abs, max_rel, top1, len(references), passed)


# -- running the written variants -------------------------------------------------------
@dataclass(frozen=True)
class Served:
    """A variant's outputs per sample, and how long each call took."""

    outputs: list[dict[str, np.ndarray]]
    seconds: list[float]

    @property
    def p50_ms(self) -> float:
        """The median time of one request's execution, in milliseconds."""
        return statistics.median(self.seconds) * 1e3


async def _serve_samples(
    root: Path, model: str, variants: Sequence[str], samples: Sequence[Sample]
) -> dict[str, Served | str]:
    from tensorgate.server.metrics import Metrics
    from tensorgate.server.repository import Repository

    repository = Repository(root, Metrics())
    loaded = await repository.load(model)
    results: dict[str, Served | str] = {}
    try:
        for name in variants:
            variant = loaded.variants.get(name)
            if variant is None or variant.backend is None or not variant.ready:
                reason = (variant.reason if variant is not None else "") or loaded.reason
                results[name] = reason or "the repository found no model file"
                continue
            served = Served([], [])
            try:
                for sample in samples:
                    start = time.perf_counter()
                    served.outputs.append(variant.backend.infer(sample))
                    served.seconds.append(time.perf_counter() - start)
            except Exception as exc:  # what the server would report as INTERNAL
                results[name] = f"inference failed: {exc}"
            else:
                results[name] = served
    finally:
        await repository.close()
    return results


def serve_samples(
    model_dir: Path, variants: Sequence[str], samples: Sequence[Sample]
) -> dict[str, Served | str]:
    """Load ``model_dir`` as the server does and run ``samples`` through each of
    ``variants``, one at a time: per variant its outputs and times per sample, or why it
    does not serve."""
    return asyncio.run(_serve_samples(model_dir.parent, model_dir.name, variants, samples))
