"""Operations without restarts, through real servers, real signals and real files: tokens and
certificates rotated in place (SIGHUP and file changes, one process and ``--workers``), a
hung isolated worker killed at ``execution_timeout_s``, ServerReady and ``--require-models``,
``/metrics`` behind TLS and a bearer token, and a variant directory named ``0`` in
ModelStatistics."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tensorgate.codec import decode_response, encode_request
from tensorgate.errors import ConfigError
from tensorgate.protos import grpc_service_pb2 as pb
from tensorgate.protos import grpc_service_pb2_grpc as pb_grpc
from tensorgate.server.auth import TokenPolicy
from tensorgate.server.config import load_model_config
from tensorgate.server.demo import build_mlp_onnx, mlp_reference, mlp_weights
from tensorgate.server.servicer import WORKER_METADATA_KEY

from .serverproc import ServerProcess, wait_until
from .slowmodel import build_slow_onnx, slow_inputs
from .test_reliability import replace_file, x64
from .test_security import _issue

# Talks gRPC: runs against both front ends (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("front_end")

OLD_TOKEN = "old-token-0123456789"
NEW_TOKEN = "new-token-9876543210"
METRICS_TOKEN = "scrape-token-4242"


# -- certificates: one CA, two server certificates it signed, client certificates of two CAs --


@dataclass
class Certs:
    dir: Path
    ca: Path  # signs both server certificates and the "client" one
    other_ca: Path  # signs "other-client"

    def pair(self, stem: str) -> tuple[Path, Path]:
        return self.dir / f"{stem}.crt", self.dir / f"{stem}.key"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    d = tmp_path_factory.mktemp("op-certs")
    ca = _issue(d, "ca", "operations CA", None, ca=True, server=False)
    _issue(d, "server-a", "127.0.0.1", ca, ca=False, server=True)
    _issue(d, "server-b", "127.0.0.1", ca, ca=False, server=True)
    _issue(d, "client", "client", ca, ca=False, server=False)
    other = _issue(d, "other-ca", "other CA", None, ca=True, server=False)
    _issue(d, "other-client", "other client", other, ca=False, server=False)
    return Certs(d, d / "ca.crt", d / "other-ca.crt")


def install(source: Path, target: Path) -> None:
    """Put ``source``'s contents at ``target`` as deploy tools do: write beside, rename over."""
    replace_file(target, lambda tmp: shutil.copyfile(source, tmp))


def write_text(target: Path, text: str) -> None:
    replace_file(target, lambda tmp: tmp.write_text(text))


def served_certificate(address: str, ca: Path) -> bytes:
    """The DER certificate a new TLS connection to ``address`` is shown."""
    host, port = address.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def der_of(pem: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.read_text())


def channel(address: str, ca: Path, client: tuple[Path, Path] | None = None) -> grpc.Channel:
    """A new TLS channel with a connection of its own."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=client[1].read_bytes() if client else None,
        certificate_chain=client[0].read_bytes() if client else None,
    )
    options = [("grpc.use_local_subchannel_pool", 1)]
    return grpc.secure_channel(address, credentials, options=options)


def infer_code(ch: grpc.Channel, token: str | None, rows: int = 2, seed: int = 0):
    """ModelInfer of the mlp over ``ch``: (status code, worker index or None). A reply is
    checked against the reference."""
    x = x64(rows, seed)
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    try:
        reply, call = pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer.with_call(
            encode_request("mlp", {"input": x}), timeout=30, metadata=metadata
        )
    except grpc.RpcError as e:
        return e.code(), None  # type: ignore[attr-defined]
    out = decode_response(reply)["output"]
    np.testing.assert_allclose(out, mlp_reference(x, mlp_weights()), atol=1e-5)
    return grpc.StatusCode.OK, dict(call.trailing_metadata() or ()).get(WORKER_METADATA_KEY)


def model_ready(ch: grpc.Channel, token: str, model: str = "mlp") -> bool:
    return (
        pb_grpc.GRPCInferenceServiceStub(ch)
        .ModelReady(
            pb.ModelReadyRequest(name=model),
            timeout=10,
            metadata=(("authorization", f"Bearer {token}"),),
        )
        .ready
    )


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("operations") / "models"
    build_mlp_onnx(root / "mlp" / "1" / "model.onnx", mlp_weights())
    build_slow_onnx(root / "slow" / "1" / "model.onnx")
    return root


# -- rotating credentials ------------------------------------------------------------------


@dataclass
class TokenLoad:
    """Caller threads that infer in a loop, each opening a new TLS connection every few
    calls, with the token in ``token`` when each call starts; every call is recorded as
    (started, token, code)."""

    address: str
    ca: Path
    threads: int = 4
    token: str = OLD_TOKEN
    calls: list[tuple[float, str, grpc.StatusCode]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _run(self, index: int) -> None:
        while not self.stop.is_set():
            with channel(self.address, self.ca) as ch:
                for i in range(5):
                    token, started = self.token, time.monotonic()
                    code, _ = infer_code(ch, token, seed=index * 1000 + i)
                    with self.lock:
                        self.calls.append((started, token, code))

    def count(self, token: str, after: float = 0.0) -> int:
        with self.lock:
            return sum(1 for t, k, c in self.calls if k == token and t >= after and c.value[0] == 0)

    def __enter__(self) -> TokenLoad:
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(self.threads)]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(120)


def test_rotate_token_and_certificate_under_load(repo: Path, certs: Certs, tmp_path: Path) -> None:
    token_file, cert, key = tmp_path / "token", tmp_path / "server.crt", tmp_path / "server.key"
    write_text(token_file, OLD_TOKEN + "\n")
    a_cert, a_key = certs.pair("server-a")
    b_cert, b_key = certs.pair("server-b")
    install(a_cert, cert)
    install(a_key, key)
    args = ("--auth-token-file", str(token_file), "--tls-cert", str(cert), "--tls-key", str(key))
    with ServerProcess(repo, tmp_path, *args) as server:
        pid = server.proc.pid  # type: ignore[union-attr]
        assert served_certificate(server.address, certs.ca) == der_of(a_cert)
        with channel(server.address, certs.ca) as kept, TokenLoad(server.address, certs.ca) as load:
            assert infer_code(kept, OLD_TOKEN)[0] == grpc.StatusCode.OK  # connected before
            wait_until(lambda: load.count(OLD_TOKEN) >= 40, 60, "calls before the rotation")
            # A call in flight across the rotation: it was accepted, so it finishes.
            slow: dict[str, object] = {}

            def slow_call() -> None:
                stub = pb_grpc.GRPCInferenceServiceStub(kept)
                metadata = (("authorization", f"Bearer {OLD_TOKEN}"),)
                try:
                    stub.ModelInfer(
                        encode_request("slow", slow_inputs(64, 3000)), timeout=60, metadata=metadata
                    )
                    slow["code"] = grpc.StatusCode.OK
                except grpc.RpcError as e:
                    slow["code"] = e.code()  # type: ignore[attr-defined]

            in_flight = threading.Thread(target=slow_call)
            in_flight.start()
            time.sleep(0.2)
            written = time.monotonic()
            install(b_key, key)
            install(b_cert, cert)
            write_text(token_file, NEW_TOKEN + "\n")

            def new_token_accepted() -> bool:
                with channel(server.address, certs.ca) as ch:
                    return infer_code(ch, NEW_TOKEN)[0] == grpc.StatusCode.OK

            wait_until(new_token_accepted, 30, "the new token to be accepted", every=0.02)
            load.token = NEW_TOKEN
            switched = time.monotonic()
            wait_until(
                lambda: served_certificate(server.address, certs.ca) == der_of(b_cert),
                30,
                "new connections to get the new certificate",
            )
            wait_until(lambda: load.count(NEW_TOKEN, switched) >= 40, 60, "calls after it")
            in_flight.join(60)
            # The connection made before the rotation still serves (with the new token).
            assert infer_code(kept, NEW_TOKEN)[0] == grpc.StatusCode.OK
            assert infer_code(kept, OLD_TOKEN)[0] == grpc.StatusCode.UNAUTHENTICATED
        assert slow.get("code") == grpc.StatusCode.OK, slow
        # No call failed that carried the token in force when it was made: refusals are of
        # the old token only, and only for calls made after the new one was written.
        failed = [(t, k, c) for t, k, c in load.calls if c != grpc.StatusCode.OK]
        assert all(
            k == OLD_TOKEN and t >= written and c == grpc.StatusCode.UNAUTHENTICATED
            for t, k, c in failed
        ), failed[:5]
        assert load.count(OLD_TOKEN) > 0 and load.count(NEW_TOKEN, switched) >= 40
        assert not [c for t, k, c in load.calls if k == NEW_TOKEN and c != grpc.StatusCode.OK]
        with channel(server.address, certs.ca) as ch:
            assert infer_code(ch, OLD_TOKEN)[0] == grpc.StatusCode.UNAUTHENTICATED
            assert infer_code(ch, NEW_TOKEN)[0] == grpc.StatusCode.OK
            assert model_ready(ch, NEW_TOKEN) and model_ready(ch, NEW_TOKEN, "slow")
        assert server.proc is not None and server.proc.pid == pid and server.proc.poll() is None
        log = server.log()
        assert f"tokens reloaded from {token_file}" in log
        assert f"TLS certificate reloaded from {cert}" in log
        assert log.count("model mlp ready") == 1  # loaded once: nothing restarted
    assert server.proc.returncode == 0, server.log()


def test_files_that_do_not_parse_keep_the_credentials_and_sighup_rereads(
    repo: Path, certs: Certs, tmp_path: Path
) -> None:
    token_file, cert, key = tmp_path / "token", tmp_path / "server.crt", tmp_path / "server.key"
    write_text(token_file, OLD_TOKEN)
    a_cert, a_key = certs.pair("server-a")
    install(a_cert, cert)
    install(a_key, key)
    args = ("--auth-token-file", str(token_file), "--tls-cert", str(cert), "--tls-key", str(key))
    with ServerProcess(repo, tmp_path, *args) as server:
        write_text(token_file, "   \n")  # empty
        write_text(cert, "-----BEGIN CERTIFICATE-----\nnot base64 at all\n")  # cut short
        empty = f"--auth-token-file file {token_file} is empty; keeping the tokens in use"
        broken = f"--tls-cert {cert} and --tls-key {key} cannot be used together"
        wait_until(lambda: empty in server.log() and broken in server.log(), 30, "the errors")
        with channel(server.address, certs.ca) as ch:  # a new connection, the old credentials
            assert infer_code(ch, OLD_TOKEN)[0] == grpc.StatusCode.OK
        assert served_certificate(server.address, certs.ca) == der_of(a_cert)
        # A key that is not the certificate's: refused too.
        install(a_cert, cert)
        install(certs.pair("server-b")[1], key)
        wait_until(lambda: server.log().count(broken) >= 2, 30, "the mismatch to be refused")
        assert served_certificate(server.address, certs.ca) == der_of(a_cert)
        # SIGHUP re-reads every file at once, even unchanged ones: the errors come again.
        errors = server.log().count(empty)
        os.kill(server.proc.pid, signal.SIGHUP)  # type: ignore[union-attr]
        wait_until(lambda: server.log().count(empty) > errors, 30, "SIGHUP to re-read the files")
        with channel(server.address, certs.ca) as ch:
            assert infer_code(ch, OLD_TOKEN)[0] == grpc.StatusCode.OK
        # Good files again: taken.
        b_cert = certs.pair("server-b")[0]
        install(b_cert, cert)
        write_text(token_file, NEW_TOKEN)
        wait_until(
            lambda: served_certificate(server.address, certs.ca) == der_of(b_cert),
            30,
            "the good pair to be taken",
        )
        with channel(server.address, certs.ca) as ch:
            wait_until(lambda: infer_code(ch, NEW_TOKEN)[0] == grpc.StatusCode.OK, 30, "new token")
    assert server.proc is not None and server.proc.returncode == 0, server.log()


def test_rotate_the_client_ca(repo: Path, certs: Certs, tmp_path: Path) -> None:
    client_ca = tmp_path / "client-ca.crt"
    install(certs.ca, client_ca)
    cert, key = certs.pair("server-a")
    args = ("--tls-cert", str(cert), "--tls-key", str(key), "--tls-client-ca", str(client_ca))
    ours, theirs = certs.pair("client"), certs.pair("other-client")
    with ServerProcess(repo, tmp_path, *args) as server:
        with channel(server.address, certs.ca, ours) as ch:
            assert infer_code(ch, None)[0] == grpc.StatusCode.OK
        with channel(server.address, certs.ca, theirs) as ch:
            assert infer_code(ch, None)[0] == grpc.StatusCode.UNAVAILABLE
        with channel(server.address, certs.ca, ours) as kept:
            assert infer_code(kept, None)[0] == grpc.StatusCode.OK
            install(certs.other_ca, client_ca)

            def other_ca_trusted() -> bool:
                with channel(server.address, certs.ca, theirs) as ch:
                    return infer_code(ch, None)[0] == grpc.StatusCode.OK

            wait_until(other_ca_trusted, 30, "clients of the new CA to be accepted")
            with channel(server.address, certs.ca, ours) as ch:  # new connection: refused
                assert infer_code(ch, None)[0] == grpc.StatusCode.UNAVAILABLE
            # The connection made before goes on: its handshake was done.
            assert infer_code(kept, None)[0] == grpc.StatusCode.OK
    assert server.proc is not None and server.proc.returncode == 0, server.log()


def scrape(url: str, token: str | None = None, ca: Path | None = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    context = ssl.create_default_context(cafile=str(ca)) if ca else None
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=10, context=context
        ) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("WWW-Authenticate", "")


def test_workers_follow_rotation_and_sighup(repo: Path, tmp_path: Path) -> None:
    token_file, metrics_token = tmp_path / "token", tmp_path / "metrics-token"
    write_text(token_file, OLD_TOKEN)
    write_text(metrics_token, METRICS_TOKEN)
    args = (
        "--workers", "2", "--auth-token-file", str(token_file),
        "--metrics-token-file", str(metrics_token),
    )  # fmt: skip
    with ServerProcess(repo, tmp_path, *args) as server:
        pid = server.proc.pid  # type: ignore[union-attr]
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        assert scrape(url)[0] == 401
        status, text = scrape(url, METRICS_TOKEN)
        assert status == 200 and "tensorgate_workers 2.0" in text
        write_text(token_file, NEW_TOKEN)

        def every_worker(token: str, code: grpc.StatusCode) -> set[str]:
            """Workers that answered ``code`` to ``token`` over 12 new connections."""
            seen: set[str] = set()
            for i in range(12):
                with grpc.insecure_channel(
                    server.address, options=[("grpc.use_local_subchannel_pool", 1)]
                ) as ch:
                    got, worker = infer_code(ch, token, seed=i)
                    if got != code:
                        return set()
                    seen.add(worker or "")
            return seen

        wait_until(lambda: every_worker(NEW_TOKEN, grpc.StatusCode.OK) == {"0", "1"}, 60, "both")
        assert every_worker(OLD_TOKEN, grpc.StatusCode.UNAUTHENTICATED)
        # SIGHUP to the supervisor reaches every worker: each re-reads (and refuses) the file.
        write_text(token_file, "")
        for w in ("0", "1"):
            wait_until(lambda w=w: f"[worker {w}]" in _errors(server, token_file), 30, "errors")
        before = _errors(server, token_file).count("[worker")
        os.kill(pid, signal.SIGHUP)
        wait_until(lambda: _errors(server, token_file).count("[worker") >= before + 2, 30, "SIGHUP")
        assert every_worker(NEW_TOKEN, grpc.StatusCode.OK) == {"0", "1"}
        write_text(metrics_token, "rotated-scrape-token")
        wait_until(lambda: scrape(url, "rotated-scrape-token")[0] == 200, 30, "metrics token")
        assert scrape(url, METRICS_TOKEN)[0] == 401
        assert server.proc is not None and server.proc.pid == pid
    assert server.proc.returncode == 0, server.log()


def _errors(server: ServerProcess, token_file: Path) -> str:
    needle = f"--auth-token-file file {token_file} is empty"
    return "\n".join(line for line in server.log().splitlines() if needle in line)


# -- one server: readiness, /metrics over TLS with a token, hung workers, version 0 ---------------

HANG_CONFIG = """isolation = "process"
execution_timeout_s = 1
"""


@pytest.fixture(scope="module")
def ops_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ops") / "models"
    build_mlp_onnx(root / "mlp" / "1" / "model.onnx", mlp_weights())
    build_slow_onnx(root / "hang" / "1" / "model.onnx")
    (root / "hang" / "config.toml").write_text(HANG_CONFIG)
    # execution_timeout_s on a variant in the gateway process: refused, saying why.
    build_mlp_onnx(root / "inproc" / "1" / "model.onnx", mlp_weights())
    (root / "inproc" / "config.toml").write_text("execution_timeout_s = 1\n")
    # A variant directory "0" next to named variants.
    for variant in ("0", "1", "onnx", "other"):
        build_mlp_onnx(root / "zero" / variant / "model.onnx", mlp_weights())
    return root


REQUIRED = 10  # more models than the repository has


@pytest.fixture(scope="module")
def ops_server(
    front_end: str, ops_repo: Path, certs: Certs, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    workdir = tmp_path_factory.mktemp("ops-server")
    write_text(workdir / "metrics-token", METRICS_TOKEN)
    cert, key = certs.pair("server-a")
    args = (
        "--require-models", str(REQUIRED),
        "--metrics-tls-cert", str(cert), "--metrics-tls-key", str(key),
        "--metrics-token-file", str(workdir / "metrics-token"),
    )  # fmt: skip
    with ServerProcess(ops_repo, workdir, *args) as proc:
        yield proc
    assert proc.proc is not None and proc.proc.returncode == 0, proc.log()


@pytest.fixture(scope="module")
def stub(ops_server: ServerProcess) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    with grpc.insecure_channel(ops_server.address, options=options) as ch:
        yield pb_grpc.GRPCInferenceServiceStub(ch)


def test_server_ready_follows_require_models(
    ops_server: ServerProcess, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    with grpc.insecure_channel(ops_server.address) as ch:
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready is False
    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live is True
    assert stub.ModelReady(pb.ModelReadyRequest(name="mlp"), timeout=10).ready  # models serve


def test_server_ready_with_enough_models(ops_repo: Path, tmp_path: Path) -> None:
    args = ("--require-models", "3", "--metrics-port", "-1")
    with ServerProcess(ops_repo, tmp_path, *args) as s, grpc.insecure_channel(s.address) as ch:
        ready = pb_grpc.GRPCInferenceServiceStub(ch).ServerReady(pb.ServerReadyRequest())
        assert ready.ready is True  # mlp, hang and zero load; inproc does not
    assert s.proc is not None and s.proc.returncode == 0, s.log()


def test_metrics_need_the_token_and_speak_tls(ops_server: ServerProcess, certs: Certs) -> None:
    https = f"https://127.0.0.1:{ops_server.metrics_port}/metrics"
    assert scrape(https, ca=certs.ca) == (401, 'Bearer realm="tensorgate metrics"')
    assert scrape(https, "wrong-token", ca=certs.ca)[0] == 401
    status, text = scrape(https, METRICS_TOKEN, ca=certs.ca)
    assert status == 200 and 'tensorgate_model_ready{backend="onnxruntime",model="mlp"' in text
    # Plain HTTP to the TLS port gets no metrics.
    with pytest.raises((urllib.error.URLError, ConnectionError, http_errors())):
        scrape(f"http://127.0.0.1:{ops_server.metrics_port}/metrics", METRICS_TOKEN)


def http_errors() -> type[Exception]:
    from http.client import HTTPException

    return HTTPException


def test_hung_isolated_worker_is_killed_and_restarted(
    ops_server: ServerProcess, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    def hang_pid() -> int | None:
        return next((p for p, c in ops_server.children().items() if "hang/1" in c), None)

    small = encode_request("hang", slow_inputs(1, 10))
    stub.ModelInfer(small, timeout=30)
    old = hang_pid()
    assert old is not None
    stop = threading.Event()
    other: list[grpc.StatusCode] = []

    def other_model() -> None:  # the rest of the server never notices
        with grpc.insecure_channel(ops_server.address) as ch:
            while not stop.is_set():
                other.append(infer_code(ch, None)[0])

    caller = threading.Thread(target=other_model)
    caller.start()
    try:
        # Seconds of compute on a large input: its worker is killed at 1 s.
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(encode_request("hang", slow_inputs(4096, 2000)), timeout=120)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
        details = info.value.details()  # type: ignore[attr-defined]
        assert "an execution ran longer than execution_timeout_s = 1 s" in details, details
        assert f"worker process {old} of hang/1 killed" in details
        # A small request succeeds once the worker is back (the restart backoff first).
        reply = wait_until(lambda: _try(stub, small), 60, "the restarted worker to serve")
        assert decode_response(reply)["y"].shape == (1, 256)
        assert hang_pid() not in (None, old)
        # A caller whose own deadline passes first gets DEADLINE_EXCEEDED; the worker is
        # killed all the same when the execution reaches the limit.
        restarted = hang_pid()
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(encode_request("hang", slow_inputs(4096, 2000)), timeout=0.3)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
        wait_until(lambda: f"worker process {restarted} of hang/1 killed" in ops_server.log(), 30)
        wait_until(lambda: _try(stub, small), 60, "the worker to serve again")
    finally:
        stop.set()
        caller.join(60)
    assert other and set(other) == {grpc.StatusCode.OK}, set(other)


def _try(stub: pb_grpc.GRPCInferenceServiceStub, request: pb.ModelInferRequest):
    try:
        return stub.ModelInfer(request, timeout=30)
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.UNAVAILABLE, e  # type: ignore[attr-defined]
        return None


def test_execution_timeout_needs_isolation(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10)
    (entry,) = [m for m in index.models if m.name == "inproc"]
    assert entry.state == "UNAVAILABLE"
    assert "execution_timeout_s applies to isolated variants only" in entry.reason, entry.reason
    assert 'set isolation = "process"' in entry.reason


def test_variant_zero_and_named_variants_have_their_own_statistics(
    stub: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    for version, times in (("0", 1), ("1", 2), ("onnx", 3), ("other", 4)):
        for _ in range(times):
            stub.ModelInfer(encode_request("zero", {"input": x64(1)}, version=version), timeout=30)
    stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="zero"), timeout=10).model_stats
    counts = {s.version: s.inference_count for s in stats}
    # "0" is the directory; the named variants are summed under the next free integer.
    assert counts == {"0": 1, "1": 2, "2": 3 + 4}, counts
    pinned = stub.ModelStatistics(pb.ModelStatisticsRequest(name="zero", version="0"), timeout=10)
    assert [(s.version, s.inference_count) for s in pinned.model_stats] == [("0", 1)]


@pytest.mark.parametrize("broken", ["token", "cert"])
def test_serve_refuses_unusable_metrics_credentials(
    repo: Path, certs: Certs, tmp_path: Path, broken: str
) -> None:
    cert, key = certs.pair("server-a")
    token = tmp_path / "metrics-token"
    token.write_text("" if broken == "token" else METRICS_TOKEN)
    if broken == "cert":
        cert = tmp_path / "cut.crt"
        cert.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n")
    done = subprocess.run(
        [sys.executable, "-m", "tensorgate.server.cli", "serve", "-r", str(repo),
         "--port", "0", "--metrics-port", "0", "--metrics-token-file", str(token),
         "--metrics-tls-cert", str(cert), "--metrics-tls-key", str(key)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    expected = (
        f"--metrics-token-file file {token} is empty"
        if broken == "token"
        else f"--metrics-tls-cert {cert} / --metrics-tls-key {key} cannot be used"
    )
    assert expected in " ".join(done.stderr.split()), done.stderr


@pytest.mark.parametrize(
    ("toml", "error"),
    [
        ('isolation = "process"\nexecution_timeout_s = 2\n', None),
        ('[variants.a]\nisolation = "process"\nexecution_timeout_s = 2\n', None),
        ('execution_timeout_s = 2\n[variants.a]\nisolation = "process"\n', None),
        ('isolation = "process"\n[variants.a]\nexecution_timeout_s = 2\n', None),
        ("execution_timeout_s = 2\n", "execution_timeout_s applies to isolated variants only"),
        (
            '[variants.a]\nisolation = "none"\nexecution_timeout_s = 2\n',
            r"\[variants.a\] execution_timeout_s applies to isolated variants only",
        ),
        ('isolation = "process"\nexecution_timeout_s = 0\n', "greater than 0"),
        ("[warmup]\ntimeout_s = 0\n", "greater than 0"),
    ],
)
def test_timeout_keys_in_config(tmp_path: Path, toml: str, error: str | None) -> None:
    (tmp_path / "config.toml").write_text(toml)
    if error is None:
        load_model_config(tmp_path)
        return
    with pytest.raises(ConfigError, match=error) as info:
        load_model_config(tmp_path)
    assert str(tmp_path / "config.toml") in str(info.value)


def test_token_policy_is_replaced_in_place() -> None:
    policy = TokenPolicy(OLD_TOKEN)
    infer = "/inference.GRPCInferenceService/ModelInfer"
    copied: list[tuple[str, str] | None] = []  # what a holder that copies the token sees
    policy.on_replace(lambda: copied.append(policy.required(infer)))
    policy.replace(TokenPolicy(NEW_TOKEN, "admin"))
    assert policy.required(infer) == (NEW_TOKEN, "token")
    assert policy.required("/inference.GRPCInferenceService/RepositoryIndex") == (
        "admin",
        "admin token",
    )
    assert copied == [(NEW_TOKEN, "token")]
    assert OLD_TOKEN not in repr(policy) and NEW_TOKEN not in repr(policy)
