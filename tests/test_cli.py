"""The ``tensorgate`` command as a user runs it: each test starts the CLI as a subprocess."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from tensorgate.clients import Client
from tensorgate.server.demo import mlp_reference, mlp_weights

from .serverproc import ServerProcess

CLI = (sys.executable, "-m", "tensorgate.server.cli")
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
ATOL = 1e-5
SCORER_VARIANTS = {"torch", "tf", "onnx", "pt2"}


def tensorgate(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=ENV)


def scorer_input(rows: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 64)).astype(np.float32)


def test_demo_writes_the_repository(tmp_path: Path) -> None:
    root = tmp_path / "models"
    run = tensorgate("demo", str(root))
    assert run.returncode == 0, run.stderr
    files = (
        "scorer/torch/model.pt",
        "scorer/tf/model.savedmodel/saved_model.pb",
        "scorer/onnx/model.onnx",
        "scorer/pt2/model.pt2",
        "scorer/config.toml",
        "detector/1/model.onnx",
        "detector_lite/1/model.tflite",
    )
    for name in files:
        assert (root / name).is_file(), f"demo did not write {name}"
        assert name in run.stdout.split(), f"demo did not list {name}:\n{run.stdout}"
    # The files hold the demo weights (checked on one of them; the backend tests do the rest).
    import onnxruntime

    x = scorer_input(3, seed=1)
    session = onnxruntime.InferenceSession(
        str(root / "scorer/onnx/model.onnx"), providers=["CPUExecutionProvider"]
    )
    got = session.run(["output"], {"input": x})[0]
    np.testing.assert_allclose(got, mlp_reference(x, mlp_weights()), rtol=0, atol=ATOL)


def test_infer_npy_input_as_json(server: ServerProcess, tmp_path: Path) -> None:
    x = scorer_input(4, seed=2)
    np.save(tmp_path / "x.npy", x)
    run = tensorgate(
        "infer", "scorer", "--url", server.address, "--input", f"input={tmp_path / 'x.npy'}",
        "--json",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    reply = json.loads(run.stdout)
    assert reply["model"] == "scorer"
    assert reply["variant"] in SCORER_VARIANTS
    got = np.array(reply["outputs"]["output"], dtype=np.float32)
    np.testing.assert_allclose(got, mlp_reference(x, mlp_weights()), rtol=0, atol=ATOL)


def test_infer_json_literal_input_pinned(server: ServerProcess) -> None:
    x = scorer_input(1, seed=3)
    run = tensorgate(
        "infer", "scorer", "--url", server.address, "--version", "onnx",
        "--input", f"input={json.dumps(x.tolist())}", "--json",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    reply = json.loads(run.stdout)
    assert reply["variant"] == "onnx"
    got = np.array(reply["outputs"]["output"], dtype=np.float32)
    np.testing.assert_allclose(got, mlp_reference(x, mlp_weights()), rtol=0, atol=ATOL)


def test_infer_random_inputs(server: ServerProcess) -> None:
    run = tensorgate("infer", "detector", "--url", server.address, "--random")
    assert run.returncode == 0, run.stderr
    assert "served by variant '1'" in run.stdout
    assert re.search(r"^scores: float32 \[1, 4\]$", run.stdout, re.MULTILINE), run.stdout


def test_infer_unknown_model_fails(server: ServerProcess) -> None:
    run = tensorgate("infer", "nosuchmodel", "--url", server.address, "--random")
    assert run.returncode != 0
    assert "NOT_FOUND" in run.stderr
    assert "Request for unknown model: 'nosuchmodel'" in run.stderr
    assert run.stdout == ""


def test_serve_help_lists_options() -> None:
    run = tensorgate("serve", "--help")
    assert run.returncode == 0, run.stderr
    for option in ("--repository", "--host", "--port", "--metrics-port"):
        # "--port" must appear as itself, not only inside "--port-file" or "--metrics-port".
        assert re.search(rf"(?<![\w-]){option}(?![\w-])", run.stdout), (option, run.stdout)


def test_serve_without_repository_generates_the_demo(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    port_file = tmp_path / "ports.json"
    log_path = tmp_path / "serve.log"
    cmd = [
        *CLI, "serve", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
        "--port-file", str(port_file),
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env={**ENV, "XDG_CACHE_HOME": str(cache)}
        )
        try:
            # Generating the demo, then loading three frameworks, on a busy machine.
            deadline = time.monotonic() + 300
            while not port_file.exists():
                assert proc.poll() is None, f"serve exited early:\n{log_path.read_text()}"
                assert time.monotonic() < deadline, f"serve did not start:\n{log_path.read_text()}"
                time.sleep(0.1)
            port = json.loads(port_file.read_text())["grpc_port"]
            x = scorer_input(2, seed=4)
            with Client(f"127.0.0.1:{port}") as client:
                result = client.infer("scorer", {"input": x}, timeout=30)
            np.testing.assert_allclose(
                result["output"], mlp_reference(x, mlp_weights()), rtol=0, atol=ATOL
            )
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0, log_path.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert (cache / "tensorgate" / "demo" / "scorer" / "config.toml").is_file()
    assert "no --repository given" in log_path.read_text()


def test_event_loop_choice(model_repo: Path, tmp_path: Path) -> None:
    """``serve`` runs on uvloop by default (a dependency) and on the standard loop when
    asked; both serve; an unknown choice is a usage error."""
    x = np.ones((1, 64), np.float32)
    expected = mlp_reference(x, mlp_weights())
    for choice, loop in (("auto", "uvloop.Loop"), ("asyncio", "asyncio.unix_events")):
        with ServerProcess(model_repo, tmp_path, "--event-loop", choice) as proc:
            with Client(proc.address) as client:
                out = client.infer("scorer", {"input": x}, version="onnx")["output"]
            np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
            assert f"event loop: {loop}" in proc.log()
    bad = subprocess.run(
        [sys.executable, "-m", "tensorgate.server.cli", "serve", "--repository",
         str(model_repo), "--event-loop", "trio"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2 and "--event-loop" in bad.stderr
