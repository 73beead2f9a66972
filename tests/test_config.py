"""Unit tests for server/config.py: config.toml is typed, and every error names the file and
the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from tensorgate.errors import ConfigError
from tensorgate.server.config import (
    CONFIG_FILE,
    InstancesConfig,
    ModelConfig,
    TensorConfig,
    VariantConfig,
    WarmupConfig,
    load_model_config,
)

FULL = """
backend = "onnxruntime"
max_batch_size = 8
default_variant = "fast"
device = "cuda:1"
intra_op_threads = 4
inter_op_threads = 2
signature_name = "serving_default"

[[input]]
name = "x"
datatype = "FP32"
shape = [-1, 3]

[[input]]
name = "mask"
datatype = "BOOL"

[[output]]
name = "y"
shape = [-1, 2]

[variants.fast]
backend = "torchscript"
device = "cpu"
intra_op_threads = 0
inter_op_threads = 3
signature_name = "predict"

[variants.slow]

[instances]
count = 3
max_queue_size = 16
"""


def _write(tmp_path: Path, text: str) -> Path:
    (tmp_path / CONFIG_FILE).write_text(text, encoding="utf-8")
    return tmp_path / CONFIG_FILE


def _error(tmp_path: Path, text: str) -> str:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_model_config(tmp_path)
    msg = str(e.value)
    assert str(path) in msg
    return msg


def test_absent_file_gives_defaults(tmp_path: Path) -> None:
    cfg = load_model_config(tmp_path)
    assert cfg == ModelConfig()
    assert cfg.backend is None
    assert cfg.max_batch_size == 0
    assert cfg.default_variant is None
    assert cfg.device == "cpu"
    assert (cfg.intra_op_threads, cfg.inter_op_threads) == (1, 1)
    assert cfg.signature_name is None
    assert cfg.input == [] and cfg.output == [] and cfg.variants == {}
    assert cfg.instances == InstancesConfig(count=1, max_queue_size=1024)


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    _write(tmp_path, "")
    assert load_model_config(tmp_path) == ModelConfig()


def test_full_valid_file(tmp_path: Path) -> None:
    _write(tmp_path, FULL)
    cfg = load_model_config(tmp_path)
    assert cfg.backend == "onnxruntime"
    assert cfg.max_batch_size == 8
    assert cfg.default_variant == "fast"
    assert cfg.device == "cuda:1"
    assert (cfg.intra_op_threads, cfg.inter_op_threads) == (4, 2)
    assert cfg.signature_name == "serving_default"
    assert cfg.input == [
        TensorConfig(name="x", datatype="FP32", shape=[-1, 3]),
        TensorConfig(name="mask", datatype="BOOL", shape=None),
    ]
    assert cfg.output == [TensorConfig(name="y", datatype=None, shape=[-1, 2])]
    assert cfg.variants == {
        "fast": VariantConfig(
            backend="torchscript",
            device="cpu",
            intra_op_threads=0,
            inter_op_threads=3,
            signature_name="predict",
        ),
        "slow": VariantConfig(),
    }
    assert cfg.instances == InstancesConfig(count=3, max_queue_size=16)


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:0", "cuda:7"])
def test_valid_devices(tmp_path: Path, device: str) -> None:
    _write(tmp_path, f'device = "{device}"\n')
    assert load_model_config(tmp_path).device == device


def test_scalar_and_variable_shapes_are_valid(tmp_path: Path) -> None:
    _write(tmp_path, '[[input]]\nname = "s"\nshape = []\n[[input]]\nname = "v"\nshape = [-1, -1]\n')
    assert [t.shape for t in load_model_config(tmp_path).input] == [[], [-1, -1]]


def test_config_is_frozen(tmp_path: Path) -> None:
    _write(tmp_path, "max_batch_size = 2\n")
    cfg = load_model_config(tmp_path)
    with pytest.raises(ValueError, match="frozen"):
        cfg.max_batch_size = 3  # type: ignore[misc]


# ---------------------------------------------------------------- errors


def test_unknown_top_level_field(tmp_path: Path) -> None:
    msg = _error(tmp_path, "max_batch_sise = 4\n")
    assert "max_batch_sise" in msg
    assert "unknown field" in msg


def test_unknown_field_in_a_table(tmp_path: Path) -> None:
    msg = _error(tmp_path, '[[input]]\nname = "x"\ndtype = "FP32"\n')
    assert "input.0.dtype" in msg
    assert "unknown field" in msg


def test_unknown_field_in_variant_and_instances(tmp_path: Path) -> None:
    msg = _error(tmp_path, "[variants.a]\nthreads = 2\n[instances]\ncuont = 2\n")
    assert "variants.a.threads" in msg
    assert "instances.cuont" in msg


def test_unknown_datatype_in_input(tmp_path: Path) -> None:
    msg = _error(tmp_path, '[[input]]\nname = "x"\ndatatype = "FLOAT32"\n')
    assert "input.0.datatype" in msg
    assert "FLOAT32" in msg
    assert "FP32" in msg  # the valid names are listed as the fix


def test_unknown_datatype_in_second_output(tmp_path: Path) -> None:
    msg = _error(
        tmp_path,
        '[[output]]\nname = "a"\ndatatype = "FP32"\n[[output]]\nname = "b"\ndatatype = "fp32"\n',
    )
    assert "output.1.datatype" in msg


@pytest.mark.parametrize("shape", ["[0]", "[-1, 0]", "[-2]", "[3, -5]"])
def test_bad_shape(tmp_path: Path, shape: str) -> None:
    msg = _error(tmp_path, f'[[input]]\nname = "x"\nshape = {shape}\n')
    assert "input.0.shape" in msg
    assert "-1" in msg


def test_tensor_table_needs_a_name(tmp_path: Path) -> None:
    msg = _error(tmp_path, '[[input]]\ndatatype = "FP32"\n')
    assert "input.0.name" in msg


def test_negative_max_batch_size(tmp_path: Path) -> None:
    msg = _error(tmp_path, "max_batch_size = -1\n")
    assert "max_batch_size" in msg


@pytest.mark.parametrize("device", ["gpu", "CPU", "tpu:0", ""])
def test_invalid_device(tmp_path: Path, device: str) -> None:
    msg = _error(tmp_path, f'device = "{device}"\n')
    assert "device" in msg
    assert "cuda:N" in msg


@pytest.mark.parametrize("device", ["cudafoo", "cuda:", "cuda:x"])
def test_device_lookalikes_refused(tmp_path: Path, device: str) -> None:
    # The validator's own message says "use 'cpu', 'cuda' or 'cuda:N'".
    msg = _error(tmp_path, f'device = "{device}"\n')
    assert "device" in msg


def test_invalid_variant_device(tmp_path: Path) -> None:
    msg = _error(tmp_path, '[variants.a]\ndevice = "gpu"\n')
    assert "variants.a.device" in msg


def test_negative_threads(tmp_path: Path) -> None:
    msg = _error(tmp_path, "intra_op_threads = -1\n[variants.a]\ninter_op_threads = -2\n")
    assert "intra_op_threads" in msg
    assert "variants.a.inter_op_threads" in msg


def test_bad_toml_syntax(tmp_path: Path) -> None:
    msg = _error(tmp_path, "max_batch_size = = 4\n")
    assert "not valid TOML" in msg


def test_non_utf8_file(tmp_path: Path) -> None:
    (tmp_path / CONFIG_FILE).write_bytes(b'backend = "\xff"\n')
    with pytest.raises(ConfigError, match="not valid TOML") as e:
        load_model_config(tmp_path)
    assert str(tmp_path / CONFIG_FILE) in str(e.value)


@pytest.mark.parametrize(("count", "ok"), [(0, False), (1, True), (64, True), (65, False)])
def test_instances_count_bounds(tmp_path: Path, count: int, ok: bool) -> None:
    text = f"[instances]\ncount = {count}\n"
    if ok:
        _write(tmp_path, text)
        assert load_model_config(tmp_path).instances.count == count
    else:
        assert "instances.count" in _error(tmp_path, text)


def test_instances_max_queue_size_zero(tmp_path: Path) -> None:
    assert "instances.max_queue_size" in _error(tmp_path, "[instances]\nmax_queue_size = 0\n")


def test_wrong_type(tmp_path: Path) -> None:
    msg = _error(tmp_path, "max_batch_size = [1]\n")
    assert "max_batch_size" in msg


def test_every_error_is_reported_at_once(tmp_path: Path) -> None:
    msg = _error(tmp_path, 'max_batch_size = -1\ndevice = "gpu"\n')
    assert "max_batch_size" in msg
    assert "device" in msg


def test_duplicate_input_names_refused(tmp_path: Path) -> None:
    msg = _error(
        tmp_path,
        '[[input]]\nname = "x"\ndatatype = "FP32"\n[[input]]\nname = "x"\ndatatype = "INT32"\n',
    )
    assert "input" in msg
    assert "'x'" in msg


def test_warmup_defaults_and_values(tmp_path: Path) -> None:
    _write(tmp_path, "[warmup]\n")
    assert load_model_config(tmp_path).warmup == WarmupConfig(
        requests=3, batch_size=1, data="zeros"
    )
    _write(tmp_path, 'max_batch_size = 8\n[warmup]\nrequests = 5\nbatch_size = 8\ndata = "w.npz"\n')
    assert load_model_config(tmp_path).warmup == WarmupConfig(
        requests=5, batch_size=8, data="w.npz"
    )
    assert load_model_config(tmp_path / "absent").warmup is None


@pytest.mark.parametrize("data", ["ones", "warmup.npy", "/abs/warmup.npz", "../up.npz"])
def test_warmup_data_must_be_zeros_random_or_a_npz_in_the_folder(tmp_path: Path, data: str) -> None:
    msg = _error(tmp_path, f'[warmup]\ndata = "{data}"\n')
    assert "field 'warmup.data'" in msg
    assert '"zeros", "random", or the name of a .npz file in the model folder' in msg


def test_warmup_batch_size_within_max_batch_size(tmp_path: Path) -> None:
    msg = _error(tmp_path, "max_batch_size = 4\n[warmup]\nbatch_size = 8\n")
    assert "[warmup] batch_size = 8 exceeds the model's max_batch_size = 4" in msg


@pytest.mark.parametrize("text", ["requests = -1", "batch_size = 0", "rows = 2"])
def test_warmup_bad_fields(tmp_path: Path, text: str) -> None:
    assert "field 'warmup." in _error(tmp_path, f"[warmup]\n{text}\n")


def test_variant_version_must_be_a_positive_integer(tmp_path: Path) -> None:
    assert VariantConfig(version=3).version == 3
    for bad in ("0", "-2", '"three"'):
        msg = _error(tmp_path, f"[variants.onnx]\nversion = {bad}\n")
        assert "field 'variants.onnx.version'" in msg
