"""``[warmup]``: each variant runs sample executions before it reports ready, through the
real gateway. The model is a real TorchScript module that remembers its calls
(``modelfactory.build_warmup_probe_torchscript``): the first request after a load reports
how many executions ran before it, with how many rows and what data, so the tests see the
warmup from the outside, without timing."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tensorgate.backends import TensorSpec
from tensorgate.clients import Client, InferenceError
from tensorgate.errors import ConfigError
from tensorgate.protos import grpc_service_pb2 as pb
from tensorgate.protos import grpc_service_pb2_grpc as pb_grpc
from tensorgate.server.config import WarmupConfig
from tensorgate.server.signature import ModelSignature
from tensorgate.server.warmup import warmup_inputs

from . import modelfactory as mf
from .serverproc import ServerProcess, wait_until
from .slowmodel import build_slow_onnx, slow_inputs

# Talks gRPC: runs against both front ends (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("front_end")

TENSORS = """
[[input]]
name = "x"
datatype = "FP32"
shape = [-1, 4]

[[output]]
name = "y"
datatype = "FP32"
shape = [-1, 4]

[[output]]
name = "seen"
datatype = "FP64"
shape = [3]
"""


def warmup(requests: int, data: str, batch_size: int = 1) -> str:
    return f'\n[warmup]\nrequests = {requests}\nbatch_size = {batch_size}\ndata = "{data}"\n'


# model -> (variants, warmup table, the probe refuses all-zero input)
MODELS = {
    "cold": (("1",), "", False),
    "zeros": (("1",), warmup(3, "zeros", batch_size=2), False),
    "random": (("1",), warmup(2, "random", batch_size=5), False),
    "fromfile": (("1",), warmup(1, "warmup.npz"), False),
    "pair": (("a", "b"), warmup(3, "zeros"), False),
    "uncounted": (("1",), warmup(3, "zeros"), False),
    "refused": (("1",), warmup(3, "zeros"), True),
    "missingfile": (("1",), warmup(3, "missing.npz"), False),
    "reloaded": (("1",), warmup(3, "zeros"), False),
}
FILE_INPUT = np.arange(12, dtype=np.float32).reshape(3, 4)


@pytest.fixture(scope="module")
def probes(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Path]:
    """One probe model file of each kind, copied into every variant (scripting is slow)."""
    root = tmp_path_factory.mktemp("probes")
    return {
        refuse: mf.build_warmup_probe_torchscript(root / f"{refuse}" / "model.pt", refuse)
        for refuse in (False, True)
    }


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, probes: dict[bool, Path]) -> Path:
    root = tmp_path_factory.mktemp("warmup") / "models"
    for name, (variants, table, refuse) in MODELS.items():
        for variant in variants:
            (root / name / variant).mkdir(parents=True)
            shutil.copy(probes[refuse], root / name / variant / "model.pt")
        (root / name / "config.toml").write_text(TENSORS + table)
    np.savez(root / "fromfile" / "warmup.npz", x=FILE_INPUT)
    # A warmup of seconds (the slow model on a large sample) under a limit of one second.
    build_slow_onnx(root / "slowwarm" / "1" / "model.onnx")
    np.savez(root / "slowwarm" / "warmup.npz", **slow_inputs(64, 40_000))
    (root / "slowwarm" / "config.toml").write_text(
        '[warmup]\nrequests = 1\ndata = "warmup.npz"\ntimeout_s = 1\n'
    )
    # An isolated variant with a warmup: a restarted worker is warmed again.
    (root / "isowarm" / "1").mkdir(parents=True)
    shutil.copy(probes[False], root / "isowarm" / "1" / "model.pt")
    (root / "isowarm" / "config.toml").write_text(
        'isolation = "process"\n' + TENSORS + warmup(3, "zeros")
    )
    return root


def seen(module_client: Client, model: str, version: str | None = None) -> list[float]:
    """(executions before this request, rows of the one before, sum of its input)."""
    x = np.ones((1, 4), np.float32)
    result = module_client.infer(model, {"x": x}, version=version, timeout=30)
    np.testing.assert_array_equal(result["y"], 2 * x)
    return result["seen"].tolist()


def test_without_warmup_the_first_request_is_the_first_execution(module_client: Client) -> None:
    assert seen(module_client, "cold") == [0, 0, 0]


def test_zeros_run_the_asked_executions_and_rows_before_ready(module_client: Client) -> None:
    assert module_client.is_model_ready("zeros", "1")
    assert seen(module_client, "zeros") == [3, 2, 0]
    assert seen(module_client, "zeros") == [4, 1, 4]  # then the requests themselves


def test_random_data(module_client: Client) -> None:
    calls, rows, total = seen(module_client, "random")
    assert (calls, rows) == (2, 5)
    assert total != 0


def test_data_from_a_npz_file(module_client: Client) -> None:
    assert seen(module_client, "fromfile") == [1, 3, FILE_INPUT.sum()]


def test_every_variant_is_warmed(module_client: Client) -> None:
    assert [seen(module_client, "pair", v) for v in ("a", "b")] == [[3, 1, 0], [3, 1, 0]]


def test_warmup_requests_are_not_counted(
    module_client: Client, module_server: ServerProcess
) -> None:
    def counted() -> tuple[int, int, float]:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        (stats,) = stub.ModelStatistics(
            pb.ModelStatisticsRequest(name="uncounted", version="1"), timeout=10
        ).model_stats
        requests = module_server.metric("tensorgate_requests_total", model="uncounted")
        return stats.inference_count, stats.execution_count, requests

    with grpc.insecure_channel(module_server.address) as channel:
        assert counted() == (0, 0, 0)
        assert seen(module_client, "uncounted") == [3, 1, 0]  # the warmup did run
        assert counted() == (1, 1, 1)


def test_a_failing_warmup_fails_the_load_and_says_warmup(
    module_client: Client, module_server: ServerProcess
) -> None:
    assert module_client.is_model_ready("refused") is False
    (entry,) = [m for m in module_client.repository_index() if m["name"] == "refused"]
    assert entry["state"] == "UNAVAILABLE"
    assert entry["reason"].startswith("warmup failed (3 request(s) of zeros data, batch_size 1)")
    assert "an all-zero basket cannot be scored" in entry["reason"]
    with pytest.raises(InferenceError) as e:
        seen(module_client, "refused")
    assert e.value.code == grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(module_server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        status = {
            name: health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status
            for name in ("refused", "zeros")
        }
    assert status == {
        "refused": health_pb2.HealthCheckResponse.NOT_SERVING,
        "zeros": health_pb2.HealthCheckResponse.SERVING,
    }


def test_a_missing_data_file_is_a_config_error(module_client: Client) -> None:
    assert module_client.is_model_ready("missingfile") is False
    (entry,) = [m for m in module_client.repository_index() if m["name"] == "missingfile"]
    assert entry["state"] == "UNAVAILABLE"
    assert "config.toml: field 'warmup.data': no file" in entry["reason"]
    assert "missing.npz" in entry["reason"]


def test_a_reload_warms_the_new_version_and_a_failed_one_keeps_the_old(
    module_client: Client, repo: Path, probes: dict[bool, Path]
) -> None:
    variant = repo / "reloaded" / "1" / "model.pt"
    assert seen(module_client, "reloaded") == [3, 1, 0]
    # New files whose warmup fails: refused, and the loaded version keeps serving.
    shutil.copy(probes[True], variant)
    with pytest.raises(InferenceError) as e:
        module_client.load_model("reloaded", timeout=60)
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "warmup failed" in str(e.value) and "all-zero basket" in str(e.value)
    assert seen(module_client, "reloaded") == [4, 1, 4]
    # New files that warm up: the new version has run its warmup before its first request.
    shutil.copy(probes[False], variant)
    (repo / "reloaded" / "config.toml").write_text(TENSORS + warmup(2, "random", batch_size=3))
    module_client.load_model("reloaded", timeout=60)
    assert seen(module_client, "reloaded")[:2] == [2, 3]


def test_a_warmup_past_its_timeout_fails_the_load_and_says_so(
    module_client: Client, module_server: ServerProcess
) -> None:
    why = "it took longer than [warmup] timeout_s = 1 s (0 of 1 execution(s) done"
    (entry,) = [m for m in module_client.repository_index() if m["name"] == "slowwarm"]
    assert entry["state"] == "UNAVAILABLE"
    assert entry["reason"].startswith("warmup failed (1 request(s) of warmup.npz data"), entry
    assert why in entry["reason"], entry["reason"]
    assert why in module_server.log()
    shown = subprocess.run(
        [sys.executable, "-m", "tensorgate.server.cli", "routes", "show", "slowwarm",
         "--url", module_server.address],
        capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "400"},
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert why in " ".join(shown.stdout.split()), shown.stdout
    # The others serve.
    assert module_client.is_model_ready("zeros") and module_client.is_model_ready("isowarm")


def test_a_restarted_isolated_worker_is_warmed_before_it_serves(
    module_client: Client, module_server: ServerProcess
) -> None:
    def worker() -> int | None:
        return next(
            (p for p, c in module_server.children().items() if "--label isowarm/1" in c), None
        )

    assert seen(module_client, "isowarm") == [3, 1, 0]
    old = worker()
    assert old is not None
    os.kill(old, signal.SIGKILL)

    def first_answer() -> list[float] | None:
        try:
            return seen(module_client, "isowarm")
        except InferenceError as e:
            assert e.code == grpc.StatusCode.UNAVAILABLE, e
            return None

    # The new worker's first request comes after its 3 warmup executions.
    assert wait_until(first_answer, 120, "the restarted worker to serve") == [3, 1, 0]
    assert worker() not in (None, old)
    assert "isolated worker for isowarm/1 warmed up: 3 request(s)" in module_server.log()


# -- the sample data, unit-tested ---------------------------------------------------------

SIG = ModelSignature(
    inputs=(
        TensorSpec("x", "FP32", (-1, 4, -1)),
        TensorSpec("ids", "INT64", (2,)),
        TensorSpec("text", "BYTES", (-1,)),
    ),
    outputs=(TensorSpec("y", "FP32", (-1,)),),
    max_batch_size=0,
)


@pytest.mark.parametrize("data", ["zeros", "random"])
def test_generated_data_fits_the_signature(tmp_path: Path, data: str) -> None:
    inputs = warmup_inputs("m", tmp_path, WarmupConfig(batch_size=3, data=data), SIG)
    # A variable first dimension is the rows, any other variable dimension 1.
    assert {n: a.shape for n, a in inputs.items()} == {"x": (3, 4, 1), "ids": (2,), "text": (3,)}
    assert {n: a.dtype for n, a in inputs.items()} == {
        "x": np.float32,
        "ids": np.int64,
        "text": object,
    }
    if data == "zeros":
        assert not inputs["x"].any() and not inputs["ids"].any()
        assert list(inputs["text"]) == [b"", b"", b""]
    else:
        assert inputs["x"].any()
        assert all(isinstance(t, bytes) and len(t) == 8 for t in inputs["text"])
        again = warmup_inputs("m", tmp_path, WarmupConfig(batch_size=3, data=data), SIG)
        np.testing.assert_array_equal(again["x"], inputs["x"])  # seeded


def test_npz_data_is_cast_within_its_kind(tmp_path: Path) -> None:
    np.savez(
        tmp_path / "w.npz",
        x=np.ones((2, 4, 5), np.float64),
        ids=np.array([1, 2], np.int32),
        text=np.array(["a", "bé"]),
    )
    inputs = warmup_inputs("m", tmp_path, WarmupConfig(data="w.npz"), SIG)
    assert inputs["x"].dtype == np.float32 and inputs["x"].shape == (2, 4, 5)
    assert inputs["ids"].dtype == np.int64
    assert list(inputs["text"]) == [b"a", "bé".encode()]


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        (
            {"x": np.ones((1, 4, 1), np.float32), "ids": np.ones(2, np.int64)},
            r"must hold one array per input of model 'm' \['x', 'ids', 'text'\]; missing "
            r"\['text'\], unknown \[\]",
        ),
        (
            {"x": np.ones((1, 4, 1)), "ids": np.ones(2), "text": np.array(["a"])},
            r"array 'ids' in w\.npz is float64, which cannot become INT64",
        ),
        (
            {"x": np.ones((1, 4, 1)), "ids": np.ones(2, np.int64), "text": np.ones(1)},
            r"array 'text' in w\.npz is float64, but the input is BYTES",
        ),
        (
            {"x": np.ones((1, 5, 1)), "ids": np.ones(2, np.int64), "text": np.array(["a"])},
            r"field 'warmup': the warmup data does not fit: input 'x' of model 'm': shape "
            r"\[1, 5, 1\], expected \[-1, 4, -1\]",
        ),
    ],
    ids=["missing", "float-for-int", "numbers-for-bytes", "shape"],
)
def test_npz_data_that_does_not_fit_is_a_config_error(
    tmp_path: Path, arrays: dict[str, np.ndarray], message: str
) -> None:
    np.savez(tmp_path / "w.npz", **arrays)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=message) as e:
        warmup_inputs("m", tmp_path, WarmupConfig(data="w.npz"), SIG)
    assert str(tmp_path / "config.toml") in str(e.value)


def test_a_file_numpy_cannot_read_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "w.npz").write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match=r"w\.npz is not a \.npz file numpy can read"):
        warmup_inputs("m", tmp_path, WarmupConfig(data="w.npz"), SIG)
