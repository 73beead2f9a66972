"""The ``remote`` backend: a front gateway serving models that run on a back gateway.

Two real ``tensorgate serve`` processes on loopback: the back serves ONNX models, the front
serves the same model names through ``remote`` variants pointing at the back. Plus the
backend on its own against an in-process OIP server (TLS, mutual TLS, error mapping), and
``remote.toml`` validation.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import ClassVar

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tensorgate.backends import BackendError, BackendOptions, BackendUnreachable, backend_class
from tensorgate.backends.base import BackendInputError
from tensorgate.backends.remote import RemoteBackend
from tensorgate.clients import Client, InferenceError
from tensorgate.protos import grpc_service_pb2 as pb
from tensorgate.protos import grpc_service_pb2_grpc as pb_grpc
from tensorgate.server.demo import build_mlp_onnx, mlp_reference, mlp_weights

from . import modelfactory as mf
from .serverproc import ServerProcess

# Talks gRPC: runs against both front ends (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("front_end")

RNG = np.random.default_rng(7)
# Remote variants wait on the network, not the CPU: several calls may be in flight at once.
FRONT_CONFIG = "[instances]\ncount = 4\n"


def build_back_repo(root: Path) -> Path:
    build_mlp_onnx(root / "scorer" / "onnx" / "model.onnx", mlp_weights())
    mf.build_identity_all_onnx(root / "identity" / "1" / "model.onnx")
    mf.build_identity_bf16_onnx(root / "bf16" / "1" / "model.onnx")
    mf.build_string_onnx(root / "strings" / "1" / "model.onnx")
    return root


def remote_toml(port: int, model: str, version: str = "", **extra: object) -> str:
    lines = [f'target = "127.0.0.1:{port}"', f'model = "{model}"', f'version = "{version}"']
    for key, value in extra.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        lines.append(f'{key} = "{value}"' if isinstance(value, str) else f"{key} = {text}")
    return "\n".join(lines) + "\n"


def write_remote_model(root: Path, name: str, toml: str, variant: str = "remote") -> Path:
    (root / name / variant).mkdir(parents=True, exist_ok=True)
    (root / name / "config.toml").write_text(FRONT_CONFIG)
    (root / name / variant / "remote.toml").write_text(toml)
    return root / name / variant / "remote.toml"


def build_front_repo(root: Path, back_port: int) -> Path:
    write_remote_model(root, "scorer", remote_toml(back_port, "scorer", "onnx"))
    write_remote_model(root, "identity", remote_toml(back_port, "identity"))
    write_remote_model(root, "bf16", remote_toml(back_port, "bf16", "1"))
    write_remote_model(root, "strings", remote_toml(back_port, "strings", channels=3))
    # Nothing listens on port 1: the variant must fail to load, with a reason.
    write_remote_model(root, "late", remote_toml(1, "scorer", "onnx", timeout_s=1))
    write_remote_model(root, "misspelt", remote_toml(back_port, "scorer") + "chanels = 2\n")
    return root


def start_on_port(repo: Path, workdir: Path, port: int, attempts: int = 40) -> ServerProcess:
    """Start a server on a given port, retrying while the port is still being released."""
    for _ in range(attempts):
        proc = ServerProcess(repo, workdir, "--port", str(port))
        try:
            return proc.start()
        except RuntimeError:
            proc.stop()
            time.sleep(0.5)
    raise AssertionError(f"no server could bind port {port}:\n{proc.log()}")


def x64(n: int) -> np.ndarray:
    return RNG.standard_normal((n, 64)).astype(np.float32)


@pytest.fixture(scope="module")
def back(front_end: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = build_back_repo(tmp_path_factory.mktemp("back") / "models")
    with ServerProcess(repo, tmp_path_factory.mktemp("back-run")) as proc:
        yield proc


@pytest.fixture(scope="module")
def front_repo(tmp_path_factory: pytest.TempPathFactory, back: ServerProcess) -> Path:
    return build_front_repo(tmp_path_factory.mktemp("front") / "models", back.grpc_port)


@pytest.fixture(scope="module")
def front(
    front_end: str, front_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    proc = ServerProcess(front_repo, tmp_path_factory.mktemp("front-run"))
    with proc:
        yield proc
    assert proc.proc is not None and proc.proc.returncode == 0, proc.log()


@pytest.fixture(scope="module")
def front_client(front: ServerProcess) -> Iterator[Client]:
    with Client(front.address) as c:
        yield c


@pytest.fixture(scope="module")
def back_client(back: ServerProcess) -> Iterator[Client]:
    with Client(back.address) as c:
        yield c


# -- two gateways -------------------------------------------------------------------------


def test_front_answers_exactly_what_the_back_answers(
    front_client: Client, back_client: Client
) -> None:
    x = x64(5)
    through = front_client.infer("scorer", {"input": x}, timeout=30)
    direct = back_client.infer("scorer", {"input": x}, version="onnx", timeout=30)
    assert through.variant == "remote" and through.model == "scorer"
    np.testing.assert_array_equal(through["output"], direct["output"])
    np.testing.assert_allclose(through["output"], mlp_reference(x, mlp_weights()), atol=1e-5)


def test_every_datatype_crosses_the_remote_hop(front_client: Client) -> None:
    import ml_dtypes

    values = {
        "BOOL": np.array([True, False, True]),
        "BYTES": np.array([b"a", b"", "\u00e9\u4e2d".encode()], dtype=object),
    }
    inputs = {}
    for dt in mf.IDENTITY_DATATYPES:
        from tensorgate.datatypes import by_name

        inputs[f"in_{dt}"] = values.get(dt, (np.arange(3) * 3 + 1).astype(by_name(dt).numpy))
    result = front_client.infer("identity", inputs, timeout=30)
    for dt in mf.IDENTITY_DATATYPES:
        got, want = result[f"out_{dt}"], inputs[f"in_{dt}"]
        assert got.dtype == want.dtype, dt
        np.testing.assert_array_equal(got, want)

    bf16 = np.array([1.5, -2.0, 0.0], dtype=ml_dtypes.bfloat16)
    result = front_client.infer("bf16", {"in_BF16": bf16, "in_FP32": bf16.astype(np.float32)})
    assert result["out_BF16"].dtype == bf16.dtype
    np.testing.assert_array_equal(result["out_BF16"], bf16)


def test_requested_outputs_and_strings_pass_through(front_client: Client) -> None:
    texts = np.array([b"hello", b"MiXed 1"], dtype=object)
    result = front_client.infer("strings", {"text": texts}, outputs=["upper"], timeout=30)
    assert [bytes(v) for v in result["upper"]] == [b"HELLO", b"MIXED 1"]
    only = front_client.infer("identity", _one_of_each(), outputs=["out_INT8"], timeout=30)
    assert list(only) == ["out_INT8"]


def _one_of_each() -> dict[str, np.ndarray]:
    from tensorgate.datatypes import by_name

    return {
        f"in_{dt}": np.array([b"x"], dtype=object)
        if dt == "BYTES"
        else np.ones(1, by_name(dt).numpy)
        for dt in mf.IDENTITY_DATATYPES
    }


def test_invalid_input_is_refused_at_the_front(front_client: Client) -> None:
    # Validated against the signature the front read from the back, before any hop.
    with pytest.raises(InferenceError) as info:
        front_client.infer("scorer", {"input": np.zeros((1, 63), np.float32)}, timeout=30)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_metadata_through_the_front_is_the_backs(front_client: Client, back_client: Client):
    front_meta = front_client.model_metadata("scorer", timeout=30)
    back_meta = back_client.model_metadata("scorer", timeout=30)
    assert front_meta["inputs"] == back_meta["inputs"]
    assert front_meta["outputs"] == back_meta["outputs"]
    assert front_meta["versions"] == ["remote"]


def test_remote_latency_is_in_the_per_backend_metrics(
    front: ServerProcess, front_client: Client
) -> None:
    for _ in range(3):
        front_client.infer("scorer", {"input": x64(1)}, timeout=30)
    samples = [
        s
        for family in text_string_to_metric_families(front.scrape())
        if family.name == "tensorgate_request_duration_seconds"
        for s in family.samples
        if s.name.endswith("_count")
    ]
    remote = {(s.labels["model"], s.labels["variant"]): s.value for s in samples}
    assert remote.get(("scorer", "remote"), 0) >= 3, samples
    assert all(s.labels["backend"] == "remote" for s in samples if s.labels["variant"] == "remote")


def test_bad_remote_toml_is_reported_with_file_and_field(front_client: Client) -> None:
    index = {(m["name"], m.get("version", "")): m for m in front_client.repository_index()}
    reason = index[("misspelt", "remote")]["reason"]
    assert "remote.toml" in reason and "chanels" in reason, reason


def test_unreachable_remote_fails_to_load_then_loads_on_request(
    front_client: Client, front_repo: Path, back: ServerProcess
) -> None:
    index = {(m["name"], m.get("version", "")): m for m in front_client.repository_index()}
    entry = index[("late", "remote")]
    assert entry["state"] == "UNAVAILABLE"
    assert "127.0.0.1:1" in entry["reason"] and "RepositoryModelLoad" in entry["reason"], entry
    assert not front_client.is_model_ready("late")

    # Once the remote is reachable, the repository load RPC brings the variant in.
    (front_repo / "late" / "remote" / "remote.toml").write_text(
        remote_toml(back.grpc_port, "scorer", "onnx")
    )
    front_client.load_model("late", timeout=60)
    x = x64(2)
    result = front_client.infer("late", {"input": x}, timeout=30)
    np.testing.assert_allclose(result["output"], mlp_reference(x, mlp_weights()), atol=1e-5)


# A front model with a remote variant backed up by a local copy of the same model.
HYBRID_CONFIG = """default_variant = "remote"

[instances]
count = 4

[routing]
fallback = ["onnx"]
"""


def _fallbacks(front: ServerProcess) -> dict[tuple[str, str, str], float]:
    return {
        (s.labels["from"], s.labels["to"], s.labels["reason"]): s.value
        for f in text_string_to_metric_families(front.scrape())
        if f.name == "tensorgate_fallbacks"
        for s in f.samples
        if s.labels.get("model") == "hybrid" and s.name.endswith("_total")
    }


def _until(call: Callable[[], object], done: Callable[[object], bool], what: str) -> object:
    """Call until ``done(result)``; UNAVAILABLE is the only error allowed meanwhile."""
    deadline = time.monotonic() + 60
    while True:
        try:
            result = call()
            if done(result):
                return result
        except InferenceError as e:
            assert e.code == grpc.StatusCode.UNAVAILABLE, e
            result = e
        assert time.monotonic() < deadline, f"{what}: still {result}"
        time.sleep(0.2)


def test_killing_the_back_gives_unavailable_and_the_front_recovers(tmp_path: Path) -> None:
    back_repo = build_back_repo(tmp_path / "back")
    back = ServerProcess(back_repo, tmp_path).start()
    port = back.grpc_port
    front_repo = build_front_repo(tmp_path / "front", port)
    write_remote_model(front_repo, "hybrid", remote_toml(port, "scorer", "onnx"))
    (front_repo / "hybrid" / "config.toml").write_text(HYBRID_CONFIG)
    build_mlp_onnx(front_repo / "hybrid" / "onnx" / "model.onnx", mlp_weights())
    x = x64(3)
    want = mlp_reference(x, mlp_weights())
    try:
        with ServerProcess(front_repo, tmp_path) as front, Client(front.address) as client:
            np.testing.assert_allclose(
                client.infer("scorer", {"input": x})["output"], want, atol=1e-5
            )
            assert client.infer("hybrid", {"input": x}).variant == "remote"

            back.kill()  # SIGKILL: no drain, the connections just die
            back.stop()
            with pytest.raises(InferenceError) as info:
                client.infer("scorer", {"input": x}, timeout=30)
            assert info.value.code == grpc.StatusCode.UNAVAILABLE, info.value
            message = info.value.message
            assert "scorer/remote" in message and f"127.0.0.1:{port}" in message, message
            assert "UNAVAILABLE" in message, message
            codes = {
                s.labels["code"]: s.value
                for f in text_string_to_metric_families(front.scrape())
                if f.name == "tensorgate_requests"
                for s in f.samples
                if s.labels.get("variant") == "remote" and s.labels.get("model") == "scorer"
            }
            assert codes.get("UNAVAILABLE", 0) >= 1, codes

            # With a fallback configured, the local variant answers instead.
            rescued = client.infer("hybrid", {"input": x}, timeout=30)
            assert rescued.variant == "onnx"
            np.testing.assert_allclose(rescued["output"], want, atol=1e-5)
            assert _fallbacks(front).get(("remote", "onnx", "unavailable"), 0) >= 1

            # The back returns on the same address: the front's channels reconnect by
            # themselves, no reload needed.
            back = start_on_port(back_repo, tmp_path, port)
            result = _until(
                lambda: client.infer("scorer", {"input": x}, timeout=30),
                lambda r: True,
                "the front did not recover",
            )
            np.testing.assert_allclose(result["output"], want, atol=1e-5)  # type: ignore[index]
            assert result.variant == "remote"  # type: ignore[attr-defined]
            _until(
                lambda: client.infer("hybrid", {"input": x}, timeout=30),
                lambda r: r.variant == "remote",  # type: ignore[attr-defined]
                "the remote variant did not take over again from its fallback",
            )
        assert front.proc is not None and front.proc.returncode == 0, front.log()
    finally:
        back.stop()


# -- the backend alone, against an in-process OIP server -----------------------------------


class EchoServicer(pb_grpc.GRPCInferenceServiceServicer):
    """A minimal non-tensorgate OIP server: model ``echo`` returns its BYTES input ``x`` as
    ``y``; the first element, when it names a status code, is answered with that error."""

    def ModelMetadata(self, request, context):
        if request.name != "echo":
            context.abort(grpc.StatusCode.NOT_FOUND, f"no model {request.name}")
        meta = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name="echo",
            versions=["7"],
            platform="fake_oip",
            inputs=[meta(name="x", datatype="BYTES", shape=[-1])],
            outputs=[meta(name="y", datatype="BYTES", shape=[-1])],
        )

    def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=request.name == "echo")

    #: time_remaining() of each ModelInfer call as the server saw it: the deadline sent.
    remaining: ClassVar[list[float | None]] = []

    def ModelInfer(self, request, context):
        EchoServicer.remaining.append(context.time_remaining())
        raw = request.raw_input_contents[0]
        first = raw[4 : 4 + int.from_bytes(raw[:4], "little")].decode()
        if first in grpc.StatusCode.__members__:
            context.abort(grpc.StatusCode[first], f"asked for {first}")
        reply = pb.ModelInferResponse(model_name="echo", model_version="7")
        reply.outputs.add(name="y", datatype="BYTES", shape=request.inputs[0].shape)
        reply.raw_output_contents.append(raw)
        return reply


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all from it."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make test certificates")
    d = tmp_path_factory.mktemp("certs")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=tensorgate test CA", cwd=d)  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for who in ("server", "client"):
        _openssl("req", *ec, "-keyout", f"{who}.key", "-out", f"{who}.csr",
                 "-subj", f"/CN={who}", cwd=d)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{who}.pem", "-days", "2",
                 "-extfile", "san.ext", cwd=d)  # fmt: skip
    return d


@pytest.fixture()
def echo_server() -> Iterator[Callable[..., int]]:
    servers: list[grpc.Server] = []

    def start(credentials: grpc.ServerCredentials | None = None) -> int:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(EchoServicer(), server)
        if credentials is None:
            port = server.add_insecure_port("127.0.0.1:0")
        else:
            port = server.add_secure_port("127.0.0.1:0", credentials)
        server.start()
        servers.append(server)
        return port

    yield start
    for server in servers:
        server.stop(None)


def load_remote(variant_dir: Path, toml: str) -> tuple[RemoteBackend, object]:
    variant_dir.mkdir(parents=True, exist_ok=True)
    (variant_dir / "remote.toml").write_text(toml)
    backend = RemoteBackend()
    path = RemoteBackend.find_model_file(variant_dir)
    assert path == variant_dir / "remote.toml"
    return backend, backend.load(path, BackendOptions(instances=2))


def test_remote_is_a_registered_backend_detected_by_its_file(tmp_path: Path) -> None:
    assert backend_class("remote") is RemoteBackend
    assert RemoteBackend.find_model_file(tmp_path) is None
    (tmp_path / "remote.toml").write_text('target = "h:1"\nmodel = "m"\n')
    from tensorgate.backends import detect

    assert detect(tmp_path) == (RemoteBackend, tmp_path / "remote.toml")


def test_the_callers_deadline_bounds_the_remote_call(
    echo_server: Callable[..., int], tmp_path: Path
) -> None:
    port = echo_server()
    backend, _ = load_remote(tmp_path / "v", remote_toml(port, "echo", "7"))
    try:
        x = np.array([b"a"], dtype=object)
        EchoServicer.remaining.clear()
        backend.infer({"x": x})  # no caller deadline: the variant's timeout_s
        backend.infer({"x": x}, deadline=time.monotonic() + 0.5)  # a caller with 0.5 s left
        own, callers = EchoServicer.remaining
        assert own is not None and own > 1.0
        assert callers is not None and callers <= 0.6  # (gRPC rounds deadlines up a little)
    finally:
        backend.unload()


def test_signature_platform_and_bytes_from_a_non_tensorgate_server(
    echo_server: Callable[..., int], tmp_path: Path
) -> None:
    port = echo_server()
    backend, signature = load_remote(tmp_path / "v", remote_toml(port, "echo", "7"))
    try:
        assert [(t.name, t.datatype, t.shape) for t in signature.inputs] == [("x", "BYTES", (-1,))]
        assert [(t.name, t.datatype, t.shape) for t in signature.outputs] == [("y", "BYTES", (-1,))]
        assert backend.remote_platform == backend.platform == "fake_oip"
        x = np.array([b"one", b"", b"\x00\xff"], dtype=object)
        for _ in range(4):  # every channel of the pool in turn
            out = backend.infer({"x": x})
            assert list(out["y"]) == list(x)
    finally:
        backend.unload()


@pytest.mark.parametrize(
    ("status", "error", "not_error"),
    [
        ("UNAVAILABLE", BackendUnreachable, BackendInputError),
        ("RESOURCE_EXHAUSTED", BackendUnreachable, BackendInputError),
        ("INVALID_ARGUMENT", BackendInputError, BackendUnreachable),
        ("INTERNAL", BackendError, (BackendUnreachable, BackendInputError)),
    ],
)
def test_remote_errors_map_to_what_the_caller_should_do(
    echo_server: Callable[..., int], tmp_path: Path, status: str, error: type, not_error
) -> None:
    backend, _ = load_remote(tmp_path / "v", remote_toml(echo_server(), "echo"))
    try:
        with pytest.raises(error) as info:
            backend.infer({"x": np.array([status.encode()], dtype=object)})
        assert not isinstance(info.value, not_error)
        assert f"asked for {status}" in str(info.value) and "model 'echo'" in str(info.value)
    finally:
        backend.unload()


def test_mutual_tls(echo_server: Callable[..., int], certs: Path, tmp_path: Path) -> None:
    credentials = grpc.ssl_server_credentials(
        [((certs / "server.key").read_bytes(), (certs / "server.pem").read_bytes())],
        root_certificates=(certs / "ca.pem").read_bytes(),
        require_client_auth=True,
    )
    port = echo_server(credentials)
    tls = f'tls = true\nca_file = "{certs / "ca.pem"}"\n'
    client_cert = f'cert_file = "{certs / "client.pem"}"\nkey_file = "{certs / "client.key"}"\n'
    backend, _ = load_remote(tmp_path / "ok", remote_toml(port, "echo") + tls + client_cert)
    try:
        assert backend.infer({"x": np.array([b"secret"], dtype=object)})["y"][0] == b"secret"
    finally:
        backend.unload()

    # Without a client certificate the server refuses the handshake; load says where.
    with pytest.raises(BackendError) as info:
        load_remote(tmp_path / "nocert", remote_toml(port, "echo", timeout_s=1) + tls)
    assert f"127.0.0.1:{port}" in str(info.value)
    # Nor is a plaintext client let in.
    with pytest.raises(BackendError):
        load_remote(tmp_path / "plain", remote_toml(port, "echo", timeout_s=1))


def test_tls_paths_are_relative_to_the_variant_directory(
    echo_server: Callable[..., int], certs: Path, tmp_path: Path
) -> None:
    credentials = grpc.ssl_server_credentials(
        [((certs / "server.key").read_bytes(), (certs / "server.pem").read_bytes())]
    )
    port = echo_server(credentials)
    variant = tmp_path / "v"
    variant.mkdir()
    shutil.copy(certs / "ca.pem", variant / "ca.pem")
    backend, _ = load_remote(
        variant, remote_toml(port, "echo") + 'tls = true\nca_file = "ca.pem"\n'
    )
    backend.unload()


@pytest.mark.parametrize(
    ("toml", "fragments"),
    [
        ('model = "m"\n', ["field 'target'", "missing"]),
        ('target = "h:1"\nmodel = "m"\ntimeout = 3\n', ["field 'timeout'", "unknown field"]),
        ('target = "h:1"\nmodel = "m"\ntimeout_s = 0\n', ["field 'timeout_s'"]),
        ('target = "h:1"\nmodel = "m"\nchannels = 0\n', ["field 'channels'"]),
        ('target = "h:1"\nmodel = ""\n', ["field 'model'", "empty"]),
        ('target = "h:1"\nmodel = "m"\nca_file = "ca.pem"\n', ["'ca_file'", "tls = true"]),
        (
            'target = "h:1"\nmodel = "m"\ntls = true\ncert_file = "c.pem"\n',
            ["'cert_file' and 'key_file'"],
        ),
        ('target = "h:1"\nmodel = "m"\ntls = true\nca_file = "nope.pem"\n', ["'ca_file'", "nope"]),
        ("target = \n", ["not valid TOML"]),
    ],
)
def test_remote_toml_errors_name_the_file_and_the_field(
    tmp_path: Path, toml: str, fragments: list[str]
) -> None:
    (tmp_path / "remote.toml").write_text(toml)
    with pytest.raises(BackendError) as info:
        RemoteBackend().load(tmp_path / "remote.toml", BackendOptions())
    message = str(info.value)
    assert str(tmp_path / "remote.toml") in message, message
    for fragment in fragments:
        assert fragment in message, message
