"""The Dockerfile and the Kubernetes manifests agree with the server they run.

No container engine or cluster runs here, so these tests parse what they can and run the
rest for real: every flag in the image's command and in the Deployment's args goes through
the CLI's own parser, the ports, probes, paths and users must match across Dockerfile,
Deployment, Services and monitors, the kustomize overlays are built with `kubectl kustomize`
(when kubectl is installed), and the image's start and health-check commands are run as
processes on loopback.
"""

from __future__ import annotations

import json
import os
import re
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

from tensorgate.server.cli import main
from tensorgate.server.demo import build_mlp_onnx, mlp_weights

from .serverproc import REPO_ROOT

DOCKERFILE = REPO_ROOT / "Dockerfile"
K8S = REPO_ROOT / "deploy" / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir())
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}


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


def test_healthcheck_is_the_health_command_on_the_served_port(
    dockerfile: list[Instruction],
) -> None:
    check = one(final_stage(dockerfile), "HEALTHCHECK").args
    options = dict(re.findall(r"--([\w-]+)=(\S+)", check))
    argv = exec_form(check[check.index("CMD") + 3 :].strip())
    assert argv[0] == "tensorgate"
    name, params = cli_params(argv[1:])
    _, serve = cli_params(image_argv(dockerfile))
    assert name == "health"
    assert params["url"].rsplit(":", 1)[1] == str(serve["port"])
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
    dockerfile: list[Instruction], small_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    """The image's CMD, run as it is but for the repository path and the ports (any free
    port, on loopback, so that nothing here collides with another server)."""
    workdir = tmp_path_factory.mktemp("image-run")
    port_file, log = workdir / "ports.json", workdir / "server.log"
    argv = _substitute(
        image_argv(dockerfile),
        {"--repository": str(small_repo), "--host": "127.0.0.1", "--port": "0",
         "--metrics-port": "0"},
    )  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*_entry_point(), *argv, "--port-file", str(port_file)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=ENV,
        )
    try:
        deadline = time.monotonic() + 120
        while not port_file.exists():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield proc, json.loads(port_file.read_text())["grpc_port"], log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _healthcheck_argv(dockerfile: list[Instruction], port: int, *extra: str) -> list[str]:
    check = one(final_stage(dockerfile), "HEALTHCHECK").args
    argv = exec_form(check[check.index("CMD") + 3 :].strip())[1:]
    url = argv[argv.index("--url") + 1]
    return _substitute(argv, {"--url": f"{url.rsplit(':', 1)[0]}:{port}"}) + list(extra)


def test_image_healthcheck_passes_against_the_image_command(
    dockerfile: list[Instruction], image_server: tuple[subprocess.Popen[bytes], int, Path]
) -> None:
    _, port, _ = image_server
    run = subprocess.run(
        [*_entry_point(), *_healthcheck_argv(dockerfile, port)],
        capture_output=True,
        text=True,
        timeout=60,
        env=ENV,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip() == "SERVING"


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
    image_server: tuple[subprocess.Popen[bytes], int, Path],
    extra: list[str],
    rc: int,
    output: str,
) -> None:
    _, port, _ = image_server
    run = subprocess.run(
        [*_entry_point(), *_healthcheck_argv(dockerfile, port, *extra)],
        capture_output=True,
        text=True,
        timeout=60,
        env=ENV,
    )
    assert run.returncode == rc, run.stdout + run.stderr
    assert run.stdout.startswith(output), run.stdout


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
    image_server: tuple[subprocess.Popen[bytes], int, Path],
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
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: overlays are checked by reference only")
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
