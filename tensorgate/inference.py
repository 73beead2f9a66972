"""The one internal request/response type the pipeline works on.

The codec builds these from protobuf at the edge; everything behind it (router, scheduler,
backends) sees numpy arrays only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True, slots=True)
class InputTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray  # already shaped; BYTES: object array of bytes


@dataclass(slots=True)
class InferenceRequest:
    model: str
    version: str  # "" = let the router choose
    id: str = ""
    inputs: list[InputTensor] = field(default_factory=list)
    requested_outputs: list[str] = field(default_factory=list)  # [] = all
    parameters: dict[str, object] = field(default_factory=dict)
    # Routing keys from gRPC metadata (lower-cased names), for sticky routing.
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class OutputTensor:
    name: str
    datatype: str
    data: np.ndarray


@dataclass(slots=True)
class InferenceResponse:
    model: str
    variant: str
    id: str
    outputs: list[OutputTensor]
