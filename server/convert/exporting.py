"""How an exporter's failure is told: the reason it gives, on one line."""

from __future__ import annotations

import re

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class ExportFailed(Exception):
    """A target could not be produced; the message is the exporter's reason."""


def exporter_reason(exc: BaseException) -> str:
    """The root of an exporter's exception chain, as one line: what the exporter says is
    wrong (``DispatchError: No ONNX function found for <OpOverload(op='prims.erf_inv'...``),
    not the advice wrapped around it."""
    root = exc
    while root.__cause__ is not None:
        root = root.__cause__
    text = _ANSI.sub("", str(root))
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{type(root).__name__}: {first}" if first else type(root).__name__
