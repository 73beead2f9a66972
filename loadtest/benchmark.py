"""The comparison in docs/benchmarks.md, regenerated with one command.

    .venv/bin/python loadtest/benchmark.py                  # everything, ~25-30 min
    C=1,32 D=5 .venv/bin/python loadtest/benchmark.py       # shorter
    .venv/bin/python loadtest/benchmark.py --only tensorgate,echo --install

Every server runs alone on this machine, one after the other, and is driven by the same
load generator with the same request: h2load through the peers' ``bench_target.sh`` /
``bench.py`` (../shared/peers), which also measure each server's CPU per request and mark
runs that other processes disturbed. Blocks (``--only``):

- ``floor``:      the raw in-process framework call (ONNX Runtime, 1 thread) - the compute floor;
- ``echo``:       the bare grpc.aio echo server (raw: canned reply; parse: protobuf in and out);
- ``tensorgate``: the gateway on the peers' MLP (``mlp/onnx`` = ``$PEERS_HOME/models/mlp.onnx``,
  ``mlp/torch`` = ``mlp.pt``): 1 worker, 2 workers, 1 worker with dynamic batching, and the
  TorchScript variant;
- ``stream``:     the gateway's unary vs ModelStreamInfer with ``tensorgate bench`` (h2load cannot
  drive a bidirectional stream), one worker, the same load generator for both;
- ``client``:     the project's own client, unary vs ``Client(stream=True)`` (one ModelStreamInfer
  stream per channel), c=32 from one process, aio and sync faces (``bench_client_stream.py``);
- ``mlserver``:   MLServer 1.7.1 + onnxruntime on the same ONNX file (peers' bench_mlserver.sh);
- ``torchserve``: TorchServe 0.12 on the same TorchScript file, unbatched and batched;
- ``kserve``:     the KServe 0.21 Python ModelServer (grpc.aio, 1 process) + onnxruntime on the
  same ONNX file (peers' bench_kserve.sh);
- ``pytriton``:   Triton 2.51 through PyTriton 0.7 with an onnxruntime function on the same ONNX
  file, without and with dynamic batching (peers' bench_pytriton.sh);
- ``compute``:    issue 18's compute-bound MLP (512-2048-2048-512, FP32 [1, 512]) at c=8 and 32:
  the gateway (1 worker) without and with dynamic batching 32 / 500 us, and Triton's own
  server the same two ways (the peers' Triton setup, its sizes changed); labels "wide 512:";
- ``wide``:       the compute-bound model (``WIDE_MLP_SIZES``, server/demo.py) at c=32: in-process
  floor (batch 1 and 32), the gateway without and with dynamic batching, MLServer and TorchServe
  without and with their batching (through a second PEERS_HOME whose ``mlp`` is the wide model).

Results: one JSON line per run in ``loadtest/results/benchmark-<time>.jsonl`` and the tables
and target ratios in the ``.md`` beside it (also printed). Env: ``C`` (concurrencies of the
small-MLP runs, default 1,8,32), ``D`` (seconds per run, default 10), ``PEERS_HOME``
(default ~/peers), ``PEERS_DIR`` (default ../shared/peers next to the checkout),
``BENCH_SESSION`` (``own``, the default: the gateway and Triton's server each in a session of
their own, as the peers' scripts do; ``shared``: in this script's, with h2load, Triton's
started here rather than by bench_triton.sh; see ``SESSION``; the other peers' scripts start
theirs in their own session either way); to run
fewer configurations: ``TG_CONFIGS`` (1w,2w,1wb,2wb,torch), ``MLS_VARIANTS`` ("0:plain
1:plain 0:batched"), ``TS_CONFIGS`` ("1 2 1b8"), ``WIDE_TG_CONFIGS`` (1w,1wb,2wb),
``WIDE_MLS`` ("0:plain 0:batched"), ``WIDE_TS`` ("1 1b32"), ``PYTRITON_VARIANTS`` ("plain
batched"); ``PYTRITON_PA=1`` adds perf_analyzer runs against PyTriton.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
from common import tree_cpu_seconds  # loadtest/common.py, beside this script

from tensorgate.server.demo import MLP_TENSORS

ROOT = Path(__file__).resolve().parents[1]
# ../shared/peers beside the checkout (or beside its parent, for a worktree in a folder).
PEERS_DIR = Path(
    os.environ.get(
        "PEERS_DIR",
        next(
            (
                p
                for p in (ROOT.parent / "shared/peers", ROOT.parents[1] / "shared/peers")
                if p.is_dir()
            ),
            ROOT.parent / "shared/peers",
        ),
    )
).resolve()
PEERS_HOME = Path(os.environ.get("PEERS_HOME", Path.home() / "peers")).resolve()
WIDE_HOME = PEERS_HOME.parent / f"{PEERS_HOME.name}-wide"
TOOLS_PY = PEERS_HOME / "venv-tools" / "bin" / "python"
PYTHON = sys.executable
BLOCKS = (
    "floor",
    "echo",
    "tensorgate",
    "stream",
    "client",
    "mlserver",
    "torchserve",
    "kserve",
    "pytriton",
    "triton",
    "big",
    "wide",
    "compute",
)
#: Where the servers run relative to the load tool, for the kernel's scheduler: "own" (the
#: default: each server in its own session, as in a container of its own) or "shared" (the
#: load tool's session; its own process group, so it still stops as one). With autogroup
#: scheduling (/proc/sys/kernel/sched_autogroup_enabled, 1 here) a session is a scheduling
#: group: with "own", a server's threads share the cores with h2load's as two groups of equal
#: weight, not thread by thread (docs/benchmarks.md, "Where the server runs").
SESSION = os.environ.get("BENCH_SESSION", "own")
if SESSION not in ("own", "shared"):
    raise SystemExit(f"BENCH_SESSION={SESSION!r}: own or shared")
SERVER_SESSION: dict[str, Any] = (
    {"start_new_session": True} if SESSION == "own" else {"process_group": 0}
)
#: The label of bench_triton.sh's runs (Triton's own server, the MLP in its Python backend).
TRITON = "Triton 2.51 native front end, Python backend"
# The peers' install script and the file it leaves behind, by block.
PEER_INSTALLS = {
    "mlserver": ("install_mlserver.sh", "venv-mlserver/bin/mlserver"),
    "torchserve": ("install_torchserve.sh", "venv-torchserve/bin/torchserve"),
    "kserve": ("install_kserve.sh", "venv-kserve/bin/python"),
    "pytriton": ("install_pytriton.sh", "venv-pytriton/bin/python"),
    "triton": ("install_pytriton.sh", "venv-pytriton/bin/python"),  # its bundled tritonserver
}


def _front_ends() -> list[str]:
    """The gateway's front ends to run (``TG_FRONT_ENDS``; default: both where the native
    extension is installed)."""
    import importlib.util

    default = "python,native" if importlib.util.find_spec("tensorgate_native") else "python"
    return [f for f in os.environ.get("TG_FRONT_ENDS", default).split(",") if f]


def _tg_label(front_end: str, what: str) -> str:
    """Run labels: the python front end keeps the labels of earlier results files."""
    return f"tensorgate{' native' if front_end == 'native' else ''} ({what})"


IO_CONFIG = "\n" + MLP_TENSORS
PLAIN_CONFIG = 'default_variant = "onnx"\n' + IO_CONFIG
BATCHED_CONFIG = (
    'default_variant = "onnx"\nmax_batch_size = 32\n'
    + IO_CONFIG
    + "\n[batching]\nmax_queue_delay_us = {delay}\n"
)


def log(msg: str) -> None:
    print(f"\n=== {time.strftime('%H:%M:%S')} {msg}", flush=True)


def sh(cmd: list[str], env: dict[str, str] | None = None, check: bool = False) -> int:
    print("$", " ".join(cmd), flush=True)
    rc = subprocess.run(cmd, env={**os.environ, **(env or {})}, check=False).returncode
    if check and rc != 0:
        raise SystemExit(f"failed ({rc}): {' '.join(cmd)}")
    return rc


class Run:
    """Settings of one benchmark pass."""

    def __init__(self, out: Path, c: str, d: int, work: Path) -> None:
        self.out, self.c, self.d, self.work = out, c, d, work
        self.env = {"BENCH_OUT": str(out), "C": c, "D": str(d), "PEERS_HOME": str(PEERS_HOME)}

    def record(self, rec: dict) -> None:
        rec = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **rec}
        with self.out.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps(rec), flush=True)


# --- preparation ---------------------------------------------------------------------------


def install(blocks: set[str]) -> None:
    """The peers' installs (each idempotent, minutes from the package registries)."""
    sh(["bash", str(PEERS_DIR / "install_tools.sh")], check=True)
    for block in _peer_blocks(blocks):
        sh(["bash", str(PEERS_DIR / PEER_INSTALLS[block][0])], check=True)
    sh(["bash", str(PEERS_DIR / "setup_models.sh")], check=True)


def _wide_peers() -> set[str]:
    """The peers the ``wide`` block runs: MLServer, TorchServe and Triton unless their
    ``WIDE_MLS`` / ``WIDE_TS`` / ``WIDE_TRITON`` say none ("" or 0)."""
    env = os.environ
    return {
        name
        for name, on in (
            ("mlserver", env.get("WIDE_MLS", "x") != ""),
            ("torchserve", env.get("WIDE_TS", "x") != ""),
            ("triton", env.get("WIDE_TRITON", "1") == "1"),
        )
        if on
    }


def _peer_blocks(blocks: set[str]) -> list[str]:
    """The peers a set of blocks runs (``wide`` runs MLServer, TorchServe and Triton)."""
    wanted = blocks | (_wide_peers() if "wide" in blocks else set())
    return [b for b in PEER_INSTALLS if b in wanted]


def check_installed(blocks: set[str]) -> None:
    missing = []
    if not TOOLS_PY.exists() or shutil.which("h2load") is None:
        missing.append("install_tools.sh")
    if not (PEERS_HOME / "models" / "mlp.onnx").exists():
        missing.append("setup_models.sh")
    for block in _peer_blocks(blocks):
        script, installed = PEER_INSTALLS[block]
        if not (PEERS_HOME / installed).exists():
            missing.append(script)
    if "torchserve" in _peer_blocks(blocks) and not (PEERS_HOME / "models" / "mlp.pt").exists():
        missing.append("setup_models.sh after install_torchserve.sh (for mlp.pt)")
    if missing:
        raise SystemExit(
            f"not installed under {PEERS_HOME}: {', '.join(missing)} (in {PEERS_DIR}); "
            "or run this script with --install"
        )


def small_repository(root: Path, batched: bool) -> Path:
    """The peers' MLP as model ``mlp``: ``onnx`` (default) and ``torch`` variants."""
    models = PEERS_HOME / "models"
    (root / "mlp" / "onnx").mkdir(parents=True)
    shutil.copy(models / "mlp.onnx", root / "mlp" / "onnx" / "model.onnx")
    if (models / "mlp.pt").exists():
        (root / "mlp" / "torch").mkdir()
        shutil.copy(models / "mlp.pt", root / "mlp" / "torch" / "model.pt")
    config = BATCHED_CONFIG.format(delay=500) if batched else PLAIN_CONFIG
    (root / "mlp" / "config.toml").write_text(config)
    return root


def wide_models(work: Path) -> tuple[Path, Path]:
    """The compute-bound model as ONNX and TorchScript files (built once per pass)."""
    from tensorgate.server.demo import write_wide_mlp

    directory = write_wide_mlp(work / "wide-build", frameworks=("onnx", "torch"))
    return directory / "onnx" / "model.onnx", directory / "torch" / "model.pt"


def wide_repository(root: Path, onnx: Path, batched: bool) -> Path:
    (root / "mlp" / "onnx").mkdir(parents=True)
    shutil.copy(onnx, root / "mlp" / "onnx" / "model.onnx")
    config = BATCHED_CONFIG.format(delay=2000) if batched else PLAIN_CONFIG
    (root / "mlp" / "config.toml").write_text(config)
    return root


def wide_peers_home(onnx: Path, torchscript: Path) -> Path:
    """A second PEERS_HOME whose model ``mlp`` is the wide MLP: the peers' scripts then
    serve and check it unchanged. Installs are shared through links."""
    home = WIDE_HOME
    home.mkdir(exist_ok=True)
    for name in (
        "venv-tools",
        "venv-mlserver",
        "venv-torchserve",
        "venv-pytriton",
        "perf_analyzer",
        "perf_analyzer-2.60.0",
        "apt-trixie",
    ):
        link, target = home / name, PEERS_HOME / name
        if target.exists() and not link.exists():
            link.symlink_to(target)
    models = home / "models"
    models.mkdir(exist_ok=True)
    for name in (
        "sample_input.npy",
        "kserve_infer.bin",
        "kserve_typed_infer.bin",
        "ts_predictions.bin",
        "ts_input.json",
        "pa_torchserve_data.json",
        "kserve.protoset",
    ):
        if (PEERS_HOME / "models" / name).exists():
            shutil.copy(PEERS_HOME / "models" / name, models / name)
    ts_proto = models / "ts_proto"
    if (PEERS_HOME / "models" / "ts_proto").exists() and not ts_proto.exists():
        ts_proto.symlink_to(PEERS_HOME / "models" / "ts_proto")
    shutil.copy(onnx, models / "mlp.onnx")
    shutil.copy(torchscript, models / "mlp.pt")
    from tensorgate.backends import BackendOptions, backend_class

    backend = backend_class("onnxruntime")()
    backend.load(models / "mlp.onnx", BackendOptions())
    x = np.load(models / "sample_input.npy").astype(np.float32)
    np.save(models / "sample_output.npy", backend.infer({"input": x})["output"])
    return home


# --- servers -------------------------------------------------------------------------------


@contextmanager
def gateway(repo: Path, work: Path, *args: str) -> Iterator[tuple[str, int]]:
    """``tensorgate serve`` in its own session (or not: ``BENCH_SESSION``); yields
    (address, pid); SIGTERM at the end."""
    port_file = work / f"ports-{time.monotonic_ns()}.json"
    log_file = (work / f"{port_file.stem}.log").open("wb")
    proc = subprocess.Popen(
        [
            PYTHON,
            "-m",
            "tensorgate.server.cli",
            "serve",
            "--repository",
            str(repo),
            "--port",
            "0",
            "--metrics-port",
            "-1",
            "--port-file",
            str(port_file),
            "--log-level",
            "WARNING",
            *args,
        ],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        **SERVER_SESSION,
    )
    try:
        deadline = time.monotonic() + 180
        while not port_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gateway did not start: see {log_file.name}")
            time.sleep(0.1)
        port = json.loads(port_file.read_text())["grpc_port"]
        yield f"127.0.0.1:{port}", proc.pid
    finally:
        _stop(proc, 60, group=False)
        log_file.close()


def _stop(proc: subprocess.Popen, grace: float, group: bool) -> None:
    """SIGTERM to a server started in its own session (to the whole session with ``group``),
    SIGKILL to the session after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    if group:
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def bench_target(
    run: Run,
    address: str,
    pid: int,
    label: str,
    *extra: str,
    c: str | None = None,
    home: Path = PEERS_HOME,
    shape: str = "1,64",
    data: Path | None = None,
    model: str = "mlp",
) -> None:
    sh(
        [
            "bash",
            str(PEERS_DIR / "bench_target.sh"),
            "--target",
            address,
            "--model",
            model,
            "--input",
            "input",
            "--datatype",
            "FP32",
            "--shape",
            shape,
            "--output",
            "output",
            "--data-npy",
            str(data or home / "models" / "sample_input.npy"),
            "-c",
            c or run.c,
            "-D",
            str(run.d),
            "--pid",
            str(pid),
            "--label",
            label,
            *extra,
        ],
        env={**run.env, "PEERS_HOME": str(home)},
    )


# --- blocks --------------------------------------------------------------------------------


def block_floor(run: Run) -> None:
    log("compute floor: onnxruntime in-process, 1 thread")
    sh(
        [
            str(TOOLS_PY),
            str(PEERS_DIR / "bench.py"),
            "ort",
            "-D",
            str(run.d),
            "--threads",
            "1",
            "--callers",
            "1",
        ],
        env=run.env,
    )


def block_echo(run: Run) -> None:
    for mode in ("raw", "parse"):
        log(f"grpc.aio echo server ({mode})")
        if sh(["bash", str(PEERS_DIR / "start_echo.sh"), mode, "18091"], env=run.env) != 0:
            continue
        try:
            pid = int((PEERS_HOME / "run" / "echo.pid").read_text())
            bench_target(run, "127.0.0.1:18091", pid, f"grpc.aio echo ({mode})")
        finally:
            sh(["bash", str(PEERS_DIR / "stop_echo.sh")], env=run.env)


def block_tensorgate(run: Run) -> None:
    plain = small_repository(run.work / "small-plain", batched=False)
    batched = small_repository(run.work / "small-batched", batched=True)
    configs = {
        "1w": ("1 worker, ONNX Runtime", plain, ("--workers", "1"), ()),
        "2w": ("2 workers, ONNX Runtime", plain, ("--workers", "2"), ()),
        "1wb": (
            "1 worker, ONNX Runtime, dynamic batching 32, 500 us",
            batched,
            ("--workers", "1"),
            (),
        ),
        "2wb": (
            "2 workers, ONNX Runtime, dynamic batching 32, 500 us",
            batched,
            ("--workers", "2"),
            (),
        ),
        "torch": ("1 worker, TorchScript", plain, ("--workers", "1"), ("--version", "torch")),
    }
    for front_end in _front_ends():
        for what, repo, args, extra in _chosen(configs, "TG_CONFIGS"):
            label = _tg_label(front_end, what)
            log(label)
            with gateway(repo, run.work, *args, "--front-end", front_end) as (address, pid):
                bench_target(run, address, pid, label, *extra)


def block_triton(run: Run, home: Path = PEERS_HOME, c: str | None = None) -> None:
    """Triton 2.51's own C++ server, the MLP in its Python backend, plain and batched: the
    peers' bench_triton.sh, or with ``BENCH_SESSION=shared`` the same repository and runs
    with the server started here, in this script's session (the peers' script would start
    it in its own)."""
    if SESSION == "own":
        log("Triton 2.51 native front end (peers' bench_triton.sh)")
        sh(
            ["bash", str(PEERS_DIR / "bench_triton.sh")],
            env={**run.env, "PEERS_HOME": str(home), "C": c or run.c},
        )
        return
    repo = triton_repository(run.work / f"triton-{home.name}", home)
    triton_runs(run, repo, "", c or run.c, home=home)


#: The 1 MB block: FP32 [1, BIG_ELEMENTS] in and out of an ONNX Identity.
BIG_ELEMENTS = 262_144


def big_repository(root: Path) -> tuple[Path, Path]:
    """Model ``mlp`` (the peers' scripts' name) = ONNX Identity over FP32 [-1, 262144], and
    a sample request of 1 MB."""
    from onnx import TensorProto, helper

    from tensorgate.server.demo.onnxgraph import save_onnx

    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["output"])],
        "identity",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", BIG_ELEMENTS])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", BIG_ELEMENTS])],
    )
    # save_onnx pins the IR version ONNX Runtime loads (onnx's default is newer).
    save_onnx(graph, root / "mlp" / "onnx" / "model.onnx")
    sample = root / "big_input.npy"
    np.save(sample, np.random.default_rng(0).random((1, BIG_ELEMENTS), dtype=np.float32))
    return root, sample


def block_big(run: Run) -> None:
    """1 MB FP32 requests and replies (ONNX Identity), each front end, c=8."""
    repo, sample = big_repository(run.work / "big")
    for front_end in _front_ends():
        label = _tg_label(front_end, "1 worker, 1 MB FP32 in and out, ONNX Identity")
        log(label)
        with gateway(repo, run.work, "--front-end", front_end) as (address, pid):
            bench_target(run, address, pid, label, c="8", shape=f"1,{BIG_ELEMENTS}", data=sample)


def _busy_cores_seconds() -> float:
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(v) for v in fields]
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


def block_stream(run: Run) -> None:
    """Unary vs streaming through the same Python load generator (tensorgate bench)."""
    plain = run.work / "small-plain"
    if not plain.exists():
        small_repository(plain, batched=False)
    for workers in ("1", "2"):
        with gateway(plain, run.work, "--workers", workers) as (address, pid):
            for stream in (False, True):
                label = (
                    f"tensorgate ({workers} worker{'s' if workers != '1' else ''}, "
                    f"ONNX Runtime) via tensorgate bench, "
                    f"{'ModelStreamInfer' if stream else 'unary ModelInfer'}"
                )
                log(label)

                def bench(seconds: int, stream: bool = stream) -> list[str]:
                    return [
                        PYTHON,
                        "-m",
                        "tensorgate.server.cli",
                        "bench",
                        "mlp",
                        "--url",
                        address,
                        "-c",
                        "32",
                        "-z",
                        str(seconds),
                        "--connections",
                        "4",
                        "--format",
                        "json",
                        "-i",
                        f"input={PEERS_HOME / 'models' / 'sample_input.npy'}",
                        *(["--stream"] if stream else []),
                    ]

                subprocess.run(bench(2), capture_output=True, check=False)  # warm-up
                cpu0, busy0, t0 = tree_cpu_seconds(pid), _busy_cores_seconds(), time.perf_counter()
                proc = subprocess.run(bench(run.d), capture_output=True, text=True, check=False)
                wall = time.perf_counter() - t0
                cpu = tree_cpu_seconds(pid) - cpu0
                busy = _busy_cores_seconds() - busy0
                if proc.returncode != 0:
                    run.record(
                        {
                            "label": label,
                            "tool": "tensorgate-bench",
                            "c": 32,
                            "error": proc.stderr[-500:],
                        }
                    )
                    continue
                s = json.loads(proc.stdout)
                ok = s["codes"].get("OK", 0)
                run.record(
                    {
                        "label": label,
                        "tool": "tensorgate-bench",
                        "c": 32,
                        "duration_s": s["duration_s"],
                        "rps": round(s["ok_rps"], 1),
                        "p50_ms": round(s["latency_ms"]["p50"], 3),
                        "p99_ms": round(s["latency_ms"]["p99"], 3),
                        "n": ok,
                        "failures": sum(s["codes"].values()) - ok,
                        "server_cores": round(cpu / wall, 2),
                        "server_cpu_ms_per_req": round(cpu / max(ok, 1) * 1e3, 3),
                        "client_and_other_cores": round((busy - cpu) / wall, 2),
                    }
                )


def _chosen(configs: dict, env: str) -> list:
    """The configurations named in $env (comma-separated keys), default all."""
    keys = os.environ.get(env, ",".join(configs)).split(",")
    unknown = [k for k in keys if k not in configs]
    if unknown:
        raise SystemExit(f"{env}: unknown {unknown}; choose from {','.join(configs)}")
    return [configs[k] for k in keys]


def block_mlserver(
    run: Run,
    home: Path = PEERS_HOME,
    c: str | None = None,
    variants: str = os.environ.get("MLS_VARIANTS", "0:plain 1:plain 0:batched"),
) -> None:
    log(f"MLServer ({variants})")
    sh(
        ["bash", str(PEERS_DIR / "bench_mlserver.sh")],
        env={**run.env, "PEERS_HOME": str(home), "VARIANTS": variants, "C": c or run.c},
    )


def block_torchserve(
    run: Run,
    home: Path = PEERS_HOME,
    c: str | None = None,
    configs: str = os.environ.get("TS_CONFIGS", "1 2 1b8"),
) -> None:
    log(f"TorchServe ({configs})")
    sh(
        ["bash", str(PEERS_DIR / "bench_torchserve.sh")],
        env={**run.env, "PEERS_HOME": str(home), "CONFIGS": configs, "PA": "0", "C": c or run.c},
    )


def _inproc_rows_per_s(onnx: Path, batch: int, seconds: float) -> dict:
    from tensorgate.backends import BackendOptions, backend_class

    backend = backend_class("onnxruntime")()
    backend.load(onnx, BackendOptions())
    x = np.random.default_rng(0).standard_normal((batch, 64)).astype(np.float32)
    for _ in range(10):
        backend.infer({"input": x})
    samples, until = [], time.perf_counter() + seconds
    while time.perf_counter() < until:
        t = time.perf_counter()
        backend.infer({"input": x})
        samples.append(time.perf_counter() - t)
    elapsed = sum(samples)
    return {
        "rps": round(len(samples) * batch / elapsed, 1),
        "p50_ms": round(statistics.median(samples) * 1e3, 3),
        "p99_ms": round(sorted(samples)[int(0.99 * (len(samples) - 1))] * 1e3, 3),
    }


def block_kserve(run: Run) -> None:
    log("KServe 0.21 ModelServer")
    sh(["bash", str(PEERS_DIR / "bench_kserve.sh")], env=run.env)


def block_pytriton(run: Run) -> None:
    variants = os.environ.get("PYTRITON_VARIANTS", "plain batched")
    log(f"Triton 2.51 through PyTriton 0.7 ({variants})")
    sh(
        ["bash", str(PEERS_DIR / "bench_pytriton.sh")],
        env={**run.env, "VARIANTS": variants, "PA": os.environ.get("PYTRITON_PA", "0")},
    )


def block_client(run: Run) -> None:
    """Item 6 of issue 10: the project's client over one stream vs unary, c=32, one client
    process, the same gateway (its own, 1 worker) for both; rounds alternate the order."""
    log("tensorgate's client: unary vs Client(stream=True), c=32")
    detail = run.out.with_name(f"{run.out.stem}-client-stream.json")
    rc = sh(
        [
            PYTHON,
            str(ROOT / "loadtest" / "bench_client_stream.py"),
            "--seconds",
            str(run.d),
            "--rounds",
            os.environ.get("CLIENT_ROUNDS", "3"),
            "--concurrency",
            "32",
            "--out",
            str(detail),
        ]
    )
    if rc != 0 or not detail.exists():
        run.record({"label": "tensorgate client", "tool": "client", "c": 32, "error": f"rc {rc}"})
        return
    runs = json.loads(detail.read_text())["results"]["runs"]
    for face in dict.fromkeys(r["face"] for r in runs):
        for mode in ("unary", "stream"):
            mine = [r for r in runs if (r["face"], r["mode"]) == (face, mode)]
            run.record(
                {
                    "label": f"tensorgate (1 worker, ONNX Runtime) via Client {face} face, "
                    + ("Client(stream=True)" if mode == "stream" else "unary"),
                    "tool": "client",
                    "c": 32,
                    "duration_s": run.d,
                    "rounds": len(mine),
                    "rps": statistics.median(r["rps"] for r in mine),
                    "p50_ms": statistics.median(r["p50_ms"] for r in mine),
                    "p99_ms": statistics.median(r["p99_ms"] for r in mine),
                    "failures": sum(r["errors"] for r in mine),
                    "server_cpu_ms_per_req": statistics.median(
                        r["server_cpu_ms_per_request"] for r in mine
                    ),
                    "client_cpu_ms_per_req": statistics.median(
                        r["client_cpu_ms_per_request"] for r in mine
                    ),
                    "detail": detail.name,
                }
            )


#: Issue 18's compute-bound MLP: 512 -> 2048 -> 2048 -> 512, FP32 [1, 512] (25 MB of weights).
COMPUTE_SIZES = (512, 2048, 2048, 512)
COMPUTE_TENSORS = MLP_TENSORS.replace("[-1, 64]", "[-1, 512]").replace("[-1, 10]", "[-1, 512]")


def compute_model(work: Path) -> tuple[Path, Path]:
    """The compute block's ONNX file and a [1, 512] sample request."""
    from tensorgate.server.demo import build_dense_onnx, dense_weights

    directory = work / "compute-model"
    onnx = build_dense_onnx(directory / "model.onnx", dense_weights(COMPUTE_SIZES))
    sample = directory / "sample_input.npy"
    rng = np.random.default_rng(0)
    np.save(sample, rng.random((1, COMPUTE_SIZES[0]), dtype=np.float32))
    return onnx, sample


def compute_repository(root: Path, onnx: Path, batched: bool) -> Path:
    """Model ``mlp`` = the compute MLP; batched: 32 / 500 us, as Triton's ``mlpb``."""
    (root / "mlp" / "onnx").mkdir(parents=True)
    shutil.copy(onnx, root / "mlp" / "onnx" / "model.onnx")
    head = 'default_variant = "onnx"\n' + ("max_batch_size = 32\n" if batched else "")
    tail = "\n[batching]\nmax_queue_delay_us = 500\n" if batched else ""
    (root / "mlp" / "config.toml").write_text(head + "\n" + COMPUTE_TENSORS + tail)
    return root


def triton_repository(root: Path, home: Path = PEERS_HOME) -> Path:
    """The peers' Triton repository at ``root`` (triton/make_repo.sh: ``mlp`` plain, ``mlpb``
    batched 32 / 500 us, ONNX Runtime with 1 thread in Triton's Python backend) over
    ``home``'s MLP."""
    make_repo = PEERS_DIR / "triton" / "make_repo.sh"
    sh(["bash", str(make_repo), str(root)], env={"PEERS_HOME": str(home)}, check=True)
    return root


def triton_compute_repository(root: Path, onnx: Path) -> Path:
    """The peers' Triton repository (``triton_repository``), its model file and tensor
    sizes changed to the compute MLP's."""
    triton_repository(root)
    sizes = {"64": str(COMPUTE_SIZES[0]), "10": str(COMPUTE_SIZES[-1])}
    for name in ("mlp", "mlpb"):
        model_py = root / "models" / name / "1" / "model.py"
        model_py.write_text(
            model_py.read_text().replace(str(PEERS_HOME / "models" / "mlp.onnx"), str(onnx))
        )
        config = root / "models" / name / "config.pbtxt"
        text = config.read_text()
        for old, new in sizes.items():
            text = text.replace(f"[ -1, {old} ]", f"[ -1, {new} ]").replace(
                f"[ {old} ]", f"[ {new} ]"
            )
        config.write_text(text)
    return root


def triton_runs(run: Run, repo: Path, prefix: str, c: str, **target: Any) -> None:
    """Both models of a peers' Triton repository (``triton_repository``), each on a Triton
    server started here (``triton_server``), labelled as bench_triton.sh labels them after
    ``prefix``; ``target``: more of ``bench_target``'s arguments."""
    for model, how in (("mlp", "plain"), ("mlpb", "dynamic batching 32/500us")):
        label = f"{prefix}{TRITON} ({how})"
        log(label)
        with triton_server(repo, run.work, model) as (address, pid):
            bench_target(run, address, pid, label, c=c, model=model, **target)


@contextmanager
def triton_server(root: Path, work: Path, model: str) -> Iterator[tuple[str, int]]:
    """Triton 2.51's own server on ``root`` (the peers' triton/serve.sh), in its own
    session (or not: ``BENCH_SESSION``); yields (address, pid) once ``model`` is ready;
    SIGTERM (then SIGKILL) after."""
    import socket

    with socket.socket() as probe:  # a free port (and the next one, for its HTTP)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log_file = (work / f"triton-{port}.log").open("wb")
    proc = subprocess.Popen(
        ["bash", str(PEERS_DIR / "triton" / "serve.sh"), str(root), str(port)],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PEERS_HOME": str(PEERS_HOME)},
        **SERVER_SESSION,
    )
    address = f"127.0.0.1:{port}"
    try:
        ready = [str(TOOLS_PY), str(PEERS_DIR / "wait_ready.py"), address, model, "120"]
        if subprocess.run(ready, check=False).returncode != 0:
            raise RuntimeError(f"Triton did not get ready: see {log_file.name}")
        yield address, proc.pid
    finally:
        _stop(proc, 30, group=True)
        log_file.close()


def block_compute(run: Run) -> None:
    """Issue 18's compute-bound MLP (COMPUTE_SIZES), c=8 and 32: the gateway (1 worker)
    without and with dynamic batching 32 / 500 us, and Triton's own server the same two
    ways (the peers' Triton setup, sizes changed). Labels start with "wide 512:"."""
    onnx, sample = compute_model(run.work)
    shape = f"1,{COMPUTE_SIZES[0]}"
    c = "8,32"
    for front_end in _front_ends():
        for batched in (False, True):
            what = "1 worker, ONNX Runtime" + (", dynamic batching 32, 500 us" if batched else "")
            label = "wide 512: " + _tg_label(front_end, what)
            log(label)
            repo = run.work / f"compute-{batched}"
            if not repo.exists():
                compute_repository(repo, onnx, batched)
            with gateway(repo, run.work, "--front-end", front_end) as (address, pid):
                bench_target(run, address, pid, label, c=c, shape=shape, data=sample)
    if not (PEERS_HOME / "venv-pytriton" / "bin" / "python").exists():
        log("Triton is not installed (install_pytriton.sh): compute block without it")
        return
    triton = triton_compute_repository(run.work / "compute-triton", onnx)
    triton_runs(run, triton, "wide 512: ", c, shape=shape, data=sample)


def block_wide(run: Run) -> None:
    onnx, torchscript = wide_models(run.work)
    home = wide_peers_home(onnx, torchscript)
    for batch in (1, 32):
        log(f"wide MLP floor: onnxruntime in-process, 1 thread, batch {batch}")
        run.record(
            {
                "label": f"wide: onnxruntime in-process (intra_op=1, batch {batch}), rows/s",
                "tool": "inproc",
                "c": 1,
                **_inproc_rows_per_s(onnx, batch, run.d),
            }
        )
    configs = {
        "1w": ("1", False),
        "1wb": ("1", True),
        "2wb": ("2", True),
    }
    for front_end in _front_ends():
        for workers, batched in _chosen(configs, "WIDE_TG_CONFIGS"):
            label = "wide: " + _tg_label(
                front_end,
                f"{workers} worker{'s' if workers != '1' else ''}, "
                + ("ONNX Runtime, dynamic batching 32, 2 ms" if batched else "ONNX Runtime"),
            )
            log(label)
            repo = run.work / f"wide-{batched}"
            if not repo.exists():
                wide_repository(repo, onnx, batched)
            with gateway(repo, run.work, "--workers", workers, "--front-end", front_end) as (
                address,
                pid,
            ):
                bench_target(run, address, pid, label, c="32", home=home)
    peers = _wide_peers()
    if "triton" in peers:
        block_triton(run, home, c="32")
    if "mlserver" in peers:
        block_mlserver(run, home, c="32", variants=os.environ.get("WIDE_MLS", "0:plain 0:batched"))
    if "torchserve" in peers:
        block_torchserve(run, home, c="32", configs=os.environ.get("WIDE_TS", "1 1b32"))


# --- the report ----------------------------------------------------------------------------


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _cell(r: dict) -> str:
    star = "*" if r.get("contaminated") else ""
    fail = f" ({r['failures']} failed)" if r.get("failures") else ""
    p50, p99 = r.get("p50_ms", float("nan")), r.get("p99_ms", float("nan"))
    return f"{r['rps']:.0f}{star}, {p50:.2f}, {p99:.2f}{fail}"


def report(rows: list[dict], machine: str) -> str:
    rows = [r for r in rows if r.get("rps") is not None]
    wide = [r for r in rows if r["label"].startswith("wide")]
    small = [r for r in rows if not r["label"].startswith("wide")]
    cs = sorted({int(r["c"]) for r in small if r.get("tool") == "h2load"}) or [32]
    out = [f"Machine: {machine}"]
    if small:
        out += [
            "",
            "Small MLP (64-256-256-10), batch 1. Cells: requests/s, p50 ms, "
            "p99 ms (`*`: other processes used > 0.15 core during the run). CPU: server CPU ms per "
            "request at the highest concurrency.",
            "",
            "| server / config | tool | " + " | ".join(f"c={c}" for c in cs) + " | CPU ms/req |",
            "|---|---|" + "---|" * len(cs) + "---|",
        ]
    labels = list(dict.fromkeys(r["label"] for r in small))
    for label in labels:
        for tool in ("h2load", "pa", "ort", "tensorgate-bench", "client", "inproc"):
            mine = {int(r["c"]): r for r in small if r["label"] == label and r.get("tool") == tool}
            if not mine:
                continue
            top = mine[max(mine)]
            cpu = top.get("server_cpu_ms_per_req")
            cells = [(_cell(mine[c]) if c in mine else "") for c in cs]
            if not set(mine) & set(cs):  # e.g. the in-process floor (1 caller) with C=32
                cells = [_cell(top)] + [""] * (len(cs) - 1)
            out.append(
                f"| {label} | {tool} | "
                + " | ".join(cells)
                + f" | {cpu if cpu is not None else ''} |"
            )
    if wide:
        out += [
            "",
            "Compute-bound models: rows labelled `wide:` serve the wide MLP 64-4096-4096-10 (block "
            "wide), `wide 512:` issue 18's 512-2048-2048-512 (block compute); in-process rows: "
            "1 caller, rows/s. Cells as above, one row per run; CPU: server CPU ms per request.",
            "",
            "| server / config | tool | c | requests/s, p50, p99 | CPU ms/req |",
            "|---|---|---|---|---|",
        ]
        for r in wide:
            cpu = r.get("server_cpu_ms_per_req", "")
            out.append(f"| {r['label']} | {r['tool']} | {r['c']} | {_cell(r)} | {cpu} |")
    out += ["", "Targets (ratios inside this run):", "", *targets(rows)]
    return "\n".join(out) + "\n"


def _pick(
    rows: list[dict], prefix: str, c: int, tool: str = "h2load", exact: bool = False
) -> list[dict]:
    return [
        r
        for r in rows
        if (r["label"] == prefix if exact else r["label"].startswith(prefix))
        and int(r["c"]) == c
        and r.get("tool") == tool
    ]


def _best(rows: list[dict]) -> dict | None:
    return max(rows, key=lambda r: r["rps"], default=None)


class Ratios:
    """Target lines of a report: ``ratio`` of two runs against a goal, ``p99`` beside it."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def ratio(
        self,
        name: str,
        a: dict | None,
        b: dict | None,
        goal: float,
        lower_is_better: bool = False,
        key: str = "rps",
    ) -> None:
        if a is None or b is None or not a.get(key) or not b.get(key):
            self.lines.append(f"- {name}: not measured")
            return
        value = a[key] / b[key]
        ok = value <= goal if lower_is_better else value >= goal
        self.lines.append(
            f"- {name}: {value:.2f}x (goal {'<=' if lower_is_better else '>='} {goal}x) "
            f"{'REACHED' if ok else 'missed'} [{a['label']} {a[key]} vs {b['label']} {b[key]}]"
        )

    def p99(self, a: dict | None, b: dict | None) -> None:
        if a and b and a.get("p99_ms") and b.get("p99_ms"):
            self.lines.append(
                f"  p99 {a['p99_ms']} ms vs {b['p99_ms']} ms: "
                f"{'no worse' if a['p99_ms'] <= b['p99_ms'] else 'worse'}"
            )


def targets(rows: list[dict]) -> list[str]:
    """Issue 10's targets, as ratios inside this run (c=8 and c=32 where it names both)."""
    r = Ratios()
    lines, ratio, p99 = r.lines, r.ratio, r.p99
    one = "tensorgate (1 worker, ONNX Runtime)"
    for c in (8, 32):
        tg1 = _best(_pick(rows, one, c, exact=True))
        ratio(
            f"1. server CPU per request, 1 worker vs grpc.aio echo (parse), c={c}",
            tg1,
            _best(_pick(rows, "grpc.aio echo (parse)", c)),
            1.5,
            lower_is_better=True,
            key="server_cpu_ms_per_req",
        )
    tg1 = _best(_pick(rows, one, 32, exact=True))
    for c in (8, 32):
        tg1c = _best(_pick(rows, one, c, exact=True))
        ratio(f"2. 1 worker vs KServe's ModelServer, c={c}", tg1c,
              _best(_pick(rows, "KServe", c)), 1.5)  # fmt: skip
        ratio(
            f"2. 1 worker vs MLServer's best, c={c}", tg1c, _best(_pick(rows, "MLServer", c)), 1.5
        )
    for c in (8, 32):
        tg_best = _best(_pick(rows, "tensorgate", c))  # h2load runs only
        ts = _best([r for r in _pick(rows, "TorchServe", c) if "batch" in r["label"]])
        ratio(f"3. tensorgate's best vs batched TorchServe, c={c}", tg_best, ts, 1.25)
        p99(tg_best, ts)
        triton = _best([r for r in _pick(rows, "PyTriton", c) if "dynamic batching" in r["label"]])
        ratio(f"3. tensorgate's best vs batched Triton (PyTriton), c={c}", tg_best, triton, 1.25)
        p99(tg_best, triton)
    tg2 = _best(_pick(rows, "tensorgate (2 workers, ONNX Runtime)", 32, exact=True))
    ratio("5. --workers 2 vs --workers 1, c=32 (h2load shares the 2 cores)", tg2, tg1, 1.5)
    ratio(
        "5. server CPU per request, --workers 2 vs 1, c=32 (goal: rises < 15 %)",
        tg2,
        tg1,
        1.15,
        lower_is_better=True,
        key="server_cpu_ms_per_req",
    )
    for face in ("aio", "sync"):
        prefix = f"tensorgate (1 worker, ONNX Runtime) via Client {face} face, "
        ratio(
            f"6. Client(stream=True) vs unary, {face} face, one client process, c=32",
            _best(_pick(rows, prefix + "Client(stream=True)", 32, "client")),
            _best(_pick(rows, prefix + "unary", 32, "client")),
            2.5,
        )
    lines.append(
        "- 4. steadiness (five runs in a row, perf_analyzer at c=4): loadtest/stability.py"
    )
    return [*lines, "", "Issue 18 (the native front end):", "", *native_targets(rows)]


def native_targets(rows: list[dict]) -> list[str]:
    """Issue 18's targets, as ratios inside this run."""
    r = Ratios()
    lines, p99 = r.lines, r.p99

    def ratio(name: str, a: dict | None, b: dict | None, goal: float, lower: bool = False,
              key: str = "rps") -> None:  # fmt: skip
        r.ratio(name, a, b, goal, lower, key)

    small = [r for r in rows if not r.get("_wide")]
    wide = [r for r in rows if r.get("_wide")]
    one = "tensorgate native (1 worker, ONNX Runtime)"
    batched = "tensorgate native (1 worker, ONNX Runtime, dynamic batching 32, 500 us)"
    plain_t = _best(_pick(small, f"{TRITON} (plain)", 32, exact=True))
    batched_t = {c: _best(_pick(small, f"{TRITON} (dynamic", c)) for c in (8, 32)}
    n1 = _best(_pick(small, one, 32, exact=True))
    ratio("1. unbatched, c=32: native vs Triton plain", n1, plain_t, 1.5)
    ratio("1. unbatched, c=32: native vs the grpc.aio echo (parse)", n1,
          _best(_pick(small, "grpc.aio echo (parse)", 32)), 1.0)  # fmt: skip
    nb = {c: _best(_pick(small, batched, c, exact=True)) for c in (8, 32)}
    ratio("2. batched, c=32: native vs Triton batched", nb[32], batched_t[32], 1.25)
    p99(nb[32], batched_t[32])
    ratio("2. batched, c=8: native vs Triton batched", nb[8], batched_t[8], 1.0)
    ratio("3. CPU/request unbatched c=32, native vs Triton plain", n1, plain_t, 1.0, lower=True,
          key="server_cpu_ms_per_req")  # fmt: skip
    ratio("3. CPU/request batched c=32, native vs Triton batched", nb[32], batched_t[32], 1.0,
          lower=True, key="server_cpu_ms_per_req")  # fmt: skip
    n2 = _best(_pick(small, "tensorgate native (2 workers, ONNX Runtime)", 32, exact=True))
    ratio("4. native --workers 2 vs --workers 1, c=32", n2, n1, 1.5)
    # Target 5 on the 512-2048-2048-512 model (block compute, "wide 512:") where the
    # run has it, else on block wide's model.
    prefix = "wide 512: " if any(r["label"].startswith("wide 512: ") for r in wide) else "wide: "
    for c in (8, 32):
        one = f"{prefix}tensorgate native (1 worker, ONNX Runtime"
        wn = _best(_pick(wide, f"{one})", c, exact=True))
        wnb = _best(_pick(wide, f"{one}, dynamic", c))
        wt = _best(_pick(wide, f"{prefix}{TRITON} (plain)", c, exact=True))
        wtb = _best(_pick(wide, f"{prefix}{TRITON} (dynamic", c))
        what = f"5. compute-bound ({prefix.rstrip(': ')}), c={c}"
        ratio(f"{what}, plain: native vs Triton", wn, wt, 1.0)
        ratio(f"{what}, plain: CPU/request native vs Triton", wn, wt, 1.0, lower=True,
              key="server_cpu_ms_per_req")  # fmt: skip
        ratio(f"{what}, batched: native vs Triton", wnb, wtb, 1.0)
        ratio(f"{what}, batched: CPU/request native vs Triton", wnb, wtb, 1.0, lower=True,
              key="server_cpu_ms_per_req")  # fmt: skip
    big = "1 worker, 1 MB FP32 in and out, ONNX Identity"
    ratio("6. 1 MB requests and replies: native vs python front end (MB/s)",
          _best(_pick(small, _tg_label("native", big), 8, exact=True)),
          _best(_pick(small, _tg_label("python", big), 8, exact=True)), 2.0)  # fmt: skip
    return lines


def machine() -> str:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    load = os.getloadavg()
    return (
        f"{os.cpu_count()} vCPU {cpu}, Python {sys.version.split()[0]}, "
        f"load average at the start {load[0]:.2f}, servers in "
        f"{'their own session' if SESSION == 'own' else 'the load tool session'} "
        f"(BENCH_SESSION={SESSION})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(BLOCKS), help=f"blocks: {','.join(BLOCKS)}")
    parser.add_argument("--install", action="store_true", help="run the peers' installs first")
    parser.add_argument("--out", type=Path, default=None, help="results file (.jsonl)")
    parser.add_argument(
        "--report", type=Path, default=None, help="only print the tables of an earlier results file"
    )
    args = parser.parse_args()
    if args.report:  # the tables again (after a change to this script), into the .md too
        md = args.report.with_suffix(".md")
        first = md.read_text().splitlines()[0] if md.exists() else ""
        where = first.removeprefix("Machine: ") if first.startswith("Machine: ") else "?"
        text = report(_mark_wide(load(args.report)), where)
        md.write_text(text)
        print(text)
        return
    blocks = {b.strip() for b in args.only.split(",") if b.strip()}
    unknown = blocks - set(BLOCKS)
    if unknown:
        parser.error(f"unknown block(s) {sorted(unknown)}; choose from {','.join(BLOCKS)}")
    if args.install:
        install(blocks)
    check_installed(blocks)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or ROOT / "loadtest" / "results" / f"benchmark-{stamp}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    where = machine()
    with tempfile.TemporaryDirectory(prefix="tensorgate-bench-") as work:
        run = Run(out, os.environ.get("C", "1,8,32"), int(os.environ.get("D", "10")), Path(work))
        log(f"results -> {out} (C={run.c}, D={run.d} s); {where}")
        steps = {
            "floor": block_floor,
            "echo": block_echo,
            "tensorgate": block_tensorgate,
            "stream": block_stream,
            "client": block_client,
            "mlserver": block_mlserver,
            "torchserve": block_torchserve,
            "kserve": block_kserve,
            "pytriton": block_pytriton,
            "triton": block_triton,
            "big": block_big,
            "wide": block_wide,
            "compute": block_compute,
        }
        for name in BLOCKS:
            if name in blocks:
                with tagging(out, _tag_wide) if name == "wide" else nullcontext():
                    steps[name](run)
    text = report(_mark_wide(load(out) if out.exists() else []), where)
    out.with_suffix(".md").write_text(text)
    print("\n" + text)


@contextmanager
def tagging(out: Path, tag: Callable[[dict], None]) -> Iterator[None]:
    """``tag`` every line the block appends to the results file ``out`` (the peers' scripts
    write their own lines, without what the caller knows about the run)."""
    start = len(load(out)) if out.exists() else 0
    yield
    rows = load(out)
    for r in rows[start:]:
        tag(r)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _tag_wide(r: dict) -> None:
    """Peers' scripts label their runs without the model: the wide block's lines say it."""
    r["_wide"] = True
    if not r["label"].startswith("wide"):
        r["label"] = f"wide: {r['label']}"


def _mark_wide(rows: list[dict]) -> list[dict]:
    for r in rows:
        if r["label"].startswith("wide"):
            r["_wide"] = True
    return rows


if __name__ == "__main__":
    main()
