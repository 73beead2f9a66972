"""TLS, mutual TLS, bearer tokens and repository path checks, through real servers.

Certificates are made here, per test session, with ``cryptography``: a CA, a server
certificate for 127.0.0.1 it signed, a client certificate it signed, and a second CA with a
client certificate that the server must refuse.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tensorgate.clients import Client, InferenceError
from tensorgate.codec import encode_request
from tensorgate.protos import admin_pb2, admin_pb2_grpc
from tensorgate.protos import grpc_service_pb2_grpc as pb_grpc
from tensorgate.server.demo import build_mlp_onnx, mlp_reference, mlp_weights

from .serverproc import ServerProcess

# Talks gRPC: runs against both front ends (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("front_end")

INFERENCE_TOKEN = "inference-secret-0123456789"
ADMIN_TOKEN = "admin-secret-9876543210"


# -- certificates ----------------------------------------------------------------------------


@dataclass
class Pem:
    cert: Path
    key: Path


def _name(cn: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(directory: Path, stem: str, cn: str, issuer: tuple | None, *, ca: bool, server: bool):
    """Write STEM.crt and STEM.key; returns (certificate, key) for signing others."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    issuer_cert, issuer_key = issuer if issuer is not None else (None, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer_cert.subject if issuer_cert is not None else _name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    cert = builder.sign(issuer_key, hashes.SHA256())
    (directory / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / f"{stem}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert, key


@dataclass
class Certificates:
    ca: Path
    server: Pem
    client: Pem
    rogue_client: Pem  # signed by a CA the server does not trust


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    d = tmp_path_factory.mktemp("certs")
    ca = _issue(d, "ca", "tensorgate test CA", None, ca=True, server=False)
    _issue(d, "server", "127.0.0.1", ca, ca=False, server=True)
    _issue(d, "client", "test client", ca, ca=False, server=False)
    rogue = _issue(d, "rogue-ca", "rogue CA", None, ca=True, server=False)
    _issue(d, "rogue-client", "rogue client", rogue, ca=False, server=False)

    def pem(stem: str) -> Pem:
        return Pem(d / f"{stem}.crt", d / f"{stem}.key")

    return Certificates(d / "ca.crt", pem("server"), pem("client"), pem("rogue-client"))


# -- the repository: one model, and links that try to leave the root ---------------------------


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("security")
    root = base / "models"
    build_mlp_onnx(root / "mlp" / "1" / "model.onnx", mlp_weights())
    # Outside the root: a perfectly good model that no link may reach.
    build_mlp_onnx(base / "outside" / "1" / "model.onnx", mlp_weights())
    (root / "escape").symlink_to(base / "outside", target_is_directory=True)
    (root / "escvariant").mkdir()
    (root / "escvariant" / "1").symlink_to(base / "outside" / "1", target_is_directory=True)
    (root / "escfile" / "1").mkdir(parents=True)
    (root / "escfile" / "1" / "model.onnx").symlink_to(base / "outside" / "1" / "model.onnx")
    # Links that stay inside the root are fine: version 2 is version 1's files.
    build_mlp_onnx(root / "linked" / "1" / "model.onnx", mlp_weights())
    (root / "linked" / "2").symlink_to(Path("1"), target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def tls_server(
    repo: Path, certs: Certificates, tmp_path_factory: pytest.TempPathFactory, front_end: str
) -> Iterator[ServerProcess]:
    """TLS (no client certificates) with an inference token and a separate admin token."""
    workdir = tmp_path_factory.mktemp("tls-server")
    (workdir / "token").write_text(INFERENCE_TOKEN + "\n")
    (workdir / "admin-token").write_text(ADMIN_TOKEN)
    args = (
        "--tls-cert", str(certs.server.cert), "--tls-key", str(certs.server.key),
        "--auth-token-file", str(workdir / "token"),
        "--admin-token-file", str(workdir / "admin-token"),
    )  # fmt: skip
    with ServerProcess(repo, workdir, *args) as proc:
        yield proc
    assert proc.proc is not None and proc.proc.returncode == 0, proc.log()


@pytest.fixture(scope="module")
def mtls_server(
    repo: Path, certs: Certificates, tmp_path_factory: pytest.TempPathFactory, front_end: str
) -> Iterator[ServerProcess]:
    """Mutual TLS; the inference token comes from the environment, no admin token."""
    args = (
        "--tls-cert", str(certs.server.cert), "--tls-key", str(certs.server.key),
        "--tls-client-ca", str(certs.ca),
    )  # fmt: skip
    env = {"TENSORGATE_AUTH_TOKEN": INFERENCE_TOKEN}
    with ServerProcess(repo, tmp_path_factory.mktemp("mtls-server"), *args, env=env) as proc:
        yield proc
    assert proc.proc is not None and proc.proc.returncode == 0, proc.log()


def x64(n: int = 2) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((n, 64)).astype(np.float32)


def infer_code(client: Client) -> grpc.StatusCode:
    try:
        result = client.infer("mlp", {"input": x64()}, timeout=10)
    except InferenceError as e:
        return e.code
    np.testing.assert_allclose(result["output"], mlp_reference(x64(), mlp_weights()), atol=1e-5)
    return grpc.StatusCode.OK


def refusal(call) -> InferenceError:
    with pytest.raises(InferenceError) as info:
        call()
    return info.value


# -- TLS -------------------------------------------------------------------------------------


def test_tls_with_token_serves(tls_server: ServerProcess, certs: Certificates) -> None:
    with Client(tls_server.address, tls_ca=certs.ca, token=INFERENCE_TOKEN) as client:
        assert infer_code(client) == grpc.StatusCode.OK


def test_plaintext_client_cannot_talk_to_a_tls_port(tls_server: ServerProcess) -> None:
    with Client(tls_server.address, token=INFERENCE_TOKEN) as client:
        assert infer_code(client) == grpc.StatusCode.UNAVAILABLE


def test_client_that_does_not_trust_the_server_is_refused(
    tls_server: ServerProcess, certs: Certificates
) -> None:
    # The rogue client certificate is no CA for the server's certificate.
    with Client(tls_server.address, tls_ca=certs.rogue_client.cert, token=INFERENCE_TOKEN) as c:
        assert infer_code(c) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_needs_a_client_certificate_the_ca_signed(
    mtls_server: ServerProcess, certs: Certificates
) -> None:
    good = {"tls_cert": certs.client.cert, "tls_key": certs.client.key}
    rogue = {"tls_cert": certs.rogue_client.cert, "tls_key": certs.rogue_client.key}
    address, ca = mtls_server.address, certs.ca
    with Client(address, tls_ca=ca, token=INFERENCE_TOKEN) as client:  # no certificate
        assert infer_code(client) == grpc.StatusCode.UNAVAILABLE
    with Client(address, tls_ca=ca, token=INFERENCE_TOKEN, **rogue) as client:
        assert infer_code(client) == grpc.StatusCode.UNAVAILABLE
    with Client(address, tls_ca=ca, token=INFERENCE_TOKEN, **good) as client:
        assert infer_code(client) == grpc.StatusCode.OK
    # Certificate and token are both needed: the token (from the environment) still counts.
    with Client(address, tls_ca=ca, **good) as client:
        assert infer_code(client) == grpc.StatusCode.UNAUTHENTICATED
        # Without an admin token, the repository RPCs take the inference token: turning on
        # auth never leaves loading and unloading open.
        err = refusal(lambda: client.repository_index(timeout=10))
        assert err.code == grpc.StatusCode.UNAUTHENTICATED
    with Client(address, tls_ca=ca, token=INFERENCE_TOKEN, **good) as client:
        assert {m["name"] for m in client.repository_index(timeout=10)} >= {"mlp"}


# -- tokens ----------------------------------------------------------------------------------


def test_inference_needs_the_token(tls_server: ServerProcess, certs: Certificates) -> None:
    for token in (None, "wrong", ADMIN_TOKEN):  # the admin token is not the inference token
        with Client(tls_server.address, tls_ca=certs.ca, token=token) as client:
            assert infer_code(client) == grpc.StatusCode.UNAUTHENTICATED, token
            err = refusal(lambda c=client: c.model_metadata("mlp", timeout=10))
            assert err.code == grpc.StatusCode.UNAUTHENTICATED
    with Client(tls_server.address, tls_ca=certs.ca) as client:
        err = refusal(lambda: client.infer("mlp", {"input": x64()}, timeout=10))
        assert "authorization: Bearer <token>" in err.message, err.message


def test_repository_and_admin_rpcs_need_the_admin_token(
    tls_server: ServerProcess, certs: Certificates
) -> None:
    for token in (None, INFERENCE_TOKEN, "wrong"):
        with Client(tls_server.address, tls_ca=certs.ca, token=token) as client:
            for call in (
                lambda c=client: c.repository_index(timeout=10),
                lambda c=client: c.load_model("mlp", timeout=10),
                lambda c=client: c.unload_model("mlp", timeout=10),
            ):
                err = refusal(call)
                assert err.code == grpc.StatusCode.UNAUTHENTICATED, (token, err)
        routes = admin_call(tls_server, certs, token)
        assert routes.code() == grpc.StatusCode.UNAUTHENTICATED, token  # type: ignore[union-attr]
    with Client(tls_server.address, tls_ca=certs.ca, token=ADMIN_TOKEN) as admin:
        assert {m["name"] for m in admin.repository_index()} >= {"mlp", "linked"}
        admin.load_model("mlp", timeout=60)
    assert admin_call(tls_server, certs, ADMIN_TOKEN).models  # type: ignore[union-attr]
    with Client(tls_server.address, tls_ca=certs.ca, token=INFERENCE_TOKEN) as client:
        assert infer_code(client) == grpc.StatusCode.OK  # still serving after the reload


def test_streams_need_the_token_too(tls_server: ServerProcess, certs: Certificates) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=certs.ca.read_bytes())
    request = encode_request("mlp", {"input": x64()})
    with grpc.secure_channel(tls_server.address, credentials) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.ModelStreamInfer(iter([request]), timeout=10))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        metadata = (("authorization", f"Bearer {INFERENCE_TOKEN}"),)
        (reply,) = list(stub.ModelStreamInfer(iter([request]), timeout=10, metadata=metadata))
        assert not reply.error_message and reply.infer_response.model_name == "mlp"


def test_stream_client_with_tls_and_token(tls_server: ServerProcess, certs: Certificates) -> None:
    # Client(stream=True) carries TLS and the token on its streams; a refused stream fails
    # its calls with the server's code (UNAUTHENTICATED). gRPC's client core sometimes ends
    # such a stream as "Internal error from Core" when a write meets the refusal (seen about
    # one run in three, in both directions of the race, more often against the native front
    # end, whose refusal comes after the token check's hand-over to Python): the client then
    # reports the stream as broken (UNAVAILABLE) and a later call, on a new stream, gets
    # UNAUTHENTICATED.
    for token, code in ((INFERENCE_TOKEN, grpc.StatusCode.OK),
                        ("wrong", grpc.StatusCode.UNAUTHENTICATED)):  # fmt: skip
        with Client(tls_server.address, tls_ca=certs.ca, token=token, stream=True) as client:
            if code == grpc.StatusCode.OK:
                assert infer_code(client) == code, token
            else:
                # Until the refusal itself comes back (each broken stream is replaced by a
                # new one on the next call); the race rarely repeats many times in a row.
                codes = [infer_code(client)]
                while codes[-1] == grpc.StatusCode.UNAVAILABLE and len(codes) < 10:
                    codes.append(infer_code(client))
                assert codes[-1] == code, codes
                assert set(codes) <= {code, grpc.StatusCode.UNAVAILABLE}, codes

            async def aio_code(c: Client = client) -> grpc.StatusCode:
                try:
                    await c.aio.infer("mlp", {"input": x64()}, timeout=10)
                    return grpc.StatusCode.OK
                except InferenceError as e:
                    return e.code
                finally:
                    await c.aio.close()

            allowed = {code} if code == grpc.StatusCode.OK else {code, grpc.StatusCode.UNAVAILABLE}
            assert asyncio.run(aio_code()) in allowed, token


def admin_call(server: ServerProcess, certs: Certificates, token: str | None):
    """GetRoutes on the admin service: the reply, or the RpcError."""
    credentials = grpc.ssl_channel_credentials(root_certificates=certs.ca.read_bytes())
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with grpc.secure_channel(server.address, credentials) as channel:
        stub = admin_pb2_grpc.RoutingAdminStub(channel)
        try:
            return stub.GetRoutes(admin_pb2.GetRoutesRequest(), timeout=10, metadata=metadata)
        except grpc.RpcError as e:
            return e


def test_health_and_reflection_stay_open(tls_server: ServerProcess, certs: Certificates) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=certs.ca.read_bytes())
    with grpc.secure_channel(tls_server.address, credentials) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (answer,) = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
        names = {s.name for s in answer.list_services_response.service}
        assert "inference.GRPCInferenceService" in names


def test_cli_infer_with_tls_and_token(tls_server: ServerProcess, certs: Certificates) -> None:
    cmd = [
        sys.executable, "-m", "tensorgate.server.cli", "infer", "mlp", "--random", "--json",
        "--url", tls_server.address, "--tls-ca", str(certs.ca),
    ]  # fmt: skip
    ok = subprocess.run(
        [*cmd, "--token", INFERENCE_TOKEN], capture_output=True, text=True, timeout=60
    )
    assert ok.returncode == 0, ok.stderr
    assert '"variant": "1"' in ok.stdout
    refused = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr, refused.stderr


def test_cli_bench_with_tls_and_token(tls_server: ServerProcess, certs: Certificates) -> None:
    cmd = [
        sys.executable, "-m", "tensorgate.server.cli", "bench", "mlp", "-n", "20", "-c", "2",
        "--format", "json", "--url", tls_server.address, "--tls-ca", str(certs.ca),
    ]  # fmt: skip
    for stream in ([], ["--stream"]):
        ok = subprocess.run(
            [*cmd, *stream, "--token", INFERENCE_TOKEN], capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout)["codes"] == {"OK": 20}
    refused = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "UNAUTHENTICATED" in refused.stderr, refused.stderr


def test_cli_routes_with_tls_and_admin_token(
    tls_server: ServerProcess, certs: Certificates
) -> None:
    cmd = [
        sys.executable, "-m", "tensorgate.server.cli", "routes", "--url", tls_server.address,
        "--tls-ca", str(certs.ca),
    ]  # fmt: skip
    ok = subprocess.run(
        [*cmd, "--token", ADMIN_TOKEN, "show", "--json"], capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "mlp" in [m["model"] for m in json.loads(ok.stdout)["models"]]
    refused = subprocess.run(
        [*cmd, "--token", INFERENCE_TOKEN, "show"], capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr, refused.stderr


# -- the repository root ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../outside", "/etc", "mlp/../mlp", "..", ".", "a/b", ""])
def test_model_names_that_are_paths_are_refused(
    tls_server: ServerProcess, certs: Certificates, name: str
) -> None:
    with Client(tls_server.address, tls_ca=certs.ca, token=ADMIN_TOKEN) as admin:
        for call in (admin.load_model, admin.unload_model):
            err = refusal(lambda c=call: c(name, timeout=10))
            assert err.code == grpc.StatusCode.INVALID_ARGUMENT, (name, err)
            assert "invalid model name" in err.message, err.message


def test_symlinks_out_of_the_root_are_refused(
    tls_server: ServerProcess, certs: Certificates
) -> None:
    with Client(tls_server.address, tls_ca=certs.ca, token=ADMIN_TOKEN) as admin:
        # A model directory that is a link to outside the root.
        err = refusal(lambda: admin.load_model("escape", timeout=10))
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "resolves outside the model repository" in err.message
        # A variant directory, or a model file, linked to outside the root.
        for name in ("escvariant", "escfile"):
            err = refusal(lambda n=name: admin.load_model(n, timeout=10))
            assert err.code == grpc.StatusCode.FAILED_PRECONDITION, err
            assert "resolves outside the model repository" in err.message, err.message
        index = {m["name"]: m for m in admin.repository_index()}
        for name in ("escape", "escvariant", "escfile"):
            assert index[name]["state"] == "UNAVAILABLE", index[name]
            assert "outside the model repository" in index[name]["reason"], index[name]
        # Links that stay inside the root serve.
        assert index["linked"]["state"] == "READY"
    with Client(tls_server.address, tls_ca=certs.ca, token=INFERENCE_TOKEN) as client:
        for name in ("escape", "escvariant", "escfile"):
            assert not client.is_model_ready(name)
        assert client.infer("linked", {"input": x64()}, version="2").variant == "2"
