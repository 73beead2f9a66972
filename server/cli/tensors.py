"""Input tensors for the client-side commands (``infer``, ``bench``): from the command
line (a .npy file or JSON) or random data shaped as the model's metadata says."""

from __future__ import annotations

import json

import click
import numpy as np

from tensorgate.datatypes import by_name


def parse_input(spec: str, meta: dict[str, dict]) -> tuple[str, np.ndarray]:
    name, sep, value = spec.partition("=")
    if not sep:
        raise click.BadParameter(f"'{spec}': use NAME=FILE.npy or NAME=JSON", param_hint="--input")
    tensor = meta.get(name)
    if tensor is None:
        raise click.BadParameter(
            f"the model has no input '{name}'; inputs: {list(meta)}", param_hint="--input"
        )
    dt = by_name(tensor["datatype"])
    if value.endswith(".npy"):
        arr = np.load(value, allow_pickle=False)
    else:
        try:
            data = json.loads(value)
        except json.JSONDecodeError as e:
            raise click.BadParameter(
                f"{name}: not a .npy file or JSON: {e}", param_hint="--input"
            ) from None
        if dt.name == "BYTES":
            arr = np.array(data, dtype=object)
            arr = np.vectorize(lambda s: s.encode() if isinstance(s, str) else s, otypes=[object])(
                arr
            )
        else:
            arr = np.array(data, dtype=dt.numpy)
    return name, arr


def random_input(tensor: dict) -> np.ndarray:
    dt = by_name(tensor["datatype"])
    shape = [1 if int(d) < 0 else int(d) for d in tensor.get("shape", [])]
    rng = np.random.default_rng()
    if dt.name == "BYTES":
        return np.array([b"tensorgate"] * int(np.prod(shape)), dtype=object).reshape(shape)
    if dt.name == "BOOL":
        return rng.integers(0, 2, shape).astype(bool)
    if dt.numpy.kind in "iu":
        return rng.integers(0, 10, shape).astype(dt.numpy)
    return rng.standard_normal(shape).astype(dt.numpy)
