"""The Open Inference Protocol datatypes and their numpy, Triton and framework equivalents.

One table, used by the codec (wire <-> numpy), the backends (framework <-> wire names) and
ModelConfig (Triton's ``TYPE_*`` enum names).
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np


@dataclass(frozen=True)
class Datatype:
    name: str  # OIP name: "FP32"
    numpy: np.dtype  # in-memory representation; BYTES is an object array of `bytes`
    triton: str  # model_config.proto DataType name: "TYPE_FP32"
    contents_field: str | None  # InferTensorContents field for typed contents, None: raw only

    @property
    def itemsize(self) -> int:
        """Bytes per element on the wire; 0 for BYTES (variable length)."""
        return 0 if self.name == "BYTES" else self.numpy.itemsize


_TABLE = [
    Datatype("BOOL", np.dtype(np.bool_), "TYPE_BOOL", "bool_contents"),
    Datatype("UINT8", np.dtype(np.uint8), "TYPE_UINT8", "uint_contents"),
    Datatype("UINT16", np.dtype(np.uint16), "TYPE_UINT16", "uint_contents"),
    Datatype("UINT32", np.dtype(np.uint32), "TYPE_UINT32", "uint_contents"),
    Datatype("UINT64", np.dtype(np.uint64), "TYPE_UINT64", "uint64_contents"),
    Datatype("INT8", np.dtype(np.int8), "TYPE_INT8", "int_contents"),
    Datatype("INT16", np.dtype(np.int16), "TYPE_INT16", "int_contents"),
    Datatype("INT32", np.dtype(np.int32), "TYPE_INT32", "int_contents"),
    Datatype("INT64", np.dtype(np.int64), "TYPE_INT64", "int64_contents"),
    Datatype("FP16", np.dtype(np.float16), "TYPE_FP16", None),
    Datatype("FP32", np.dtype(np.float32), "TYPE_FP32", "fp32_contents"),
    Datatype("FP64", np.dtype(np.float64), "TYPE_FP64", "fp64_contents"),
    Datatype("BF16", np.dtype(ml_dtypes.bfloat16), "TYPE_BF16", None),
    Datatype("BYTES", np.dtype(object), "TYPE_STRING", "bytes_contents"),
]

DATATYPES: dict[str, Datatype] = {d.name: d for d in _TABLE}
_BY_NUMPY: dict[np.dtype, Datatype] = {d.numpy: d for d in _TABLE}


def by_name(name: str) -> Datatype:
    """The datatype called ``name`` (OIP spelling). Raises KeyError for an unknown name."""
    return DATATYPES[name]


def from_numpy(dtype: np.dtype) -> Datatype:
    """The OIP datatype for a numpy dtype; str/bytes/object arrays map to BYTES.

    Raises KeyError for a dtype with no OIP equivalent (complex, datetime...).
    """
    dtype = np.dtype(dtype)
    if dtype.kind in "OSU":
        return DATATYPES["BYTES"]
    return _BY_NUMPY[dtype]
