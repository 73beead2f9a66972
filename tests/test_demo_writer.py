"""`tensorgate demo DIR` where containers put DIR, and the repository write lock it holds.

DIR is what `docker run -v ...:/models` and a Kubernetes emptyDir give: an existing empty
directory that is a mount point, whose parent (the image's read-only root) cannot be
written. The tests mount a real tmpfs there under a read-only parent when the machine
lets them (root), and run the real CLI as root and as the image's uid 10001. Without root
they fall back to a directory whose parent is read-only, written by the test's own uid.
A server, run as another uid than the writer, then serves what was written.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml

from tensorgate.clients import Client, InferenceError
from tensorgate.server import writelock
from tensorgate.server.demo import build_mlp_onnx, mlp_reference, mlp_weights

from .serverproc import REPO_ROOT, ServerProcess, wait_until

# Talks gRPC: runs against both front ends (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("front_end")

IMAGE_UID = 10001  # the Dockerfile's USER
K8S = REPO_ROOT / "deploy" / "k8s"
ROOT = os.geteuid() == 0
CLI = ("-m", "tensorgate.server.cli")
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, text=True)


def _can_mount(tmp: Path) -> bool:
    if not ROOT or shutil.which("mount") is None:
        return False
    probe = tmp / "probe"
    probe.mkdir()
    try:
        _mount("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe))
    except (subprocess.CalledProcessError, OSError):
        return False
    subprocess.run(["umount", str(probe)], check=True)
    return True


@pytest.fixture
def work() -> Iterator[Path]:
    """A scratch directory other uids can reach (pytest's own tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="tensorgate-demo-writer-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def mount_point(work: Path) -> Iterator[Callable[..., Path]]:
    """``make(uid, gid=uid, mode=0o755)``: an empty directory that a container would give
    ``demo``: a tmpfs of that owner and mode mounted under a read-only parent, or, where
    this process may not mount, a directory under a parent made read-only by its mode."""
    mounted: list[Path] = []
    can_mount = _can_mount(work)

    def make(owner_uid: int, gid: int | None = None, mode: int = 0o755) -> Path:
        parent = work / f"root-{len(mounted)}"
        parent.mkdir()
        models = parent / "models"
        if not can_mount:
            models.mkdir()
            parent.chmod(0o555)
            return models
        _mount("-t", "tmpfs", "-o", "size=64m,mode=0755", "tmpfs", str(parent))
        mounted.append(parent)
        models.mkdir()
        _mount("-o", "remount,ro", str(parent))  # like readOnlyRootFilesystem
        gid = owner_uid if gid is None else gid
        options = f"size=64m,mode={mode:o},uid={owner_uid},gid={gid}"
        _mount("-t", "tmpfs", "-o", options, "tmpfs", str(models))
        mounted.append(models)
        assert os.path.ismount(models)
        return models

    yield make
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False)
    for parent in work.glob("root-*"):
        if not os.path.ismount(parent):
            parent.chmod(0o755)


def as_uid(uid: int) -> list[str]:
    """The command prefix that runs a process as ``uid`` (and group ``uid``), with no
    capabilities; nothing where this process cannot switch (it runs as itself)."""
    if not ROOT or uid == 0:
        return []
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"]


def writable_home(tmp_path: Path, uid: int) -> Path:
    home = tmp_path / f"home-{uid}"
    home.mkdir(exist_ok=True)
    if ROOT:
        os.chown(home, uid, uid)
    return home


def run_demo(
    directory: Path, uid: int, tmp_path: Path, umask: int = 0o077
) -> subprocess.CompletedProcess[str]:
    """The real `tensorgate demo DIRECTORY`, as ``uid``, under a strict umask.

    The umask is subprocess's own argument, not a ``preexec_fn``: with one, Python forks
    instead of vforking, gRPC's event engine (live in this process from earlier tests)
    restarts its poller in the child, and the child's close_fds can close the poller's
    epoll fd under it: an abort (SIGABRT, "epoll_wait error: Bad file descriptor") before
    the command even runs, now and then (CI, 2026-12-06)."""
    home = writable_home(tmp_path, uid)
    return subprocess.run(
        [*as_uid(uid), sys.executable, *CLI, "demo", str(directory)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**ENV, "HOME": str(home), "TMPDIR": str(home)},
        umask=umask,
    )


def assert_demo_written(root: Path, uid: int, listing: str) -> None:
    assert (root / ".complete").is_file()
    assert not (root / writelock.LOCK_FILE).exists()
    assert [p.name for p in root.iterdir() if p.name.startswith(writelock.LOCK_FILE)] == []
    assert {"scorer/onnx/model.onnx", "detector/1/model.onnx"} <= set(listing.split())
    # Readable by any uid whatever the writer's umask: directories 0755, files 0644.
    below = [p for p in root.rglob("*")]
    assert len(below) > 10
    for p in below:
        st = p.lstat()
        want = 0o755 if stat.S_ISDIR(st.st_mode) else 0o644
        assert stat.S_IMODE(st.st_mode) == want, f"{p}: {oct(stat.S_IMODE(st.st_mode))}"
        assert st.st_uid == (uid if ROOT else os.geteuid()), p


# -- into a mount point -----------------------------------------------------------------


def test_demo_into_a_mount_point_as_root_is_served_by_the_image_uid(
    mount_point: Callable[..., Path], work: Path
) -> None:
    models = mount_point(0)
    assert not os.access(models.parent, os.W_OK)  # no sibling to build in and rename
    run = run_demo(models, 0, work)
    assert run.returncode == 0, run.stderr
    assert_demo_written(models, 0, run.stdout)

    # The image's user serves what root wrote (it used to be 0700: "is not readable").
    workdir = writable_home(work, IMAGE_UID)
    env = {"HOME": str(workdir)}
    with ServerProcess(
        models, workdir, "--require-models", "2", env=env, prefix=as_uid(IMAGE_UID)
    ) as server:
        x = np.random.default_rng(5).standard_normal((3, 64)).astype(np.float32)
        with Client(server.address) as client:
            for variant in ("torch", "tf", "onnx"):
                result = client.infer("scorer", {"input": x}, version=variant, timeout=60)
                np.testing.assert_allclose(
                    result["output"], mlp_reference(x, mlp_weights()), rtol=0, atol=1e-5
                )
            assert client.is_model_ready("detector", timeout=30)
        health = subprocess.run(
            [sys.executable, *CLI, "health", "--port-file", str(server.port_file)],
            capture_output=True,
            text=True,
            timeout=60,
            env=ENV,
        )
        assert (health.returncode, health.stdout.strip()) == (0, "SERVING"), health.stdout
        if ROOT:
            assert server.proc is not None
            assert Path(f"/proc/{server.proc.pid}").stat().st_uid == IMAGE_UID


def test_demo_into_a_volume_the_user_owns_as_that_user(
    mount_point: Callable[..., Path], work: Path
) -> None:
    # docs/deploy.md: docker run --user "$(id -u)" -v "$PWD/models:/models" IMAGE demo /models
    models = mount_point(IMAGE_UID)
    run = run_demo(models, IMAGE_UID, work)
    assert run.returncode == 0, run.stderr
    assert_demo_written(models, IMAGE_UID, run.stdout)
    again = run_demo(models, IMAGE_UID, work)  # idempotent: nothing rewritten
    assert again.returncode == 0, again.stderr
    assert "wrote the demo" not in again.stderr


def test_the_k8s_demo_overlays_init_container_writes_its_emptydir(
    mount_point: Callable[..., Path], work: Path
) -> None:
    """What deploy/k8s/overlays/demo runs: the initContainer's args, as the pod's user,
    into an emptyDir (root-owned, mode 0777, group fsGroup with setgid) under a read-only
    root filesystem."""
    patch = yaml.safe_load((K8S / "overlays" / "demo" / "models-emptydir.yaml").read_text())
    pod = yaml.safe_load((K8S / "base" / "deployment.yaml").read_text())["spec"]["template"]
    security = pod["spec"]["securityContext"]
    (init,) = patch["spec"]["template"]["spec"]["initContainers"]
    assert init["securityContext"]["readOnlyRootFilesystem"] is True
    (mount,) = [m for m in init["volumeMounts"] if m["name"] == "models"]
    assert not mount.get("readOnly")
    uid, fs_group = security["runAsUser"], security["fsGroup"]
    models = mount_point(0, gid=fs_group, mode=0o2777)
    args = [str(models) if a == mount["mountPath"] else a for a in init["args"]]
    assert args == ["demo", str(models)]
    home = writable_home(work, uid)  # the pod's HOME=/tmp, an emptyDir of its own
    env = {e["name"]: str(home) if e["value"] == "/tmp" else e["value"] for e in init["env"]}
    run = subprocess.run(
        [*as_uid(uid), sys.executable, *CLI, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**ENV, **env, "TMPDIR": str(home)},
    )
    assert run.returncode == 0, run.stderr
    assert_demo_written(models, uid, run.stdout)


def test_demo_creates_an_absent_directory_readable_by_all(work: Path) -> None:
    models = work / "new" / "models"
    run = run_demo(models, os.geteuid(), work)
    assert run.returncode == 0, run.stderr
    assert_demo_written(models, os.geteuid(), run.stdout)
    # The writer made it, so it is the writer's to open up (was 0700, from mkdtemp).
    assert stat.S_IMODE(models.stat().st_mode) == 0o755
    assert sorted(p.name for p in models.parent.iterdir()) == ["models"]  # nothing beside


def test_demo_says_why_it_cannot_write(mount_point: Callable[..., Path], work: Path) -> None:
    # Not writable by the image's uid: root's volume (or, without root, a 0555 directory).
    models = mount_point(0)
    if not ROOT:
        models.chmod(0o555)
    run = run_demo(models, IMAGE_UID, work)
    assert run.returncode == 1
    uid = IMAGE_UID if ROOT else os.geteuid()
    assert f"cannot write the demo repository to {models}: Permission denied" in run.stderr
    assert f"give a directory that uid {uid} can write" in run.stderr
    assert "neither empty" not in run.stderr and "Traceback" not in run.stderr
    assert list(models.iterdir()) == []


def test_demo_refuses_a_directory_with_other_files(work: Path) -> None:
    models = work / "models"
    models.mkdir()
    (models / "mine.txt").write_text("keep me")
    run = run_demo(models, os.geteuid(), work)
    assert run.returncode == 1
    assert f"cannot write the demo repository to {models}: it holds other files (mine.txt)" in (
        run.stderr
    )
    assert sorted(p.name for p in models.iterdir()) == ["mine.txt"]


# -- the write lock: what a server does while a writer holds it -------------------------


def _write_scorer(root: Path, whole: bool) -> Path:
    """The scorer in ONNX: the whole file, or its first 64 bytes (half-copied)."""
    path = build_mlp_onnx(root / "scorer" / "1" / "model.onnx", mlp_weights())
    if not whole:
        path.write_bytes(path.read_bytes()[:64])
    return path


def _blocked_on(lock_file: Path) -> bool:
    """Whether some process waits for a flock on ``lock_file`` (the kernel's /proc/locks)."""
    inode = f":{lock_file.stat().st_ino} "
    return any(
        "-> FLOCK" in line and inode in line
        for line in Path("/proc/locks").read_text().splitlines()
    )


def test_writers_take_turns(work: Path) -> None:
    root = work / "models"
    root.mkdir()
    first_holds, second_entered = threading.Event(), threading.Event()
    seen: list[bool] = []

    def second() -> None:
        first_holds.wait()
        with writelock.holding(root) as interrupted:
            seen.append(interrupted)
            second_entered.set()

    thread = threading.Thread(target=second)
    thread.start()
    with writelock.holding(root) as interrupted:
        assert not interrupted
        assert writelock.write_state(root) is writelock.WriteState.WRITING
        first_holds.set()
        wait_until(lambda: _blocked_on(root / writelock.LOCK_FILE), what="the second writer")
        assert not second_entered.is_set()
    thread.join(30)
    assert seen == [False]  # the first finished cleanly: nothing to clear
    assert writelock.write_state(root) is writelock.WriteState.NONE
    assert list(root.iterdir()) == []


def test_server_waits_for_the_writer_then_loads_the_whole_repository(work: Path) -> None:
    root = work / "models"
    root.mkdir()
    server = ServerProcess(root, work)
    pool = ThreadPoolExecutor(1)
    try:
        with writelock.holding(root):
            _write_scorer(root, whole=False)
            started = pool.submit(server.start)  # returns once serving
            wait_until(lambda: "is being written: waiting" in server.log(), what="the wait")
            assert not started.done()
            _write_scorer(root, whole=True)
        started.result(timeout=120)  # the lock file is gone: the server loads
        assert "is written: loading it" in server.log()
        x = np.ones((2, 64), np.float32)
        with Client(server.address) as client:
            result = client.infer("scorer", {"input": x}, timeout=30)
        np.testing.assert_allclose(result["output"], mlp_reference(x, mlp_weights()), atol=1e-5)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        if server.proc is not None:
            assert server.stop() == 0, server.log()


def test_an_interrupted_write_is_refused_by_the_server_and_redone_by_demo(work: Path) -> None:
    root = work / "models"
    root.mkdir()
    # A writer killed half-way (out of memory, say): it held the lock, wrote half a model.
    script = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from tensorgate.server import writelock
        root = Path({str(root)!r})
        with writelock.holding(root):
            (root / "scorer" / "torch").mkdir(parents=True)
            (root / "scorer" / "torch" / "model.pt").write_bytes(b"half")
            print("written", flush=True)
            sys.stdin.read()
        """
    )
    writer = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert writer.stdout is not None and writer.stdout.readline() == "written\n"
    assert writelock.write_state(root) is writelock.WriteState.WRITING
    writer.send_signal(signal.SIGKILL)
    writer.wait(30)
    assert writelock.write_state(root) is writelock.WriteState.INTERRUPTED

    serve = subprocess.run(
        [sys.executable, *CLI, "serve", "--repository", str(root), "--port", "0",
         "--metrics-port", "-1"],
        capture_output=True, text=True, timeout=120, env=ENV,
    )  # fmt: skip
    assert serve.returncode == 1, serve.stderr
    assert "Traceback" not in serve.stderr, serve.stderr
    assert f"model repository {root} holds an interrupted write" in serve.stderr
    assert f"tensorgate demo {root}" in serve.stderr

    run = run_demo(root, os.geteuid(), work)
    assert run.returncode == 0, run.stderr
    assert "clearing the interrupted demo write" in run.stderr
    assert_demo_written(root, os.geteuid(), run.stdout)
    assert (root / "scorer" / "torch" / "model.pt").stat().st_size > 1000


def test_poller_and_repository_rpcs_wait_for_the_writer(work: Path) -> None:
    root = work / "models"
    root.mkdir()
    args = ("--poll-interval", "0.1", "--log-level", "DEBUG")
    with ServerProcess(root, work, *args) as server, Client(server.address) as client:
        with writelock.holding(root):
            _write_scorer(root, whole=False)
            skipped = "poll: skipped, the repository's write lock says writing"
            # Enough rounds for the poller to have loaded the half model if it looked.
            wait_until(lambda: server.log().count(skipped) >= 5, what="skipped polls")
            with pytest.raises(InferenceError) as refused:
                client.load_model("scorer", timeout=30)
            assert refused.value.code == grpc.StatusCode.UNAVAILABLE
            assert "is being written" in refused.value.message
            _write_scorer(root, whole=True)
            before_release = server.log()
        wait_until(lambda: client.is_model_ready("scorer", timeout=10), what="the load")
        assert "model directory scorer changed" not in before_release
        x = np.ones((1, 64), np.float32)
        result = client.infer("scorer", {"input": x}, timeout=30)
        np.testing.assert_allclose(result["output"], mlp_reference(x, mlp_weights()), atol=1e-5)
