"""Backend isolation (``isolation = "process"``): a variant's backend in a worker process.

Killing the worker - SIGKILL, or SIGSEGV as a crashing framework would - must leave the
gateway serving its other models, answer the killed variant's calls with UNAVAILABLE, and
bring the variant back by restarting the worker.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from tensorgate.backends import BackendOptions
from tensorgate.backends.base import BackendInputError, BackendUnreachable
from tensorgate.backends.isolated import IsolatedBackend
from tensorgate.backoff import RestartBackoff
from tensorgate.clients import Client
from tensorgate.errors import DeadlineExceeded, Unavailable
from tensorgate.server.demo import build_mlp_onnx, mlp_reference, mlp_weights
from tensorgate.server.scheduler import Scheduler, Timings

from .modelfactory import build_string_onnx
from .serverproc import ServerProcess, wait_until
from .slowmodel import build_slow_onnx, slow_inputs
from .test_reliability import LoadThreads, x64

# Talks gRPC: runs against both front ends (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("front_end")

WORKER_MODULE = "tensorgate.backends.isolated"
BACKED_CONFIG = """default_variant = "main"

[variants.main]
isolation = "process"

[routing]
fallback = ["main", "backup"]
"""


@pytest.fixture(scope="module")
def isolated_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("isolation") / "models"
    build_mlp_onnx(root / "iso" / "1" / "model.onnx", mlp_weights())
    (root / "iso" / "config.toml").write_text('isolation = "process"\n')
    build_mlp_onnx(root / "plain" / "1" / "model.onnx", mlp_weights())
    # Isolation per variant: only "a" runs in a worker.
    build_mlp_onnx(root / "mixed" / "a" / "model.onnx", mlp_weights())
    build_mlp_onnx(root / "mixed" / "b" / "model.onnx", mlp_weights())
    (root / "mixed" / "config.toml").write_text('[variants.a]\nisolation = "process"\n')
    # An isolated primary with an in-process backup: a dead worker is routed around.
    build_mlp_onnx(root / "backed" / "main" / "model.onnx", mlp_weights())
    build_mlp_onnx(root / "backed" / "backup" / "model.onnx", mlp_weights())
    (root / "backed" / "config.toml").write_text(BACKED_CONFIG)
    return root


@pytest.fixture(scope="module")
def server(
    front_end: str, isolated_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    proc = ServerProcess(isolated_repo, tmp_path_factory.mktemp("isolation-server"))
    with proc:
        yield proc
    assert proc.proc is not None and proc.proc.returncode == 0, proc.log()


def workers(server: ServerProcess) -> dict[str, int]:
    """{model/variant: pid} of the server's isolated workers."""
    found: dict[str, int] = {}
    for pid, cmdline in server.children().items():
        if WORKER_MODULE in cmdline:
            label = cmdline.split("--label", 1)[1].split()[0]
            found[label] = pid
    return found


def test_only_isolated_variants_get_a_worker(server: ServerProcess) -> None:
    assert sorted(workers(server)) == ["backed/main", "iso/1", "mixed/a"]
    with Client(server.address) as client:
        x = x64(3)
        expected = mlp_reference(x, mlp_weights())
        for model, version in (("iso", None), ("mixed", "a"), ("mixed", "b"), ("plain", None)):
            result = client.infer(model, {"input": x}, version=version, timeout=30)
            np.testing.assert_allclose(result["output"], expected, atol=1e-5)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSEGV], ids=["SIGKILL", "SIGSEGV"])
def test_killed_worker_under_load(server: ServerProcess, sig: signal.Signals) -> None:
    x = x64(2, 5)
    expected = mlp_reference(x, mlp_weights())

    def right(result) -> bool:
        return np.allclose(result["output"], expected, atol=1e-5)

    calls = [("iso", {"input": x}, right), ("plain", {"input": x}, right)]
    old = workers(server)["iso/1"]
    with LoadThreads(server.address, calls, threads=4) as load:
        wait_until(lambda: load.served("iso") >= 20, 60, "calls to iso before the kill")
        served_before = load.served("iso")
        server_pid = server.proc.pid  # type: ignore[union-attr]
        os.kill(old, sig)

        def refused() -> bool:
            return any(e[1] == "iso" for e in load.errors)

        wait_until(refused, 60, "a call to the killed worker to be refused")
        wait_until(lambda: workers(server).get("iso/1") not in (None, old), 60, "a new worker")
        recovered = load.served("iso")
        wait_until(lambda: load.served("iso") > recovered + 20, 60, "iso to serve again")
    assert server.proc is not None and server.proc.poll() is None and server_pid == server.proc.pid
    assert not load.wrong, load.wrong
    # The other model never noticed; the killed one answered UNAVAILABLE, saying why.
    assert [e for e in load.errors if e[1] != "iso"] == []
    codes = {e[2] for e in load.errors}
    assert codes == {grpc.StatusCode.UNAVAILABLE}, load.errors[:5]
    messages = " ".join(e[3] for e in load.errors)
    assert f"killed by signal {int(sig)} ({sig.name})" in messages, messages
    assert load.served("iso") > served_before
    assert f"isolated worker for iso/1 restarted: pid {workers(server)['iso/1']}" in server.log()


def test_fallback_routes_around_a_killed_worker(server: ServerProcess) -> None:
    x = x64(2, 9)
    expected = mlp_reference(x, mlp_weights())

    def right(result) -> bool:
        return np.allclose(result["output"], expected, atol=1e-5)

    old = workers(server)["backed/main"]
    with LoadThreads(server.address, [("backed", {"input": x}, right)], threads=3) as load:
        wait_until(lambda: load.served() >= 20, 60, "calls before the kill")
        os.kill(old, signal.SIGKILL)
        wait_until(lambda: workers(server).get("backed/main") not in (None, old), 60, "restart")
        served = load.served()
        wait_until(lambda: load.served() > served + 20, 60, "calls after the restart")
    # Unpinned calls never failed: while main was down, backup answered them.
    assert load.errors == [] and not load.wrong, load.errors[:5]
    assert server.metric("tensorgate_fallbacks_total", model="backed", to="backup") >= 1


def test_unload_stops_the_worker(server: ServerProcess) -> None:
    with Client(server.address) as client:
        pid = workers(server)["mixed/a"]
        client.unload_model("mixed", timeout=60)
        wait_until(lambda: "mixed/a" not in workers(server), 60, "the worker to exit")
        with pytest.raises(OSError):
            Path(f"/proc/{pid}/stat").read_text()
        client.load_model("mixed", timeout=60)
        assert "mixed/a" in workers(server)
        assert client.infer("mixed", {"input": x64(1)}, version="a").variant == "a"


def test_server_exit_leaves_no_worker(isolated_repo: Path, tmp_path: Path) -> None:
    server = ServerProcess(isolated_repo, tmp_path).start()
    pids = list(workers(server).values())
    assert len(pids) == 3
    assert server.stop() == 0, server.log()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()


# -- the wrapper on its own, without a server ------------------------------------------------


def test_isolated_backend_carries_bytes_and_errors(tmp_path: Path) -> None:
    path = build_string_onnx(tmp_path / "strings" / "model.onnx")
    backend = IsolatedBackend("onnxruntime", label="strings/1")
    signature = backend.load(path, BackendOptions())
    assert [s.name for s in signature.inputs] == ["text"]
    backend.bind(signature)
    try:
        texts = np.array([b"abc", b"", "\u00e9".encode()], dtype=object)
        out = backend.infer({"text": texts})
        assert out["upper"].dtype == object and out["upper"][0] == b"ABC"
        # The worker's BackendInputError comes back as one (INVALID_ARGUMENT, not retried).
        with pytest.raises(BackendInputError, match="UTF-8"):
            backend.infer({"text": np.array([b"\xff"], dtype=object)})
    finally:
        backend.unload()
    with pytest.raises(BackendUnreachable, match="unloaded"):
        backend.infer({"text": texts})


def test_isolated_backend_reports_a_load_failure(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="cannot load ONNX model"):
        IsolatedBackend("onnxruntime", label="missing/1").load(
            tmp_path / "missing.onnx", BackendOptions()
        )


def test_restart_delay_grows_while_the_worker_keeps_dying(tmp_path: Path) -> None:
    path = build_mlp_onnx(tmp_path / "mlp" / "model.onnx", mlp_weights())
    backend = IsolatedBackend("onnxruntime", label="mlp/1")
    # The delays' whole sequence is tests/test_backoff.py's; here, only that the backend
    # follows its backoff, with a short first delay.
    backend.backoff = RestartBackoff(initial=0.2)
    signature = backend.load(path, BackendOptions())
    backend.bind(signature)
    x = x64(1)
    delays: list[float] = []
    try:
        for _ in range(2):
            os.kill(backend.pid, signal.SIGKILL)  # type: ignore[arg-type]

            def announced() -> str:
                try:
                    backend.infer({"input": x})
                except BackendUnreachable as e:
                    return str(e) if "next attempt in" in str(e) else ""
                return ""

            message = wait_until(announced, 30, "the restart to be announced", every=0.005)
            assert "killed by signal 9 (SIGKILL)" in message, message
            delays.append(float(message.split("next attempt in ")[1].split()[0]))

            def serving() -> bool:
                try:
                    backend.infer({"input": x})
                except BackendUnreachable:
                    return False
                return True

            wait_until(serving, 30, "the restarted worker to serve")
        assert backend.restarts == 2
        assert delays[1] > delays[0], delays  # 0.2 s, then 0.4 s: it died young again
    finally:
        backend.unload()


def test_execution_timeout_kills_the_worker_and_fails_every_call_on_it(tmp_path: Path) -> None:
    path = build_slow_onnx(tmp_path / "slow" / "model.onnx")
    backend = IsolatedBackend("onnxruntime", label="slow/1", execution_timeout=1.0)
    backend.backoff = RestartBackoff(initial=0.2)
    options = BackendOptions(instances=2)
    backend.bind(backend.load(path, options))
    try:
        old = backend.pid
        assert backend.infer(slow_inputs(1, 5))["y"].shape == (1, 256)
        with ThreadPoolExecutor(2) as pool:
            # Two executions at once on the worker: the one past the limit gets it killed,
            # and the other one, in flight on the same worker, fails with it.
            calls = [pool.submit(backend.infer, slow_inputs(4096, 2000)) for _ in range(2)]
            errors = []
            for call in calls:
                with pytest.raises(BackendUnreachable) as info:
                    call.result(120)
                errors.append(str(info.value))
        why = "an execution ran longer than execution_timeout_s = 1 s"
        assert all(f"worker process {old} of slow/1 killed: {why}" in e for e in errors), errors

        def serving() -> bool:
            try:
                return backend.infer(slow_inputs(1, 5))["y"].shape == (1, 256)
            except BackendUnreachable:
                return False

        wait_until(serving, 60, "the restarted worker to serve")
        assert backend.restarts == 1 and backend.pid not in (None, old)
    finally:
        backend.unload()


def test_a_killed_execution_answers_deadline_exceeded_where_the_deadline_passed_first(
    tmp_path: Path,
) -> None:
    path = build_slow_onnx(tmp_path / "slow" / "model.onnx")
    big = slow_inputs(4096, 2000)

    async def run() -> list[BaseException | dict]:
        backend = IsolatedBackend("onnxruntime", label="slow/1", execution_timeout=1.0)
        backend.bind(await asyncio.to_thread(backend.load, path, BackendOptions(instances=2)))
        scheduler = Scheduler(backend, name="slow/1", instances=2, may_inline=False)
        scheduler.start()
        try:
            # Two executions on the worker at once; the first caller's deadline passes while
            # they compute, the second has none. The worker is killed at 1 s: both fail.
            soon = time.monotonic() + 0.3
            return await asyncio.gather(
                scheduler.submit(big, None, soon, Timings()),
                scheduler.submit(big, None, None, Timings()),
                return_exceptions=True,
            )
        finally:
            await scheduler.close()
            await asyncio.to_thread(backend.unload)

    late, patient = asyncio.run(run())
    assert isinstance(late, DeadlineExceeded), late
    assert "killed: an execution ran longer than execution_timeout_s = 1 s" in str(late)
    assert isinstance(patient, Unavailable) and not isinstance(patient, DeadlineExceeded), patient
