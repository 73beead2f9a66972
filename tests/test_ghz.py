"""ghz, the gRPC load generator, against the real gateway, as a user runs it: through server
reflection (no proto files), with the configs in ``loadtest/ghz/``, binary bodies, pinned
variants, sticky keys, ModelStreamInfer and bad inputs (TLS, mutual TLS and a bearer token:
test_ghz_tls.py).

Each test reads ghz's own JSON report (``--format json``: ``statusCodeDistribution``,
``errorDistribution``) and the server's own counts (ModelStatistics through
``tensorgate.clients.Client``) for the same calls. ghz counts a ModelStreamInfer stream
as OK even when the server answered each message with an error inside the stream, so only
the server's counts show that the messages were served.

ghz is found through ``$TENSORGATE_GHZ``, else the tools folder ``bash
scripts/install_ghz.sh`` installs it in, else PATH. Without it these tests fail: in the
documented setup they run. Each run is short (a second, or a few hundred calls).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tensorgate.clients import Client, InferenceError
from tensorgate.server.demo import build_mlp_onnx, mlp_weights, write_wide_mlp
from tensorgate.server.demo.repository import SCORER_VERSIONS

from . import modelfactory as mf
from .serverproc import REPO_ROOT, ServerProcess

LOADTEST = REPO_ROOT / "loadtest"
CONFIGS = sorted((LOADTEST / "ghz").glob("*.json"))
INFER = "inference.GRPCInferenceService.ModelInfer"
STREAM = "inference.GRPCInferenceService.ModelStreamInfer"
#: The scorer splits unpinned traffic between two variants and keeps a user on one.
ROUTING = """
[routing]
weights = { torch = 50, onnx = 50 }
sticky_key = "user"
"""


def find_ghz() -> Path | None:
    """$TENSORGATE_GHZ, else the tools folder of scripts/install_ghz.sh, else PATH."""
    if os.environ.get("TENSORGATE_GHZ"):
        return Path(os.environ["TENSORGATE_GHZ"])
    tools = Path(os.environ.get("TENSORGATE_TOOLS", Path.home() / ".cache/tensorgate/tools"))
    if (tools / "bin" / "ghz").is_file():
        return tools / "bin" / "ghz"
    found = shutil.which("ghz")
    return Path(found) if found else None


@pytest.fixture(scope="session")
def ghz() -> Path:
    path = find_ghz()
    if path is None or not os.access(path, os.X_OK):
        pytest.fail(
            f"ghz not found ({path or 'not in $TENSORGATE_GHZ, the tools folder or PATH'}); "
            "install it with: bash scripts/install_ghz.sh",
            pytrace=False,
        )
    return path


class Report(dict):
    """ghz's JSON report."""

    @property
    def codes(self) -> dict[str, int]:
        return self["statusCodeDistribution"]

    @property
    def errors(self) -> dict[str, int]:
        return self.get("errorDistribution") or {}


def ghz_process(ghz: Path, target: str, *args: str) -> subprocess.CompletedProcess:
    """Run ghz with ``args`` against ``target`` (plaintext unless ``args`` name a
    ``--cacert``) from the repository root, where the configs' ``data-file`` paths start."""
    plaintext = () if "--cacert" in args else ("--insecure",)
    cmd = [str(ghz), *plaintext, "--format", "json", *args, target]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)


def run_ghz(ghz: Path, target: str, *args: str) -> Report:
    """Run ghz (``ghz_process``) and return its report."""
    proc = ghz_process(ghz, target, *args)
    assert proc.returncode == 0, f"{proc.args} exited {proc.returncode}:\n{proc.stderr}"
    return Report(json.loads(proc.stdout))


def counts(client: Client, model: str) -> dict[str, tuple[int, int]]:
    """The server's (success, fail) counts per version of ``model`` (ModelStatistics)."""
    found = {}
    for s in client.model_statistics(model, timeout=10):
        stats = s.get("inference_stats", {})
        found[s["version"]] = tuple(
            int(stats.get(kind, {}).get("count", 0)) for kind in ("success", "fail")
        )
    return found


def served_since(client: Client, model: str, before: dict[str, tuple[int, int]]):
    """{version: (successes, failures)} since ``before``, for the versions that changed."""
    after = counts(client, model)
    delta = {v: (s - before[v][0], f - before[v][1]) for v, (s, f) in after.items()}
    return {v: d for v, d in delta.items() if d != (0, 0)}


def total(served: dict[str, tuple[int, int]]) -> tuple[int, int]:
    """(successes, failures) over every version."""
    return sum(s for s, _ in served.values()), sum(f for _, f in served.values())


def calls(body: str, n: int, c: int, call: str = INFER) -> tuple[str, ...]:
    """ghz's arguments for ``n`` calls of ``call`` with the JSON ``body``, ``c`` at a time."""
    return ("--call", call, "-d", body, "-n", str(n), "-c", str(c))


def scorer_request(
    typed: bool, version: str = "", shape: tuple[int, int] = (1, 64), model: str = "scorer"
) -> str:
    """A ModelInferRequest for the scorer's MLP as JSON (protobuf's JSON mapping), the
    tensor as typed ``fp32_contents`` or as base64 ``raw_input_contents``."""
    x = np.random.default_rng(7).standard_normal(shape).astype(np.float32)
    tensor: dict = {"name": "input", "datatype": "FP32", "shape": list(shape)}
    request: dict = {"model_name": model, "model_version": version, "inputs": [tensor]}
    if typed:
        tensor["contents"] = {"fp32_contents": x.reshape(-1).tolist()}
    else:
        request["raw_input_contents"] = [base64.b64encode(x.tobytes()).decode()]
    return json.dumps(request)


# -- the server: the demo repository, the benchmark models the configs name, a routing ------


@pytest.fixture(scope="module")
def repo(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo (scorer, detector) with the scorer split between torch and onnx by a sticky
    key, plus the models loadtest/ghz/'s other configs name: mlp, wide and strings."""
    root = tmp_path_factory.mktemp("ghz") / "models"
    shutil.copytree(demo_repo, root)
    with open(root / "scorer" / "config.toml", "a") as f:
        f.write(ROUTING)
    build_mlp_onnx(root / "mlp" / "1" / "model.onnx", mlp_weights())
    write_wide_mlp(root / "wide", frameworks=("onnx",))
    mf.build_string_onnx(root / "strings" / "onnx" / "model.onnx")
    return root


# -- reflection, typed and raw bodies ----------------------------------------------------------


@pytest.mark.parametrize("typed", [True, False], ids=["fp32_contents", "raw_input_contents"])
def test_reflection_body(
    ghz: Path, module_server: ServerProcess, module_client: Client, typed: bool
) -> None:
    before = counts(module_client, "scorer")
    report = run_ghz(ghz, module_server.address, *calls(scorer_request(typed), 200, 8))
    assert report.codes == {"OK": 200} and not report.errors, report.errors
    assert total(served_since(module_client, "scorer", before)) == (200, 0)


# -- every config in loadtest/ghz/ as written ----------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_loadtest_config(
    ghz: Path, module_server: ServerProcess, module_client: Client, config: Path
) -> None:
    settings = json.loads(config.read_text())
    # Calls in flight when the duration ends finish, instead of being cut (and reported
    # as Unavailable/Canceled: errors that are not the server's).
    assert settings["duration-stop"] == "wait", config
    model = json.loads((REPO_ROOT / settings["data-file"]).read_text())["model_name"]
    before = counts(module_client, model)
    report = run_ghz(ghz, module_server.address, "--config", str(config), "-z", "1s")
    assert report["count"] > 0 and report.codes == {"OK": report["count"]}, report.errors
    assert total(served_since(module_client, model, before)) == (report["count"], 0)


# -- a binary body made by make_requests.py -------------------------------------------------------


def test_binary_body(
    ghz: Path, module_server: ServerProcess, module_client: Client, tmp_path: Path
) -> None:
    """Two length-delimited messages, pinned to onnx and torch: ghz sends them in turn."""
    body = tmp_path / "scorer.bin"
    subprocess.run(
        [sys.executable, str(LOADTEST / "make_requests.py"), "--ghz-body",
         str(LOADTEST / "data" / "scorer.json"), str(body), "--version", "onnx,torch"],
        check=True,
    )  # fmt: skip
    before = counts(module_client, "scorer")
    report = run_ghz(
        ghz, module_server.address, "--call", INFER, "-B", str(body), "-n", "100", "-c", "4"
    )
    assert report.codes == {"OK": 100} and not report.errors, report.errors
    onnx, torch = str(SCORER_VERSIONS["onnx"]), str(SCORER_VERSIONS["torch"])
    assert served_since(module_client, "scorer", before) == {onnx: (50, 0), torch: (50, 0)}


# -- pinned variants, sticky keys ----------------------------------------------------------------


@pytest.mark.parametrize("version", ["onnx", str(SCORER_VERSIONS["onnx"]), "pt2", "2"])
def test_pinned_variant(
    ghz: Path, module_server: ServerProcess, module_client: Client, version: str
) -> None:
    """By name and by the integer alias Triton's tools use: the same variant answers."""
    integer = str(SCORER_VERSIONS.get(version, version))
    before = counts(module_client, "scorer")
    report = run_ghz(ghz, module_server.address, *calls(scorer_request(False, version), 60, 4))
    assert report.codes == {"OK": 60} and not report.errors, report.errors
    assert served_since(module_client, "scorer", before) == {integer: (60, 0)}


def test_sticky_key_from_metadata(
    ghz: Path, module_server: ServerProcess, module_client: Client
) -> None:
    """Without the key the split reaches both variants; with ``user: alice`` every call
    goes to alice's variant, the one the Python client is sent to with the same key."""
    args = calls(scorer_request(False), 100, 4)
    before = counts(module_client, "scorer")
    report = run_ghz(ghz, module_server.address, *args)
    assert report.codes == {"OK": 100}, report.errors
    split = served_since(module_client, "scorer", before)
    assert set(split) == {str(SCORER_VERSIONS["torch"]), str(SCORER_VERSIONS["onnx"])}, split

    with Client(module_server.address, metadata={"user": "alice"}) as alice:
        x = np.zeros((1, 64), np.float32)
        variant = alice.infer("scorer", {"input": x}, timeout=30).variant
    before = counts(module_client, "scorer")
    report = run_ghz(ghz, module_server.address, *args, "--metadata", '{"user": "alice"}')
    assert report.codes == {"OK": 100}, report.errors
    assert served_since(module_client, "scorer", before) == {
        str(SCORER_VERSIONS[variant]): (100, 0)
    }


# -- ModelStreamInfer ----------------------------------------------------------------------------


def test_stream_several_messages(
    ghz: Path, module_server: ServerProcess, module_client: Client
) -> None:
    """A bidi stream per ghz call, five requests on each: the server serves 5 x 20."""
    message = json.loads((LOADTEST / "data" / "scorer.json").read_text())
    message["model_version"] = "onnx"
    before = counts(module_client, "scorer")
    streams = calls(json.dumps([message] * 5), 20, 4, call=STREAM)
    report = run_ghz(ghz, module_server.address, *streams)
    assert report.codes == {"OK": 20} and not report.errors, report.errors
    assert served_since(module_client, "scorer", before) == {str(SCORER_VERSIONS["onnx"]): (100, 0)}


# -- bad inputs ----------------------------------------------------------------------------------


def test_bad_inputs_keep_their_codes(
    ghz: Path, module_server: ServerProcess, module_client: Client
) -> None:
    before = counts(module_client, "scorer")
    wrong_shape = scorer_request(True, "onnx", shape=(1, 8))
    report = run_ghz(ghz, module_server.address, *calls(wrong_shape, 30, 3))
    assert report.codes == {"InvalidArgument": 30}
    ((error, n),) = report.errors.items()
    assert n == 30 and "code = InvalidArgument" in error and "shape [1, 8]" in error, error
    assert served_since(module_client, "scorer", before) == {str(SCORER_VERSIONS["onnx"]): (0, 30)}

    unknown = scorer_request(False, model="nosuch")
    report = run_ghz(ghz, module_server.address, *calls(unknown, 30, 3))
    assert report.codes == {"NotFound": 30}
    ((error, n),) = report.errors.items()
    assert n == 30 and "code = NotFound" in error and "nosuch" in error, error
    with pytest.raises(InferenceError) as info:
        module_client.model_statistics("nosuch", timeout=10)
    assert info.value.code.name == "NOT_FOUND"

    # The server keeps serving.
    before = counts(module_client, "scorer")
    report = run_ghz(ghz, module_server.address, *calls(scorer_request(False), 50, 4))
    assert report.codes == {"OK": 50}, report.errors
    assert total(served_since(module_client, "scorer", before)) == (50, 0)
