"""Shared fixtures: one real model repository (built once per session from real framework
files) and one real gateway process serving it."""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tensorgate.clients import Client
from tensorgate.server.demo import build_mlp_onnx, mlp_weights, write_demo_repository

from . import modelfactory as mf
from .serverproc import FRONT_END, ServerProcess, serve

#: Every test that talks gRPC runs against both front ends (issue 18). Set
#: TENSORGATE_TEST_FRONT_ENDS=python to run against one while the extension is not built.
FRONT_ENDS = tuple(os.environ.get("TENSORGATE_TEST_FRONT_ENDS", "python,native").split(","))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests that take the ``front_end`` fixture (directly, through ``server`` /
    ``module_server``, or a module's ``pytestmark = pytest.mark.usefixtures("front_end")``)
    run once per front end. A module- or session-scoped fixture that starts a server must
    take ``front_end`` itself, or one server would be reused under both parameters."""
    if "front_end" in metafunc.fixturenames:
        metafunc.parametrize("front_end", FRONT_ENDS, indirect=True, scope="session")


@pytest.fixture(scope="session")
def front_end(request: pytest.FixtureRequest) -> Iterator[str]:
    """The gRPC front end ("python" or "native") of the servers this test starts."""
    kind = request.param
    if kind == "native" and importlib.util.find_spec("tensorgate_native") is None:
        pytest.fail(
            "the native front end is not installed (pip install ./native, which "
            "scripts/setup.sh does); TENSORGATE_TEST_FRONT_ENDS=python runs without it"
        )
    FRONT_END["current"] = kind
    yield kind
    FRONT_END["current"] = "python"


PAIR_CONFIG = """
[[input]]
name = "a"
datatype = "FP32"
shape = [-1]

[[input]]
name = "b"
datatype = "FP32"
shape = [-1]

[[output]]
name = "sum"
datatype = "FP32"
shape = [-1]

[[output]]
name = "product"
datatype = "FP32"
shape = [-1]
"""


@pytest.fixture(scope="session")
def demo_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in demo repository (scorer in three frameworks, detector in ONNX)."""
    return write_demo_repository(tmp_path_factory.mktemp("demo") / "models")


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory: pytest.TempPathFactory, demo_repo: Path) -> Path:
    """The demo models plus test models covering strings, every datatype, positional
    TorchScript, and models that must fail to load."""
    root = tmp_path_factory.mktemp("repo") / "models"
    shutil.copytree(demo_repo, root)
    mf.build_string_onnx(root / "strings" / "onnx" / "model.onnx")
    mf.build_string_torchscript(root / "strings" / "torch" / "model.pt")
    mf.build_string_savedmodel(root / "strings" / "tf" / "model.savedmodel")
    mf.build_identity_all_onnx(root / "identity" / "1" / "model.onnx")
    mf.build_identity_bf16_onnx(root / "bf16" / "1" / "model.onnx")
    mf.build_two_output_torchscript(root / "pair" / "torch" / "model.pt")
    (root / "pair" / "config.toml").write_text(PAIR_CONFIG)
    mf.write_broken_model(root / "broken" / "1" / "model.onnx")
    # One good version and one broken: version 1 serves, version 2 reports why it cannot.
    build_mlp_onnx(root / "partial" / "1" / "model.onnx", mlp_weights())
    mf.write_broken_model(root / "partial" / "2" / "model.onnx")
    # Two variants with different signatures: refused as a whole.
    build_mlp_onnx(root / "mismatch" / "a" / "model.onnx", mlp_weights())
    mf.build_string_onnx(root / "mismatch" / "b" / "model.onnx")
    # A config.toml with a misspelt field.
    build_mlp_onnx(root / "badconfig" / "1" / "model.onnx", mlp_weights())
    (root / "badconfig" / "config.toml").write_text("max_batch_sise = 4\n")
    return root


@pytest.fixture(scope="session")
def server(
    model_repo: Path, tmp_path_factory: pytest.TempPathFactory, front_end: str
) -> Iterator[ServerProcess]:
    yield from serve(model_repo, tmp_path_factory.mktemp("server"))


@pytest.fixture(scope="session")
def client(server: ServerProcess) -> Iterator[Client]:
    with Client(server.address) as c:
        yield c


@pytest.fixture(scope="module")
def module_server(
    repo: Path, tmp_path_factory: pytest.TempPathFactory, front_end: str
) -> Iterator[ServerProcess]:
    """A gateway of the test module's own, serving the ``repo`` fixture the module defines."""
    yield from serve(repo, tmp_path_factory.mktemp("server"))


@pytest.fixture(scope="module")
def module_client(module_server: ServerProcess) -> Iterator[Client]:
    with Client(module_server.address) as c:
        yield c
