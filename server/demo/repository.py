"""Writes the demo model repository (and the benchmarks' wide MLP) from the model
builders of this package: the directory layout, each model's config.toml, and which
builder writes which variant."""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .litert import build_detector_tflite
from .onnxgraph import build_dense_onnx, build_detector_onnx, build_mlp_onnx
from .pt2 import build_mlp_pt2
from .savedmodel import build_dense_savedmodel, build_mlp_savedmodel
from .torchscript import build_dense_torchscript, build_mlp_torchscript
from .weights import WIDE_MLP_SIZES, dense_weights, detector_weights, mlp_weights

logger = logging.getLogger(__name__)

#: The ``[[input]]``/``[[output]]`` tables of the demo's MLPs (scorer and the wide one):
#: TorchScript carries no tensor names, so config.toml gives them.
MLP_TENSORS = """\
[[input]]
name = "input"
datatype = "FP32"
shape = [-1, 64]

[[output]]
name = "output"
datatype = "FP32"
shape = [-1, 10]
"""

SCORER_CONFIG = (
    "# Core model: the same MLP in four formats (TorchScript, PyTorch 2, SavedModel, ONNX).\n"
    "# TorchScript and a compiled PyTorch 2 package carry no tensor names, so they are given\n"
    "# here; the other variants read theirs from the model files.\n"
    "max_batch_size = 0\n"
    'default_variant = "torch"\n'
    "\n" + MLP_TENSORS
)

WIDE_MLP_CONFIG = (
    "# The compute-bound benchmark model: the same wide MLP in three frameworks.\n"
    'default_variant = "onnx"\n'
    "\n" + MLP_TENSORS
)


_COMPLETE = ".complete"


def write_wide_mlp(model_dir: Path, frameworks: tuple[str, ...] = ("torch", "tf", "onnx")) -> Path:
    """Write the compute-bound benchmark model (``WIDE_MLP_SIZES``) to ``model_dir``: a
    ``config.toml`` and one variant per framework asked for (``torch``, ``tf``, ``onnx``),
    all from the same seeded weights."""
    weights = dense_weights(WIDE_MLP_SIZES)
    builders: dict[str, Callable[[], Path]] = {
        "torch": lambda: build_dense_torchscript(model_dir / "torch" / "model.pt", weights),
        "tf": lambda: build_dense_savedmodel(model_dir / "tf" / "model.savedmodel", weights),
        "onnx": lambda: build_dense_onnx(model_dir / "onnx" / "model.onnx", weights, "wide"),
    }
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.toml").write_text(WIDE_MLP_CONFIG)
    for name in frameworks:
        builders[name]()
    return model_dir


def write_demo_repository(root: Path) -> Path:
    """Write the demo model repository at ``root`` and return ``root``.

    Idempotent: returns at once when ``root/.complete`` exists. The repository is built in a
    sibling temporary directory and renamed into place, so a server never sees half of it.
    ``root`` may be absent or an empty directory; anything else is refused. A variant whose
    framework is not installed is skipped with a warning.
    """
    root = Path(root)
    if (root / _COMPLETE).exists():
        return root
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise _occupied(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".tmp", dir=root.parent))
    try:
        _write_demo(staging)
        (staging / _COMPLETE).write_text("tensorgate demo repository\n")
        try:
            # rename() atomically replaces an absent or empty directory, nothing else.
            staging.rename(root)
        except OSError as exc:
            if (root / _COMPLETE).exists():  # another process finished first
                return root
            raise _occupied(root) from exc
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    logger.info("wrote the demo model repository to %s", root)
    return root


def _occupied(root: Path) -> FileExistsError:
    return FileExistsError(
        f"cannot write the demo repository to {root}: it exists and is neither empty nor a "
        "complete demo; remove it or choose another path"
    )


def _write_demo(root: Path) -> None:
    weights = mlp_weights()
    scorer = root / "scorer"
    scorer.mkdir(parents=True)
    (scorer / "config.toml").write_text(SCORER_CONFIG)
    builders: list[tuple[str, Callable[[], Path]]] = [
        ("scorer/torch", lambda: build_mlp_torchscript(scorer / "torch" / "model.pt", weights)),
        ("scorer/pt2", lambda: build_mlp_pt2(scorer / "pt2" / "model.pt2", weights)),
        (
            "scorer/tf",
            lambda: build_mlp_savedmodel(scorer / "tf" / "model.savedmodel", weights),
        ),
        ("scorer/onnx", lambda: build_mlp_onnx(scorer / "onnx" / "model.onnx", weights)),
        (
            "detector/1",
            lambda: build_detector_onnx(root / "detector" / "1" / "model.onnx", detector_weights()),
        ),
        (
            "detector_lite/1",
            lambda: build_detector_tflite(
                root / "detector_lite" / "1" / "model.tflite", detector_weights()
            ),
        ),
    ]
    for variant, build in builders:
        try:
            build()
        except ImportError as exc:
            logger.warning("demo variant %s skipped: %s is not installed", variant, exc.name)
            shutil.rmtree(root / variant, ignore_errors=True)
            model_dir = (root / variant).parent
            if model_dir.is_dir() and not any(model_dir.iterdir()):
                model_dir.rmdir()  # a model with no variant left would only fail to load
    if not (scorer / "torch").exists():
        # Without PyTorch there is no "torch" variant to be the default.
        config = scorer / "config.toml"
        config.write_text(config.read_text().replace('default_variant = "torch"\n', ""))
