"""The interoperability matrix through Triton's own ``tritonclient.grpc``: every backend x
every OIP datatype it carries x batched and non-batched models x raw and typed contents x
unary and streaming calls, each answer compared with the framework's own execution of the
same model file in this process.

The models are described in ``interop_models.py`` (a backend that arrives later adds one
entry there). One gateway serves all of them, and one tritonclient process (its own venv:
it registers its own ``inference`` protos) sends every case - the unary ones with
``infer``, the streamed ones over one ``start_stream`` / ``async_stream_infer`` stream - and
writes what came back for the tests below to judge, one case each.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tensorgate.datatypes import DATATYPES, by_name

from .interop_models import FRAMEWORKS, Framework, ModelSpec, sample_inputs, write_models
from .serverproc import ServerProcess, run_triton_script, serve

# Talks gRPC: runs against both front ends (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("front_end")

# Runs under the tritonclient interpreter. argv: address, workdir, spec (JSON).
# Prints {case id: what came back, or {"error": "..."}}.
MATRIX_SCRIPT = r"""
import json
import queue
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

address, workdir, spec = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
client = grpcclient.InferenceServerClient(address)
report = {}


def load(model, tensor):
    array = np.load(workdir / f"{model}.npz", allow_pickle=True)[tensor["name"]]
    # BF16 travels through .npz as its bits (uint16).
    return array.view(ml_dtypes.bfloat16) if tensor["datatype"] == "BF16" else array


def inputs(case):
    made = []
    for tensor in case["inputs"]:
        data = load(case["model"], tensor)
        inp = grpcclient.InferInput(tensor["name"], list(data.shape), tensor["datatype"])
        if case["contents"] == "raw":
            inp.set_data_from_numpy(data)  # raw_input_contents
        else:
            # tritonclient.grpc has no setter for typed contents: fill the InferInputTensor
            # message it sends, as its HTTP client does for JSON data.
            field = spec["contents_fields"][tensor["datatype"]]
            getattr(inp._get_tensor().contents, field).extend(data.reshape(-1).tolist())
        made.append(inp)
    return made


def outputs(case):
    return [grpcclient.InferRequestedOutput(name) for name in case["outputs"]]


def record(case_id, result):
    response = result.get_response()
    got, saved = {}, {}
    for name in spec["cases"][case_id]["outputs"]:
        out = result.get_output(name)
        array = result.as_numpy(name)
        saved[name] = array.view(np.uint16) if out.datatype == "BF16" else array
        got[name] = {"datatype": out.datatype, "shape": list(out.shape)}
    np.savez(workdir / f"out-{case_id.replace('/', '-')}.npz", **saved)
    report[case_id] = {"model_name": response.model_name, "model_version":
                       response.model_version, "id": response.id, "outputs": got}


for case_id, case in spec["cases"].items():
    if case["transport"] != "unary":
        continue
    try:
        record(case_id, client.infer(case["model"], inputs(case), outputs=outputs(case),
                                     request_id=case_id))
    except InferenceServerException as e:
        report[case_id] = {"error": f"{e.status()}: {e.message()}"}

answers = queue.Queue()
client.start_stream(callback=lambda result, error: answers.put((result, error)))
streamed = [i for i, c in spec["cases"].items() if c["transport"] == "stream"]
for case_id in streamed:
    case = spec["cases"][case_id]
    client.async_stream_infer(case["model"], inputs(case), outputs=outputs(case),
                              request_id=case_id)
for _ in streamed:
    result, error = answers.get(timeout=120)
    if error is not None:
        report.setdefault("stream_errors", []).append(str(error))
    else:
        record(result.get_response().id, result)
client.stop_stream()
print(json.dumps(report))
"""


@dataclass(frozen=True)
class Case:
    spec: ModelSpec
    framework: Framework
    contents: str  # "raw" | "typed"
    transport: str  # "unary" | "stream"

    @property
    def id(self) -> str:
        return f"{self.spec.name}/{self.contents}/{self.transport}"


def cases() -> list[Case]:
    found = []
    for fw in FRAMEWORKS:
        for spec in fw.models():
            typed = all(DATATYPES[dt].contents_field for dt in spec.datatypes)
            for contents in ("raw", "typed") if typed else ("raw",):
                for transport in ("unary", "stream"):
                    found.append(Case(spec, fw, contents, transport))
    return found


CASES = cases()


@dataclass
class Matrix:
    report: dict[str, Any]
    workdir: Path
    inputs: dict[str, dict[str, np.ndarray]]
    files: dict[str, Path]


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every matrix model in one repository: {model name: its model file}."""
    root = tmp_path_factory.mktemp("matrix") / "models"
    return {name: path for name, (_, _, path) in write_models(root).items()}


@pytest.fixture(scope="module")
def matrix_server(
    front_end: str, written: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    repo = next(iter(written.values())).parents[2]
    yield from serve(repo, tmp_path_factory.mktemp("matrix-server"))


@pytest.fixture(scope="module")
def matrix(
    written: dict[str, Path],
    matrix_server: ServerProcess,
    tmp_path_factory: pytest.TempPathFactory,
) -> Matrix:
    workdir = tmp_path_factory.mktemp("matrix-client")
    specs = {c.spec.name: c.spec for c in CASES}
    inputs = {}
    for i, name in enumerate(sorted(specs)):
        inputs[name] = sample_inputs(specs[name], seed=i)
        bits = {
            n: a.view(np.uint16) if a.dtype == by_name("BF16").numpy else a
            for n, a in inputs[name].items()
        }
        np.savez(workdir / f"{name}.npz", **bits)  # type: ignore[arg-type]
    spec = {
        "contents_fields": {d.name: d.contents_field for d in DATATYPES.values()},
        "cases": {
            c.id: {
                "model": c.spec.name,
                "contents": c.contents,
                "transport": c.transport,
                "inputs": [
                    {"name": f"in_{dt}", "datatype": dt, "shape": list(c.spec.request_shape(dt))}
                    for dt in c.spec.datatypes
                ],
                "outputs": [f"out_{dt}" for dt in c.spec.datatypes],
            }
            for c in CASES
        },
    }
    report = run_triton_script(
        MATRIX_SCRIPT, matrix_server.address, str(workdir), json.dumps(spec), timeout=300
    )
    return Matrix(report, workdir, inputs, written)


@pytest.fixture(scope="module")
def expected(matrix: Matrix) -> dict[str, dict[str, np.ndarray]]:
    """Each model run by its own framework, on the inputs the client sent."""
    by_model = {c.spec.name: c.framework for c in CASES}
    return {name: fw.run(matrix.files[name], matrix.inputs[name]) for name, fw in by_model.items()}


def test_every_case_was_answered(matrix: Matrix) -> None:
    assert "stream_errors" not in matrix.report, matrix.report["stream_errors"]
    assert set(matrix.report) == {c.id for c in CASES}


def test_the_matrix_covers_every_datatype_of_every_framework() -> None:
    for fw in FRAMEWORKS:
        mine = [c for c in CASES if c.framework is fw]
        for dt in fw.datatypes:
            seen = {
                (c.spec.batched, c.contents, c.transport) for c in mine if dt in c.spec.datatypes
            }
            contents = ("raw", "typed") if DATATYPES[dt].contents_field else ("raw",)
            assert seen == {
                (b, k, t) for b in (False, True) for k in contents for t in ("unary", "stream")
            }, (fw.backend, dt)


def _load_output(matrix: Matrix, case: Case, name: str, datatype: str) -> np.ndarray:
    saved = case.id.replace("/", "-")
    array = np.load(matrix.workdir / f"out-{saved}.npz", allow_pickle=True)[name]
    return array.view(by_name("BF16").numpy) if datatype == "BF16" else array


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_tritonclient_gets_what_the_framework_computes(
    matrix: Matrix, expected: dict[str, dict[str, np.ndarray]], case: Case
) -> None:
    reply = matrix.report.get(case.id)
    assert reply is not None, f"no answer for {case.id}"
    assert "error" not in reply, reply["error"]
    assert (reply["model_name"], reply["model_version"], reply["id"]) == (
        case.spec.name,
        case.framework.backend,
        case.id,
    )
    assert list(reply["outputs"]) == [f"out_{dt}" for dt in case.spec.datatypes]
    for dt in case.spec.datatypes:
        name = f"out_{dt}"
        want = expected[case.spec.name][name]
        assert reply["outputs"][name] == {"datatype": dt, "shape": list(want.shape)}, name
        got = _load_output(matrix, case, name, dt)
        assert got.dtype == by_name(dt).numpy or (dt == "BYTES" and got.dtype == object), name
        if dt == "BYTES":
            assert list(got.reshape(-1)) == list(want.reshape(-1)), name
        else:
            # Bit for bit: the same framework on the same file and the same input.
            np.testing.assert_array_equal(
                got.view(f"u{got.itemsize}"), want.view(f"u{want.itemsize}"), err_msg=name
            )
