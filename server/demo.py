"""The built-in demo model repository, generated from seeded numpy weights (no downloads).

``scorer`` is the "core" model: one MLP (64 -> 256 -> 256 -> 10, ReLU, FP32) with the same
weights in TorchScript, TF SavedModel and ONNX, so the variants can back each other up and
be cross-checked. ``detector`` is an "edge" model in ONNX only. Frameworks are imported
inside the builders; a missing one only drops its variant.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tensorgate.backends.base import BackendOptions

from . import writelock

logger = logging.getLogger(__name__)

#: ONNX opset and IR version of the generated models: old enough for any recent runtime
#: (Triton, onnxruntime >= 1.14), new enough for bfloat16 Identity and Softmax(axis=-1).
ONNX_OPSET = 17
ONNX_IR_VERSION = 8

MLP_SIZES = (64, 256, 256, 10)
DETECTOR_CLASSES = 4
DETECTOR_FILTERS = 8

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
SCORER_VERSIONS = {"torch": 1, "tf": 2, "onnx": 3}


def scorer_config(variants: tuple[str, ...] = tuple(SCORER_VERSIONS)) -> str:
    """The scorer's config.toml for the variants written (a framework may be missing)."""
    text = (
        "# Core model: the same MLP in three frameworks. TorchScript carries no tensor names,\n"
        "# so they are given here; the other variants read theirs from the model files.\n"
        "max_batch_size = 0\n"
        + ('default_variant = "torch"\n' if "torch" in variants else "")
        + "\n"
        + MLP_TENSORS
    )
    for name in variants:
        text += f"\n[variants.{name}]\nversion = {SCORER_VERSIONS[name]}\n"
    return text


SCORER_CONFIG = scorer_config()

_COMPLETE = ".complete"


# --- the scorer MLP --------------------------------------------------------------------


def mlp_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """FP32 weights ``w1..w3`` (shape (in, out)) and biases ``b1..b3`` of the scorer MLP."""
    rng = np.random.default_rng(seed)
    weights: dict[str, np.ndarray] = {}
    for i, (n_in, n_out) in enumerate(itertools.pairwise(MLP_SIZES), start=1):
        # He initialisation keeps activations O(1), so an absolute tolerance is meaningful.
        weights[f"w{i}"] = (rng.standard_normal((n_in, n_out)) * np.sqrt(2.0 / n_in)).astype(
            np.float32
        )
        weights[f"b{i}"] = (rng.standard_normal(n_out) * 0.1).astype(np.float32)
    return weights


def mlp_reference(x: np.ndarray, weights: dict[str, np.ndarray]) -> np.ndarray:
    """The scorer's forward pass in numpy (computed in FP64, returned as FP32)."""
    h = np.asarray(x, dtype=np.float64)
    h = np.maximum(h @ weights["w1"] + weights["b1"], 0.0)
    h = np.maximum(h @ weights["w2"] + weights["b2"], 0.0)
    return (h @ weights["w3"] + weights["b3"]).astype(np.float32)


def build_mlp_torchscript(path: Path, weights: dict[str, np.ndarray]) -> Path:
    """Write the scorer as a scripted TorchScript module to ``path``."""
    import torch

    class Mlp(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = torch.nn.Linear(MLP_SIZES[0], MLP_SIZES[1])
            self.fc2 = torch.nn.Linear(MLP_SIZES[1], MLP_SIZES[2])
            self.fc3 = torch.nn.Linear(MLP_SIZES[2], MLP_SIZES[3])

        def forward(self, input: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.fc1(input))
            h = torch.relu(self.fc2(h))
            return self.fc3(h)

    module = Mlp()
    with torch.no_grad():
        for i, layer in enumerate((module.fc1, module.fc2, module.fc3), start=1):
            # nn.Linear stores (out, in); the numpy weights are (in, out).
            layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(weights[f"w{i}"].T)))
            layer.bias.copy_(torch.from_numpy(weights[f"b{i}"]))
    module.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(module), str(path))
    return path


def build_mlp_savedmodel(directory: Path, weights: dict[str, np.ndarray]) -> Path:
    """Write the scorer as a SavedModel whose ``serving_default`` maps input -> output."""
    tf = import_tensorflow()

    class Mlp(tf.Module):
        def __init__(self) -> None:
            super().__init__(name="scorer")
            self.params = {k: tf.Variable(v, name=k, trainable=False) for k, v in weights.items()}

        @tf.function(
            input_signature=[tf.TensorSpec([None, MLP_SIZES[0]], tf.float32, name="input")]
        )
        def serve(self, x: Any) -> dict[str, Any]:
            p = self.params
            h = tf.nn.relu(tf.matmul(x, p["w1"]) + p["b1"])
            h = tf.nn.relu(tf.matmul(h, p["w2"]) + p["b2"])
            return {"output": tf.matmul(h, p["w3"]) + p["b3"]}

    module = Mlp()
    tf.saved_model.save(module, str(directory), signatures={"serving_default": module.serve})
    return directory


def build_mlp_onnx(path: Path, weights: dict[str, np.ndarray]) -> Path:
    """Write the scorer as an ONNX graph: input FP32 [batch, 64] -> output FP32 [batch, 10]."""
    from onnx import TensorProto, helper, numpy_helper

    initializers = [numpy_helper.from_array(v, name=k) for k, v in weights.items()]
    nodes = [
        helper.make_node("Gemm", ["input", "w1", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["a1"]),
        helper.make_node("Gemm", ["a1", "w2", "b2"], ["h2"]),
        helper.make_node("Relu", ["h2"], ["a2"]),
        helper.make_node("Gemm", ["a2", "w3", "b3"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        "scorer",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", MLP_SIZES[0]])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", MLP_SIZES[-1]])],
        initializer=initializers,
    )
    return save_onnx(graph, path)


# --- the detector ----------------------------------------------------------------------


def detector_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """Conv (8x3x3x3), its bias, and the (8, 4) classifier with its bias, FP32."""
    rng = np.random.default_rng(seed)
    return {
        "conv_w": (rng.standard_normal((DETECTOR_FILTERS, 3, 3, 3)) * np.sqrt(2.0 / 27)).astype(
            np.float32
        ),
        "conv_b": (rng.standard_normal(DETECTOR_FILTERS) * 0.1).astype(np.float32),
        "fc_w": rng.standard_normal((DETECTOR_FILTERS, DETECTOR_CLASSES)).astype(np.float32),
        "fc_b": (rng.standard_normal(DETECTOR_CLASSES) * 0.1).astype(np.float32),
    }


def detector_reference(x: np.ndarray, weights: dict[str, np.ndarray]) -> np.ndarray:
    """The detector's forward pass in numpy: x FP32 [n, 3, 32, 32] -> scores FP32 [n, 4]."""
    x = np.asarray(x, dtype=np.float64)
    n, _, height, width = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    conv = np.zeros((n, DETECTOR_FILTERS, height, width))
    for dy in range(3):
        for dx in range(3):
            patch = padded[:, :, dy : dy + height, dx : dx + width]
            conv += np.einsum("nchw,fc->nfhw", patch, weights["conv_w"][:, :, dy, dx])
    conv += weights["conv_b"][None, :, None, None]
    pooled = np.maximum(conv, 0.0).mean(axis=(2, 3))
    logits = pooled @ weights["fc_w"] + weights["fc_b"]
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


def build_detector_onnx(path: Path, weights: dict[str, np.ndarray]) -> Path:
    """Write the detector: image FP32 [batch, 3, 32, 32] -> scores FP32 [batch, 4]."""
    from onnx import TensorProto, helper, numpy_helper

    initializers = [numpy_helper.from_array(v, name=k) for k, v in weights.items()]
    nodes = [
        helper.make_node("Conv", ["image", "conv_w", "conv_b"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["features"]),
        helper.make_node("Gemm", ["features", "fc_w", "fc_b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["scores"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "detector",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", DETECTOR_CLASSES])],
        initializer=initializers,
    )
    return save_onnx(graph, path)


# --- a compute-bound model for benchmarks (not part of the demo repository) --------------

#: The benchmarks' compute-bound workload: an MLP as wide as the scorer is small. At batch
#: 1 every call streams its ~68 MB of FP32 weights from memory (~2.5 ms on one core here),
#: so the framework, not the serving path, sets the pace, and stacking requests into one
#: call (dynamic batching) reuses each weight for many rows (batch 32: ~9x the rows/s).
WIDE_MLP_SIZES = (64, 4096, 4096, 10)

WIDE_MLP_CONFIG = (
    "# The compute-bound benchmark model: the same wide MLP in three frameworks.\n"
    'default_variant = "onnx"\n'
    "\n" + MLP_TENSORS
)


def dense_weights(sizes: tuple[int, ...], seed: int = 0) -> dict[str, np.ndarray]:
    """FP32 weights ``w1..wN`` (shape (in, out)) and biases ``b1..bN`` of a ReLU MLP with
    layer widths ``sizes`` (He initialisation, like ``mlp_weights``)."""
    rng = np.random.default_rng(seed)
    weights: dict[str, np.ndarray] = {}
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes), start=1):
        weights[f"w{i}"] = (rng.standard_normal((n_in, n_out)) * np.sqrt(2.0 / n_in)).astype(
            np.float32
        )
        weights[f"b{i}"] = (rng.standard_normal(n_out) * 0.1).astype(np.float32)
    return weights


def _layers(weights: dict[str, np.ndarray]) -> int:
    return sum(1 for k in weights if k.startswith("w"))


def dense_reference(x: np.ndarray, weights: dict[str, np.ndarray]) -> np.ndarray:
    """Forward pass of a ``dense_weights`` MLP in numpy (FP64, returned as FP32)."""
    h = np.asarray(x, dtype=np.float64)
    n = _layers(weights)
    for i in range(1, n + 1):
        h = h @ weights[f"w{i}"] + weights[f"b{i}"]
        if i < n:
            h = np.maximum(h, 0.0)
    return h.astype(np.float32)


def build_dense_torchscript(path: Path, weights: dict[str, np.ndarray]) -> Path:
    """Write a ``dense_weights`` MLP as a scripted TorchScript module: forward(input)."""
    import torch

    layers: list[torch.nn.Module] = []
    n = _layers(weights)
    for i in range(1, n + 1):
        w = weights[f"w{i}"]
        linear = torch.nn.Linear(w.shape[0], w.shape[1])
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(np.ascontiguousarray(w.T)))
            linear.bias.copy_(torch.from_numpy(weights[f"b{i}"]))
        layers.append(linear)
        if i < n:
            layers.append(torch.nn.ReLU())
    module = torch.nn.Sequential(*layers).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(module), str(path))
    return path


def build_dense_savedmodel(directory: Path, weights: dict[str, np.ndarray]) -> Path:
    """Write a ``dense_weights`` MLP as a SavedModel: ``serving_default`` input -> output."""
    tf = import_tensorflow()
    n = _layers(weights)
    width = weights["w1"].shape[0]

    class Dense(tf.Module):
        def __init__(self) -> None:
            super().__init__(name="dense")
            self.params = {k: tf.Variable(v, name=k, trainable=False) for k, v in weights.items()}

        @tf.function(input_signature=[tf.TensorSpec([None, width], tf.float32, name="input")])
        def serve(self, x: Any) -> dict[str, Any]:
            h = x
            for i in range(1, n + 1):
                h = tf.matmul(h, self.params[f"w{i}"]) + self.params[f"b{i}"]
                if i < n:
                    h = tf.nn.relu(h)
            return {"output": h}

    module = Dense()
    tf.saved_model.save(module, str(directory), signatures={"serving_default": module.serve})
    return directory


def build_dense_onnx(path: Path, weights: dict[str, np.ndarray], name: str = "dense") -> Path:
    """Write a ``dense_weights`` MLP as ONNX: input FP32 [batch, in] -> output FP32
    [batch, out]."""
    from onnx import TensorProto, helper, numpy_helper

    n = _layers(weights)
    nodes, current = [], "input"
    for i in range(1, n + 1):
        gemm = "output" if i == n else f"h{i}"
        nodes.append(helper.make_node("Gemm", [current, f"w{i}", f"b{i}"], [gemm]))
        if i < n:
            nodes.append(helper.make_node("Relu", [gemm], [f"a{i}"]))
            current = f"a{i}"
    graph = helper.make_graph(
        nodes,
        name,
        [
            helper.make_tensor_value_info(
                "input", TensorProto.FLOAT, ["batch", weights["w1"].shape[0]]
            )
        ],
        [
            helper.make_tensor_value_info(
                "output", TensorProto.FLOAT, ["batch", weights[f"w{n}"].shape[1]]
            )
        ],
        initializer=[numpy_helper.from_array(v, name=k) for k, v in weights.items()],
    )
    return save_onnx(graph, path)


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


# --- shared helpers --------------------------------------------------------------------


def save_onnx(graph: Any, path: Path) -> Path:
    """Wrap an ONNX ``graph`` in a model pinned to ``ONNX_OPSET``/``ONNX_IR_VERSION``, check
    it and write it to ``path``.

    onnx's own defaults follow the newest spec, which released runtimes may not load yet.
    """
    import onnx

    model = onnx.helper.make_model(
        graph,
        producer_name="tensorgate",
        opset_imports=[onnx.helper.make_opsetid("", ONNX_OPSET)],
    )
    model.ir_version = ONNX_IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def import_tensorflow() -> Any:
    """Import tensorflow for exporting a model, quietly and with small thread pools.

    TensorFlow sizes its thread pools once per process, when it first runs anything, and
    exporting here runs it before any SavedModel backend can ask for its own setting. So
    pin the pools to the backends' default (``BackendOptions``) while that is still possible
    rather than leave them at one thread per core.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    import tensorflow as tf

    defaults = BackendOptions()
    threading = tf.config.threading
    with contextlib.suppress(RuntimeError):  # already initialised: nothing left to decide
        if threading.get_intra_op_parallelism_threads() == 0:
            threading.set_intra_op_parallelism_threads(defaults.intra_op_threads)
        if threading.get_inter_op_parallelism_threads() == 0:
            threading.set_inter_op_parallelism_threads(defaults.inter_op_threads)
    return tf


# --- the repository --------------------------------------------------------------------


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
_DEMO_ENTRIES = ("scorer", "detector")


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
        (
            "scorer/tf",
            lambda: build_mlp_savedmodel(scorer / "tf" / "model.savedmodel", weights),
        ),
        ("scorer/onnx", lambda: build_mlp_onnx(scorer / "onnx" / "model.onnx", weights)),
        (
            "detector/1",
            lambda: build_detector_onnx(root / "detector" / "1" / "model.onnx", detector_weights()),
        ),
    ]
    for variant, build in builders:
        try:
            build()
        except ImportError as exc:
            logger.warning("demo variant %s skipped: %s is not installed", variant, exc.name)
            shutil.rmtree(root / variant, ignore_errors=True)
    written = tuple(name for name in SCORER_VERSIONS if (scorer / name).exists())
    (scorer / "config.toml").write_text(scorer_config(written))
