"""ghz over TLS (``--cacert``), mutual TLS (``--cert``/``--key``) and with a bearer token
(``--metadata``), against test_security.py's servers; ghz's report and the server's own
counts (ModelStatistics) for the same calls, as in test_ghz.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tensorgate.clients import Client

from . import test_ghz, test_security
from .serverproc import ServerProcess
from .test_ghz import calls, counts, ghz_process, run_ghz, scorer_request, served_since
from .test_security import INFERENCE_TOKEN, Certificates

# Fixtures: ghz, and test_security.py's certificates, repository (an ONNX ``mlp``), TLS +
# token server and mutual TLS server.
ghz = test_ghz.ghz
certs, repo = test_security.certs, test_security.repo
tls_server, mtls_server = test_security.tls_server, test_security.mtls_server

pytestmark = pytest.mark.usefixtures("front_end")
BEARER = json.dumps({"authorization": f"Bearer {INFERENCE_TOKEN}"})


def mlp_calls(certs: Certificates) -> tuple[str, ...]:
    """40 calls of the ``mlp`` model, 4 at a time, trusting the test CA."""
    return ("--cacert", str(certs.ca), *calls(scorer_request(False, model="mlp"), 40, 4))


def test_tls_and_bearer_token(ghz: Path, tls_server: ServerProcess, certs: Certificates) -> None:
    with Client(tls_server.address, tls_ca=certs.ca, token=INFERENCE_TOKEN) as client:
        before = counts(client, "mlp")
        report = run_ghz(ghz, tls_server.address, *mlp_calls(certs), "--metadata", BEARER)
        assert report.codes == {"OK": 40} and not report.errors, report.errors
        assert served_since(client, "mlp", before) == {"1": (40, 0)}

        wrong = json.dumps({"authorization": "Bearer not-the-token"})
        for metadata in (("--metadata", wrong), ()):
            report = run_ghz(ghz, tls_server.address, *mlp_calls(certs), *metadata)
            assert report.codes == {"Unauthenticated": 40}, report.errors
        assert served_since(client, "mlp", before) == {"1": (40, 0)}


def test_mutual_tls(ghz: Path, mtls_server: ServerProcess, certs: Certificates) -> None:
    args = (*mlp_calls(certs), "--metadata", BEARER)
    own = ("--cert", str(certs.client.cert), "--key", str(certs.client.key))
    with Client(
        mtls_server.address,
        tls_ca=certs.ca,
        tls_cert=certs.client.cert,
        tls_key=certs.client.key,
        token=INFERENCE_TOKEN,
    ) as client:
        before = counts(client, "mlp")
        report = run_ghz(ghz, mtls_server.address, *args, *own)
        assert report.codes == {"OK": 40} and not report.errors, report.errors
        assert served_since(client, "mlp", before) == {"1": (40, 0)}

        # Without a certificate, or with one a CA the server does not trust signed, the
        # handshake fails: ghz cannot even ask for the schema, says Unavailable, exits 1.
        rogue = ("--cert", str(certs.rogue_client.cert), "--key", str(certs.rogue_client.key))
        for refused in ((), rogue):
            proc = ghz_process(ghz, mtls_server.address, *args, *refused)
            assert proc.returncode == 1 and "code = Unavailable" in proc.stderr, proc.stderr
        assert served_since(client, "mlp", before) == {"1": (40, 0)}
