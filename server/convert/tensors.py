"""The tensors a converted model takes and returns: ``NAME:DATATYPE:SHAPE`` declarations."""

from __future__ import annotations

import re
from dataclasses import dataclass

from tensorgate.datatypes import DATATYPES

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")


@dataclass(frozen=True)
class TensorDecl:
    """One input or output: its name, OIP datatype and whole shape (-1: dynamic)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def as_config(self) -> dict[str, object]:
        """The ``[[input]]`` / ``[[output]]`` table of config.toml."""
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    def __str__(self) -> str:
        return f"{self.name}:{self.datatype}:{','.join(map(str, self.shape))}"


def parse_tensor_decl(text: str) -> TensorDecl:
    """``NAME:DATATYPE:SHAPE``, e.g. ``input:FP32:-1,64``. Raises ValueError saying what is
    wrong and what is expected."""
    parts = text.split(":")
    if len(parts) != 3:
        raise ValueError(f"'{text}': use NAME:DATATYPE:SHAPE, e.g. input:FP32:-1,64")
    name, datatype, shape_text = (p.strip() for p in parts)
    if not _NAME.match(name):
        raise ValueError(
            f"'{text}': the name '{name}' must start with a letter or '_' and hold only "
            "letters, digits, '_', '.' and '-'"
        )
    datatype = datatype.upper()
    if datatype not in DATATYPES:
        raise ValueError(f"'{text}': unknown datatype '{datatype}'; one of {', '.join(DATATYPES)}")
    try:
        shape = tuple(int(d) for d in shape_text.split(",")) if shape_text else ()
    except ValueError:
        raise ValueError(
            f"'{text}': the shape '{shape_text}' must be comma-separated integers, -1 for a "
            "dynamic dimension (e.g. -1,64)"
        ) from None
    if any(d < -1 or d == 0 for d in shape):
        raise ValueError(f"'{text}': dimensions are positive sizes, or -1 for a dynamic one")
    return TensorDecl(name, datatype, shape)
