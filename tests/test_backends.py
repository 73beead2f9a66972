"""The framework backends, driven directly (no server), on tiny real models."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from tensorgate.backends import (
    Backend,
    BackendError,
    BackendOptions,
    BackendUnavailable,
    Signature,
    TensorSpec,
    detect,
)
from tensorgate.backends.base import BackendInputError
from tensorgate.backends.litert import LiteRTBackend
from tensorgate.backends.onnxruntime import OnnxRuntimeBackend
from tensorgate.backends.tf_savedmodel import TFSavedModelBackend
from tensorgate.backends.torch_export import TorchExportBackend
from tensorgate.backends.torchscript import TorchScriptBackend
from tensorgate.datatypes import by_name
from tensorgate.server.demo import (
    SCORER_CONFIG,
    build_mlp_onnx,
    build_mlp_pt2,
    build_mlp_savedmodel,
    build_mlp_tflite,
    build_mlp_torchscript,
    detector_reference,
    detector_weights,
    mlp_reference,
    mlp_weights,
    write_demo_repository,
)

from .modelfactory import (
    IDENTITY_DATATYPES,
    build_identity_all_onnx,
    build_identity_bf16_onnx,
    build_identity_onnx,
    build_string_onnx,
    build_string_savedmodel,
    build_string_torchscript,
    build_two_output_torchscript,
    write_broken_model,
)

#: The frameworks with string models (tests/modelfactory.py) as well as the scorer.
FRAMEWORKS = ("torch", "tf", "onnx")
#: Every backend the scorer is written for. pt2 is its ExportedProgram here (no compile per
#: session); tests/test_edge_backends.py serves the AOTInductor package.
SCORER_FRAMEWORKS = (*FRAMEWORKS, "pt2", "litert")
BACKENDS: dict[str, type[Backend]] = {
    "torch": TorchScriptBackend,
    "tf": TFSavedModelBackend,
    "onnx": OnnxRuntimeBackend,
    "pt2": TorchExportBackend,
    "litert": LiteRTBackend,
}
MODULES = {
    "torch": "torch",
    "tf": "tensorflow",
    "onnx": "onnxruntime",
    "pt2": "torch",
    "litert": "ai_edge_litert.interpreter",
}

#: What config.toml completes the scorer to (and what the TF and ONNX files say themselves).
SCORER = Signature(
    inputs=(TensorSpec("input", "FP32", (-1, 64)),),
    outputs=(TensorSpec("output", "FP32", (-1, 10)),),
)
FILE_SIGNATURES = {
    "torch": Signature(inputs=(TensorSpec("input"),), outputs=(TensorSpec(None),), positional=True),
    "tf": SCORER,
    "onnx": SCORER,
    # An ExportedProgram knows forward()'s argument names, dtypes and shapes, not output names.
    "pt2": Signature(
        inputs=(TensorSpec("input", "FP32", (-1, 64)),),
        outputs=(TensorSpec(None, "FP32", (-1, 10)),),
        positional=True,
    ),
    "litert": SCORER,
}

TEXTS = np.array([b"hello", b"World 42", "h\u00e9llo".encode(), b""], dtype=object)
UPPER = np.array([b"HELLO", b"WORLD 42", "H\u00e9LLO".encode(), b""], dtype=object)


def _load(cls: type[Backend], path: Path, **options: object) -> Backend:
    backend = cls()
    backend.load(path, BackendOptions(**options))  # type: ignore[arg-type]
    return backend


def _read_only(array: np.ndarray) -> np.ndarray:
    """The array as the codec hands it over: a read-only view of a request buffer."""
    return np.frombuffer(array.tobytes(), dtype=array.dtype).reshape(array.shape)


# --- models, each built and loaded once per session ---------------------------------------


@pytest.fixture(scope="session")
def weights() -> dict[str, np.ndarray]:
    return mlp_weights()


@pytest.fixture(scope="session")
def scorer_dirs(
    tmp_path_factory: pytest.TempPathFactory, weights: dict[str, np.ndarray]
) -> Callable[[str], Path]:
    """Builds a framework's scorer variant dir on first request."""
    root = tmp_path_factory.mktemp("scorer")
    built: dict[str, Path] = {}

    def variant(framework: str) -> Path:
        pytest.importorskip(MODULES[framework])
        if framework not in built:
            directory = root / framework
            if framework == "torch":
                build_mlp_torchscript(directory / "model.pt", weights)
            elif framework == "tf":
                build_mlp_savedmodel(directory / "model.savedmodel", weights)
            elif framework == "pt2":
                build_mlp_pt2(directory / "model.pt2", weights, compiled=False)
            elif framework == "litert":
                pytest.importorskip("tensorflow")  # the converter
                build_mlp_tflite(directory / "model.tflite", weights)
            else:
                build_mlp_onnx(directory / "model.onnx", weights)
            built[framework] = directory
        return built[framework]

    return variant


@pytest.fixture(scope="session")
def scorers(scorer_dirs: Callable[[str], Path]) -> Callable[[str], Backend]:
    """Loads (and, for TorchScript, binds) a framework's scorer on first request."""
    loaded: dict[str, Backend] = {}

    def scorer(framework: str) -> Backend:
        if framework not in loaded:
            cls = BACKENDS[framework]
            path = cls.find_model_file(scorer_dirs(framework))
            assert path is not None
            backend = _load(cls, path)
            backend.bind(SCORER)
            loaded[framework] = backend
        return loaded[framework]

    return scorer


@pytest.fixture(scope="session")
def onnx_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("onnxruntime")
    root = tmp_path_factory.mktemp("onnx")
    build_identity_all_onnx(root / "identity" / "model.onnx")
    build_identity_bf16_onnx(root / "identity_bf16" / "model.onnx")
    build_string_onnx(root / "string" / "model.onnx")
    return root


@pytest.fixture(scope="session")
def torch_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("torch")
    build_string_torchscript(root / "string" / "model.pt")
    build_two_output_torchscript(root / "two" / "model.pt")
    return root


@pytest.fixture(scope="session")
def tf_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("tensorflow")
    root = tmp_path_factory.mktemp("tf")
    build_string_savedmodel(root / "string" / "model.savedmodel")
    return root


# --- the scorer in every framework -------------------------------------------------------


@pytest.mark.parametrize("framework", SCORER_FRAMEWORKS)
def test_scorer_reports_what_its_file_says(
    framework: str, scorer_dirs: Callable[[str], Path]
) -> None:
    cls = BACKENDS[framework]
    path = cls.find_model_file(scorer_dirs(framework))
    assert path is not None
    assert cls().load(path, BackendOptions()) == FILE_SIGNATURES[framework]


@pytest.mark.parametrize("framework", SCORER_FRAMEWORKS)
@pytest.mark.parametrize("batch", [1, 7, 32])
def test_scorer_matches_numpy_reference(
    framework: str, batch: int, scorers: Callable[[str], Backend], weights: dict[str, np.ndarray]
) -> None:
    x = np.random.default_rng(batch).standard_normal((batch, 64)).astype(np.float32)
    result = scorers(framework).infer({"input": _read_only(x)})
    assert set(result) == {"output"}
    assert result["output"].dtype == np.float32
    assert result["output"].shape == (batch, 10)
    np.testing.assert_allclose(result["output"], mlp_reference(x, weights), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("framework", SCORER_FRAMEWORKS)
def test_concurrent_calls_on_one_backend_stay_correct(
    framework: str, scorers: Callable[[str], Backend], weights: dict[str, np.ndarray]
) -> None:
    backend = scorers(framework)
    failures: list[str] = []

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for _ in range(50):
                x = rng.standard_normal((int(rng.integers(1, 9)), 64)).astype(np.float32)
                got = backend.infer({"input": x})["output"]
                if not np.allclose(got, mlp_reference(x, weights), rtol=1e-5, atol=1e-5):
                    failures.append(f"thread {seed}: wrong result")
                    return
        except Exception as exc:  # reported below, with the thread it happened in
            failures.append(f"thread {seed}: {exc!r}")

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def test_torchscript_without_bind_uses_the_names_the_file_suggests(
    scorer_dirs: Callable[[str], Path], weights: dict[str, np.ndarray]
) -> None:
    backend = _load(TorchScriptBackend, scorer_dirs("torch") / "model.pt")
    x = np.ones((2, 64), np.float32)
    result = backend.infer({"input": x})
    np.testing.assert_allclose(result["output__0"], mlp_reference(x, weights), atol=1e-5)


# --- positional binding, strings, every datatype ------------------------------------------


def test_torchscript_binds_model_names_to_positions(torch_models: Path) -> None:
    backend = TorchScriptBackend()
    signature = backend.load(torch_models / "two" / "model.pt", BackendOptions())
    assert signature == Signature(
        inputs=(TensorSpec("a"), TensorSpec("b")),
        outputs=(TensorSpec(None), TensorSpec(None)),
        positional=True,
    )
    backend.bind(
        Signature(
            inputs=(TensorSpec("lhs", "FP32", (-1,)), TensorSpec("rhs", "FP32", (-1,))),
            outputs=(TensorSpec("sum", "FP32", (-1,)), TensorSpec("product", "FP32", (-1,))),
        )
    )
    a = np.array([1.0, 2.0, 3.0], np.float32)
    b = np.array([4.0, 5.0, -6.0], np.float32)
    result = backend.infer({"rhs": b, "lhs": a})
    np.testing.assert_array_equal(result["sum"], a + b)
    np.testing.assert_array_equal(result["product"], a * b)


def test_torchscript_bind_refuses_a_signature_of_the_wrong_arity(torch_models: Path) -> None:
    backend = _load(TorchScriptBackend, torch_models / "two" / "model.pt")
    with pytest.raises(BackendError, match="2 tensors"):
        backend.bind(SCORER)


def test_torchscript_bf16_goes_in_and_out_as_ml_dtypes(torch_models: Path) -> None:
    backend = _load(TorchScriptBackend, torch_models / "two" / "model.pt")
    a = np.array([1.5, -2.0, 0.25], dtype=ml_dtypes.bfloat16)
    b = np.array([0.5, 4.0, 8.0], dtype=ml_dtypes.bfloat16)
    result = backend.infer({"a": a, "b": b})
    assert result["output__0"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(result["output__0"].astype(np.float32), [2.0, 2.0, 8.25])
    np.testing.assert_array_equal(result["output__1"].astype(np.float32), [0.75, -8.0, 2.0])


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_string_models_round_trip_bytes(
    framework: str, torch_models: Path, tf_models: Path, onnx_models: Path
) -> None:
    directory = {"torch": torch_models, "tf": tf_models, "onnx": onnx_models}[framework]
    cls = BACKENDS[framework]
    path = cls.find_model_file(directory / "string")
    assert path is not None
    backend = cls()
    signature = backend.load(path, BackendOptions())
    by_name_ = Signature(
        inputs=(TensorSpec("text", "BYTES", (-1,)),), outputs=(TensorSpec("upper", "BYTES", (-1,)),)
    )
    expected = {
        "torch": Signature(
            inputs=(TensorSpec("texts", "BYTES", (-1,)),),
            outputs=(TensorSpec(None, "BYTES", (-1,)),),
            positional=True,
        ),
        "tf": by_name_,
        "onnx": by_name_,
    }[framework]
    assert signature == expected
    name = expected.inputs[0].name
    assert name is not None
    result = backend.infer({name: TEXTS})
    out = next(iter(result.values()))
    assert out.dtype == object
    assert all(type(v) is bytes for v in out)
    assert list(out) == list(UPPER)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_bytes_that_are_not_utf8(
    framework: str, torch_models: Path, tf_models: Path, onnx_models: Path
) -> None:
    # TF strings are raw bytes; onnxruntime and TorchScript take Python str, so UTF-8 only.
    directory = {"torch": torch_models, "tf": tf_models, "onnx": onnx_models}[framework]
    cls = BACKENDS[framework]
    path = cls.find_model_file(directory / "string")
    assert path is not None
    backend = _load(cls, path)
    name = "texts" if framework == "torch" else "text"
    texts = np.array([b"ok\x00", b"\xff\xfe"], dtype=object)
    if framework == "tf":
        assert list(backend.infer({name: texts})["upper"]) == [b"OK\x00", b"\xff\xfe"]
    else:
        with pytest.raises(BackendInputError, match="UTF-8"):
            backend.infer({name: texts})


def test_every_datatype_passes_through_onnx_identity(onnx_models: Path) -> None:
    backend = OnnxRuntimeBackend()
    signature = backend.load(onnx_models / "identity" / "model.onnx", BackendOptions())
    assert signature.inputs == tuple(TensorSpec(f"in_{dt}", dt, (-1,)) for dt in IDENTITY_DATATYPES)
    assert signature.outputs == tuple(
        TensorSpec(f"out_{dt}", dt, (-1,)) for dt in IDENTITY_DATATYPES
    )
    rng = np.random.default_rng(0)
    inputs: dict[str, np.ndarray] = {}
    for dt in IDENTITY_DATATYPES:
        if dt == "BYTES":
            inputs["in_BYTES"] = np.array([b"a", "\u00fc".encode(), b""], dtype=object)
        else:
            inputs[f"in_{dt}"] = (rng.random(3) * 100).astype(by_name(dt).numpy)
    result = backend.infer(
        {k: v if v.dtype == object else _read_only(v) for k, v in inputs.items()}
    )
    for dt in IDENTITY_DATATYPES:
        got = result[f"out_{dt}"]
        assert got.dtype == by_name(dt).numpy, dt
        np.testing.assert_array_equal(got, inputs[f"in_{dt}"], err_msg=dt)

    only = backend.infer(inputs, ["out_FP32"])
    assert set(only) == {"out_FP32"}


def test_onnx_bf16_goes_in_and_out_as_ml_dtypes(onnx_models: Path) -> None:
    backend = OnnxRuntimeBackend()
    signature = backend.load(onnx_models / "identity_bf16" / "model.onnx", BackendOptions())
    assert signature.inputs[0] == TensorSpec("in_BF16", "BF16", (-1,))
    x = np.array([1.5, -2.0, 3.0e10], dtype=ml_dtypes.bfloat16)
    y = np.array([0.5], np.float32)
    result = backend.infer({"in_BF16": _read_only(x), "in_FP32": y})
    assert result["out_BF16"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(result["out_BF16"], x)
    np.testing.assert_array_equal(result["out_FP32"], y)
    # Without BF16 among the outputs asked for, the plain numpy path takes the BF16 input.
    assert set(backend.infer({"in_BF16": x, "in_FP32": y}, ["out_FP32"])) == {"out_FP32"}


def test_onnx_says_why_it_cannot_mix_string_inputs_and_bf16_outputs(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    path = build_identity_onnx(tmp_path / "model.onnx", ("BF16", "BYTES"))
    backend = _load(OnnxRuntimeBackend, path)
    inputs = {
        "in_BF16": np.ones(2, ml_dtypes.bfloat16),
        "in_BYTES": np.array([b"x", b"y"], dtype=object),
    }
    with pytest.raises(BackendInputError, match="string inputs and BF16 outputs"):
        backend.infer(inputs)
    assert list(backend.infer(inputs, ["out_BYTES"])["out_BYTES"]) == [b"x", b"y"]


def test_tf_names_the_signatures_it_has(scorer_dirs: Callable[[str], Path]) -> None:
    path = scorer_dirs("tf") / "model.savedmodel"
    with pytest.raises(BackendError, match="'serving_default'"):
        TFSavedModelBackend().load(path, BackendOptions(signature_name="predict"))


# --- failures -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("framework", "filename"),
    [
        ("torch", "model.pt"),
        ("tf", "saved_model.pb"),
        ("onnx", "model.onnx"),
        ("pt2", "model.pt2"),
        ("litert", "model.tflite"),
    ],
)
def test_garbage_files_raise_backend_error(framework: str, filename: str, tmp_path: Path) -> None:
    pytest.importorskip(MODULES[framework])
    write_broken_model(tmp_path / filename)
    cls = BACKENDS[framework]
    path = cls.find_model_file(tmp_path)
    assert path is not None
    with pytest.raises(BackendError) as caught:
        cls().load(path, BackendOptions())
    assert not isinstance(caught.value, BackendUnavailable)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("framework", SCORER_FRAMEWORKS)
def test_missing_framework_raises_backend_unavailable(
    framework: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A None entry in sys.modules makes `import x` raise ImportError.
    monkeypatch.setitem(sys.modules, MODULES[framework], None)
    with pytest.raises(BackendUnavailable, match="pip install 'tensorgate\\["):
        BACKENDS[framework]().load(tmp_path / "model", BackendOptions())


def _sees_gpu(framework: str) -> bool:
    if framework == "litert":
        return False  # its Python package runs on the CPU only
    if framework in ("torch", "pt2"):
        import torch

        return bool(torch.cuda.is_available())
    if framework == "onnx":
        import onnxruntime

        return "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    from tensorgate.server.demo import import_tensorflow

    return bool(import_tensorflow().config.list_physical_devices("GPU"))


@pytest.mark.parametrize("framework", SCORER_FRAMEWORKS)
@pytest.mark.parametrize("device", ["cuda", "cuda:3", "tpu"])
def test_unavailable_devices_are_refused(
    framework: str, device: str, scorer_dirs: Callable[[str], Path]
) -> None:
    if device.startswith("cuda") and _sees_gpu(framework):
        pytest.skip("a GPU is present")
    cls = BACKENDS[framework]
    path = cls.find_model_file(scorer_dirs(framework))
    assert path is not None
    with pytest.raises(BackendError, match="device"):
        cls().load(path, BackendOptions(device=device))


# --- detection ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        (["model.pt"], {"torch": "model.pt"}),
        (["other.pt", "model.pt"], {"torch": "model.pt"}),
        (["b.ts", "a.pt"], {"torch": "a.pt"}),
        (["model.onnx"], {"onnx": "model.onnx"}),
        (["z.onnx", "a.onnx"], {"onnx": "a.onnx"}),
        (["saved_model.pb"], {"tf": "."}),
        (["model.savedmodel/saved_model.pb"], {"tf": "model.savedmodel"}),
        (["export/saved_model.pb"], {"tf": "export"}),
        (["model.pt2"], {"pt2": "model.pt2"}),
        (["b.pt2", "a.pt2", "model.pt"], {"pt2": "a.pt2", "torch": "model.pt"}),
        (["model.tflite"], {"litert": "model.tflite"}),
        (["z.tflite", "a.tflite"], {"litert": "a.tflite"}),
        (["README.md", "notes/saved_model.txt"], {}),
    ],
)
def test_find_model_file(files: list[str], expected: dict[str, str], tmp_path: Path) -> None:
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    for framework, cls in BACKENDS.items():
        found = cls.find_model_file(tmp_path)
        want = expected.get(framework)
        assert found == (None if want is None else tmp_path / want), framework


def test_find_model_file_ignores_directories_named_like_models(tmp_path: Path) -> None:
    (tmp_path / "model.pt").mkdir()
    (tmp_path / "model.onnx").mkdir()
    assert TorchScriptBackend.find_model_file(tmp_path) is None
    assert OnnxRuntimeBackend.find_model_file(tmp_path) is None


@pytest.mark.parametrize("framework", SCORER_FRAMEWORKS)
def test_detect_picks_the_backend_of_each_scorer_variant(
    framework: str, scorer_dirs: Callable[[str], Path]
) -> None:
    found = detect(scorer_dirs(framework))
    assert found is not None
    cls, path = found
    assert cls is BACKENDS[framework]
    assert path == cls.find_model_file(scorer_dirs(framework))


# --- the demo repository ------------------------------------------------------------------


def test_demo_repository_is_complete_and_idempotent(tmp_path: Path) -> None:
    for module in MODULES.values():
        pytest.importorskip(module)
    root = write_demo_repository(tmp_path / "demo")
    assert (root / ".complete").is_file()
    assert (root / "scorer" / "config.toml").read_text() == SCORER_CONFIG
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]  # no staging dir left behind

    variants = {
        "scorer/torch": (TorchScriptBackend, root / "scorer/torch/model.pt"),
        "scorer/tf": (TFSavedModelBackend, root / "scorer/tf/model.savedmodel"),
        "scorer/onnx": (OnnxRuntimeBackend, root / "scorer/onnx/model.onnx"),
        "scorer/pt2": (TorchExportBackend, root / "scorer/pt2/model.pt2"),
        "detector/1": (OnnxRuntimeBackend, root / "detector/1/model.onnx"),
        "detector_lite/1": (LiteRTBackend, root / "detector_lite/1/model.tflite"),
    }
    for variant, (cls, path) in variants.items():
        assert detect(root / variant) == (cls, path), variant

    detector = OnnxRuntimeBackend()
    assert detector.load(root / "detector/1/model.onnx", BackendOptions()) == Signature(
        inputs=(TensorSpec("image", "FP32", (-1, 3, 32, 32)),),
        outputs=(TensorSpec("scores", "FP32", (-1, 4)),),
    )
    image = np.random.default_rng(3).standard_normal((2, 3, 32, 32)).astype(np.float32)
    scores = detector.infer({"image": image})["scores"]
    np.testing.assert_allclose(scores, detector_reference(image, detector_weights()), atol=1e-5)
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, atol=1e-5)
    lite = LiteRTBackend()
    assert lite.load(root / "detector_lite/1/model.tflite", BackendOptions()) == Signature(
        inputs=(TensorSpec("image", "FP32", (-1, 3, 32, 32)),),
        outputs=(TensorSpec("scores", "FP32", (-1, 4)),),
    )
    np.testing.assert_allclose(lite.infer({"image": image})["scores"], scores, atol=1e-5)

    stamp = (root / "scorer/onnx/model.onnx").stat().st_mtime_ns
    assert write_demo_repository(root) == root
    assert (root / "scorer/onnx/model.onnx").stat().st_mtime_ns == stamp


def test_demo_repository_refuses_a_directory_with_other_content(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="choose another path"):
        write_demo_repository(tmp_path / "models")
    assert (tmp_path / "models" / "mine.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["models"]


def test_demo_repository_skips_a_variant_whose_framework_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("torch")
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    root = write_demo_repository(tmp_path / "demo")
    assert (root / ".complete").is_file()
    assert not (root / "scorer" / "tf").exists()
    assert not (root / "detector_lite").exists()  # converted by TensorFlow: no model left
    assert (root / "scorer" / "torch" / "model.pt").is_file()
    assert (root / "scorer" / "onnx" / "model.onnx").is_file()
    assert "scorer/tf skipped: tensorflow is not installed" in caplog.text
    config = (root / "scorer" / "config.toml").read_text()
    assert "[variants.torch]" in config and "[variants.onnx]" in config
    assert "[variants.tf]" not in config
