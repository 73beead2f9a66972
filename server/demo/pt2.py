"""Demo models as PyTorch 2 archives (``.pt2``): an AOTInductor package when a C++ compiler
is there to build one, else a plain ExportedProgram. torch is imported inside the builders.

AOTInductor compiles the model into a shared library, which needs the C++ compiler
``torch._inductor`` finds (``$CXX``, else ``g++``). Compiling the scorer takes ~15 s with
a warm inductor cache on a 2-core machine and ~40-70 s the first time. Without a compiler
the variant is written as an ExportedProgram (``torch.export.save``): the same backend serves
it, slower per call (~90 µs against ~22 µs for the scorer here), and a warning says so.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from .torchscript import dense_module

logger = logging.getLogger(__name__)


def cpp_compiler() -> str | None:
    """The path of the C++ compiler AOTInductor would use, or None when there is none."""
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        compiler = get_cpp_compiler()
    except Exception:  # inductor raises a plain RuntimeError when it finds none
        return None
    return shutil.which(compiler)


def export_dense(weights: dict[str, np.ndarray]) -> Any:
    """A ``dense_weights`` MLP as a ``torch.export`` ExportedProgram, with a dynamic batch
    dimension: ``forward(input)`` of shape [-1, in]."""
    import torch

    example = torch.zeros(2, weights["w1"].shape[0])  # 2: export specialises sizes 0 and 1
    batch = torch.export.Dim("batch")
    return torch.export.export(
        dense_module(weights), (example,), dynamic_shapes={"input": {0: batch}}
    )


def build_mlp_pt2(path: Path, weights: dict[str, np.ndarray], compiled: bool | None = None) -> Path:
    """Write the scorer as a ``.pt2`` archive at ``path``: an AOTInductor package when
    ``compiled`` (None: when a C++ compiler is found), else an ExportedProgram."""
    import torch

    program = export_dense(weights)
    if compiled is None:
        compiled = cpp_compiler() is not None
        if not compiled:
            logger.warning(
                "no C++ compiler for AOTInductor: %s is an ExportedProgram instead of a "
                "compiled package (install g++, or set $CXX, and write it again)",
                path,
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    if compiled:
        torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    else:
        torch.export.save(program, str(path))
    return path
