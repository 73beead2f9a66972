"""GPU placement check: each backend loaded with ``device = "cuda:0"`` against the same
model on the CPU, then a whole gateway serving a GPU variant, and ``--workers`` scaling
on a machine whose cores are free. One short run; prints and writes JSON.

    python loadtest/gpu_check.py --out gpu_check.json [--skip-gateway] [--skip-workers]

Needs numpy and whichever frameworks are installed (a framework that is missing is
reported, not fatal); the gateway parts also need the server's packages (grpcio 1.85,
protobuf 7, pydantic, prometheus-client). Works from a source checkout that is not
pip-installed: the ``tensorgate`` package is then assembled from the checkout's folders.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS: dict[str, object] = {}


def import_tensorgate() -> str:
    """Make ``import tensorgate.*`` work; returns the PYTHONPATH entry for subprocesses."""
    try:
        import tensorgate.backends  # noqa: F401

        return ""
    except ImportError:
        pass
    farm = Path(tempfile.mkdtemp(prefix="tensorgate-src-"))
    pkg = farm / "tensorgate"
    pkg.mkdir()
    shutil.copy(ROOT / "tensorgate" / "__init__.py", pkg / "__init__.py")
    for sub in ("server", "backends", "clients", "protos"):
        (pkg / sub).symlink_to(ROOT / sub, target_is_directory=True)
    sys.path.insert(0, str(farm))
    return str(farm)


def environment() -> dict[str, object]:
    env: dict[str, object] = {"python": sys.version.split()[0]}
    try:
        import torch

        env["torch"] = torch.__version__
        env["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
            env["cuda"] = torch.version.cuda
    except ImportError as e:
        env["torch"] = f"missing: {e}"
    try:
        import onnxruntime as ort

        env["onnxruntime"] = ort.__version__
        env["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError as e:
        env["onnxruntime"] = f"missing: {e}"
    try:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import tensorflow as tf

        env["tensorflow"] = tf.__version__
        env["tensorflow_gpus"] = len(tf.config.list_physical_devices("GPU"))
    except ImportError as e:
        env["tensorflow"] = f"missing: {e}"
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        env["nvidia_smi"] = out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        env["nvidia_smi"] = f"unavailable: {e}"
    env["cores"] = os.cpu_count()
    return env


def _time(backend, x: np.ndarray, seconds: float = 0.5) -> float:
    """Median ms per call (outputs come back to host memory: copies included)."""
    for _ in range(3):
        backend.infer({"input": x})
    samples: list[float] = []
    until = time.perf_counter() + seconds
    while time.perf_counter() < until or len(samples) < 5:
        t0 = time.perf_counter()
        backend.infer({"input": x})
        samples.append(time.perf_counter() - t0)
    return float(np.median(samples) * 1e3)


def check_backends(tmp: Path) -> list[dict[str, object]]:
    from tensorgate.backends import BackendOptions, Signature, TensorSpec, backend_class
    from tensorgate.server import demo

    models = {
        "scorer": (demo.mlp_weights(), demo.MLP_SIZES),
        "wide": (demo.dense_weights(demo.WIDE_MLP_SIZES), demo.WIDE_MLP_SIZES),
    }
    builders = {
        "torchscript": ("model.pt", demo.build_dense_torchscript),
        "onnxruntime": ("model.onnx", demo.build_dense_onnx),
        "tf_savedmodel": ("model.savedmodel", demo.build_dense_savedmodel),
    }
    rows: list[dict[str, object]] = []
    rng = np.random.default_rng(0)
    for model, (weights, sizes) in models.items():
        x = rng.standard_normal((64, sizes[0])).astype(np.float32)
        reference = demo.dense_reference(x, weights)
        signature = Signature(
            (TensorSpec("input", "FP32", (-1, sizes[0])),),
            (TensorSpec("output", "FP32", (-1, sizes[-1])),),
        )
        for backend_name, (filename, build) in builders.items():
            path = tmp / model / backend_name / filename
            try:
                build(path, weights)
            except ImportError as e:
                rows.append({"model": model, "backend": backend_name, "built": False,
                             "error": f"framework not installed: {e}"})  # fmt: skip
                continue
            cpu_out = None
            for device in ("cpu", "cuda:0"):
                row: dict[str, object] = {"model": model, "backend": backend_name,
                                          "device": device}  # fmt: skip
                try:
                    backend = backend_class(backend_name)()
                    backend.load(path, BackendOptions(device=device))
                    backend.bind(signature)
                    out = backend.infer({"input": x})["output"]
                    row["max_abs_diff_vs_numpy"] = float(np.abs(out - reference).max())
                    if device == "cpu":
                        cpu_out = out
                    elif cpu_out is not None:
                        row["max_abs_diff_vs_cpu"] = float(np.abs(out - cpu_out).max())
                    row["ok"] = bool(np.allclose(out, reference, atol=2e-3, rtol=2e-3))
                    row["ms_batch1"] = _time(backend, x[:1])
                    row["ms_batch64"] = _time(backend, x)
                    if backend_name == "onnxruntime":
                        row["providers"] = backend._session.get_providers()
                    backend.unload()
                except Exception as e:  # reported, not fatal: the point is to find out
                    row["ok"] = False
                    row["error"] = f"{type(e).__name__}: {e}"
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


class Server:
    def __init__(self, repo: Path, workdir: Path, pythonpath: str, *args: str) -> None:
        self.port_file = workdir / f"ports-{time.monotonic_ns()}.json"
        env = dict(os.environ)
        if pythonpath:
            env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, env.get("PYTHONPATH")) if p)
        self.env = env
        self.log = open(self.port_file.with_suffix(".log"), "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tensorgate.server.cli", "serve", "-r", str(repo),
             "--port", "0", "--metrics-port", "0", "--port-file", str(self.port_file),
             "--log-level", "WARNING", *args],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=workdir,
        )  # fmt: skip
        # cwd: not the checkout, whose bare tensorgate/ folder would shadow the package.
        self.workdir = workdir
        deadline = time.monotonic() + 180
        while not self.port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server did not start: {self.tail()}")
            time.sleep(0.1)
        self.address = f"127.0.0.1:{json.loads(self.port_file.read_text())['grpc_port']}"

    def tail(self) -> str:
        return self.port_file.with_suffix(".log").read_text(errors="replace")[-3000:]

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode

    def bench(self, model: str, clients: int, *args: str) -> dict[str, object]:
        """``clients`` tensorgate bench processes at once; their OK requests/s summed."""
        cmd = [sys.executable, "-m", "tensorgate.server.cli", "bench", model, "--url",
               self.address, "--format", "json", *args]  # fmt: skip
        procs = [
            subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.env, cwd=self.workdir
            )
            for _ in range(clients)
        ]
        outs = [p.communicate(timeout=120) for p in procs]
        summaries = []
        for p, (out, err) in zip(procs, outs, strict=True):
            if p.returncode != 0:
                raise RuntimeError(f"bench failed: {err.decode()[-2000:]}")
            summaries.append(json.loads(out))
        return {
            "ok_rps": sum(s["ok_rps"] for s in summaries),
            "p50_ms": max(s["latency_ms"]["p50"] for s in summaries),
            "p99_ms": max(s["latency_ms"]["p99"] for s in summaries),
            "codes": [s["codes"] for s in summaries],
        }


def gpu_config(device: str) -> str:
    """config.toml of the wide MLP on ``device``, batched (tensorgate is importable by now)."""
    from tensorgate.server.demo import MLP_TENSORS

    return (
        f'max_batch_size = 64\ndevice = "{device}"\n\n{MLP_TENSORS}'
        "\n[batching]\nmax_queue_delay_us = 2000\n"
    )


def check_gateway(tmp: Path, pythonpath: str) -> dict[str, object]:
    """A gateway (2 workers) serving the wide MLP in TorchScript on cuda:0 and on the CPU."""
    from tensorgate.clients import Client
    from tensorgate.server import demo

    weights = demo.dense_weights(demo.WIDE_MLP_SIZES)
    repo = tmp / "gpu-repo"
    model_file = demo.build_dense_torchscript(tmp / "wide.pt", weights)
    for name, device in (("wide_gpu", "cuda:0"), ("wide_cpu", "cpu")):
        (repo / name / "torch").mkdir(parents=True)
        shutil.copy(model_file, repo / name / "torch" / "model.pt")
        (repo / name / "config.toml").write_text(gpu_config(device))
    out: dict[str, object] = {}
    server = Server(repo, tmp, pythonpath, "--workers", "2")
    try:
        x = np.random.default_rng(5).standard_normal((4, 64)).astype(np.float32)
        for name in ("wide_gpu", "wide_cpu"):
            try:
                with Client(server.address) as client:
                    result = client.infer(name, {"input": x}, timeout=60)
                diff = float(np.abs(result["output"] - demo.dense_reference(x, weights)).max())
                out[f"{name}_max_abs_diff_vs_numpy"] = diff
                out[f"{name}_bench_c32"] = server.bench(name, 2, "-c", "16", "-z", "5",
                                                        "--connections", "4")  # fmt: skip
            except Exception as e:
                out[f"{name}_error"] = f"{type(e).__name__}: {e}"
            print(name, {k: v for k, v in out.items() if k.startswith(name)}, flush=True)
    finally:
        out["exit_code"] = server.stop()
        out["log_tail"] = server.tail()[-1500:]
    return out


def check_workers(tmp: Path, pythonpath: str) -> list[dict[str, object]]:
    """The small scorer (ONNX Runtime, CPU) with 1, 2 and 4 workers, driven by 6 load
    generator processes: how throughput scales when the load generator leaves cores free."""
    from tensorgate.server import demo

    repo = tmp / "scorer-repo"
    demo.build_mlp_onnx(repo / "scorer" / "onnx" / "model.onnx", demo.mlp_weights())
    rows = []
    for workers in (1, 2, 4):
        server = Server(repo, tmp, pythonpath, "--workers", str(workers))
        try:
            server.bench("scorer", 2, "-c", "8", "-z", "1", "--connections", "4")  # warm-up
            result = server.bench("scorer", 6, "-c", "16", "-z", "6", "--connections", "8")
        finally:
            code = server.stop()
        row = {"workers": workers, **result, "exit_code": code}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--skip-gateway", action="store_true")
    parser.add_argument("--skip-workers", action="store_true")
    args = parser.parse_args()
    pythonpath = import_tensorgate()
    RESULTS["environment"] = environment()
    print(json.dumps(RESULTS["environment"]), flush=True)
    with tempfile.TemporaryDirectory(prefix="tensorgate-gpu-") as d:
        tmp = Path(d)
        steps = [("backends", lambda: check_backends(tmp))]
        if not args.skip_gateway:
            steps.append(("gateway", lambda: check_gateway(tmp, pythonpath)))
        if not args.skip_workers:
            steps.append(("workers", lambda: check_workers(tmp, pythonpath)))
        for name, step in steps:
            started = time.perf_counter()
            try:
                RESULTS[name] = step()
            except Exception:
                RESULTS[name] = {"error": traceback.format_exc()[-3000:]}
                print(f"{name} failed:\n{RESULTS[name]['error']}", flush=True)
            print(f"{name}: {time.perf_counter() - started:.1f} s", flush=True)
            args.out.write_text(json.dumps(RESULTS, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
