"""Writes the demo model repository (and the benchmarks' wide MLP) from the model
builders of this package: the directory layout, each model's config.toml, and which
builder writes which variant."""

from __future__ import annotations

import errno
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from .. import writelock
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

#: The integer versions the scorer's variants also answer to, so that Triton's clients,
#: which parse versions as integers, can pin them (``perf_analyzer -m scorer -x 3``).
SCORER_VERSIONS = {"torch": 1, "tf": 2, "onnx": 3, "pt2": 4}


def scorer_config(variants: tuple[str, ...] = tuple(SCORER_VERSIONS)) -> str:
    """The scorer's config.toml for the variants written (a framework may be missing)."""
    text = (
        "# Core model: the same MLP in four formats (TorchScript, SavedModel, ONNX, PyTorch 2).\n"
        "# TorchScript and a compiled PyTorch 2 package carry no tensor names, so they are\n"
        "# given here; the other variants read theirs from the model files.\n"
        "max_batch_size = 0\n"
        + ('default_variant = "torch"\n' if "torch" in variants else "")
        + "\n"
        + MLP_TENSORS
    )
    for name in variants:
        text += f"\n[variants.{name}]\nversion = {SCORER_VERSIONS[name]}\n"
    return text


SCORER_CONFIG = scorer_config()

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

    Idempotent: returns at once when ``root/.complete`` exists. ``root`` may be absent or an
    empty directory (``lost+found`` aside), a mount point whose parent is read-only
    included; anything else is refused. The files are written in place under the
    repository's write lock (``server/writelock.py``), so a server never reads half of
    them, and a second writer waits for the first. A write that was interrupted (the
    process killed) is cleared and done again. Directories are made 0755 and files 0644
    whatever the umask: the repository is meant to be served by other uids. A variant
    whose framework is not installed is skipped with a warning.
    """
    root = Path(root)
    if (root / _COMPLETE).exists():
        return root
    created = not root.exists()
    foreign: list[str] = []
    try:
        root.mkdir(parents=True, exist_ok=True)
        with writelock.holding(root) as interrupted:
            if not (root / _COMPLETE).exists():  # else another writer finished meanwhile
                foreign = _foreign_entries(root, interrupted)
                if not foreign:
                    if interrupted:
                        logger.warning("clearing the interrupted demo write in %s", root)
                        _clear_demo(root)
                    _write_demo(root)
                    _make_readable(root, include_root=created)
                    complete = root / _COMPLETE
                    complete.write_text("tensorgate demo repository\n")
                    complete.chmod(0o644)
                    logger.info("wrote the demo model repository to %s", root)
    except OSError as exc:
        raise _unwritable(root, exc) from exc
    if foreign:
        raise FileExistsError(
            f"cannot write the demo repository to {root}: it holds other files "
            f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}) and no complete "
            "demo; give an empty or absent directory, or choose another path"
        )
    return root


def _unwritable(root: Path, exc: OSError) -> OSError:
    where = f": {exc.filename}" if exc.filename else ""
    message = f"cannot write the demo repository to {root}: {exc.strerror or exc}{where}"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        message += (
            f"; give a directory that uid {os.getuid()} can write, or an absent one whose "
            "parent it can write"
        )
    return OSError(exc.errno, message)  # the subclass for the errno: PermissionError, ...


#: What the demo writes at the top of its directory (besides ``.complete``).
_DEMO_ENTRIES = ("scorer", "detector", "detector_lite")


def _foreign_entries(root: Path, interrupted: bool) -> list[str]:
    """Entries of ``root`` that the demo writer must not touch: everything but the lock
    files and ``lost+found`` (a fresh ext4 volume's), and after an interrupted write, but
    what that write left."""
    ours = {_COMPLETE, "lost+found", *(_DEMO_ENTRIES if interrupted else ())}
    return sorted(
        p.name
        for p in root.iterdir()
        if p.name not in ours and not p.name.startswith(writelock.LOCK_FILE)
    )


def _clear_demo(root: Path) -> None:
    for name in _DEMO_ENTRIES:
        path = root / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _make_readable(root: Path, include_root: bool) -> None:
    """Directories 0755, files 0644, below ``root`` (and ``root`` itself when this writer
    created it: an existing directory's mode, a mount point's say, is its owner's)."""
    if include_root:
        root.chmod(0o755)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o755)
        for name in filenames:
            if not name.startswith(writelock.LOCK_FILE):
                os.chmod(os.path.join(dirpath, name), 0o644)


def _write_demo(root: Path) -> None:
    weights = mlp_weights()
    scorer = root / "scorer"
    scorer.mkdir(parents=True)
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
    written = tuple(name for name in SCORER_VERSIONS if (scorer / name).exists())
    (scorer / "config.toml").write_text(scorer_config(written))
