"""Credentials reloaded in place: on SIGHUP, and when their files change.

What is watched, from ``tensorgate serve``'s flags: ``--auth-token-file`` and
``--admin-token-file`` (the gRPC token policy, server/auth.py), ``--tls-cert``, ``--tls-key``
and ``--tls-client-ca`` (the gRPC port's TLS), and the ``/metrics`` endpoint's
``--metrics-token-file``, ``--metrics-tls-cert`` and ``--metrics-tls-key``
(server/metrics_http.py). A token taken from the environment is not reloaded: the
environment of a running process does not change.

``CredentialWatcher`` reads the files every ``POLL_INTERVAL_S`` seconds and compares their
contents with what it saw last; a change, or SIGHUP (``reload()``), re-reads a group of files
(the two token files; the certificate, key and client CA) and hands the parsed result to
whoever serves with it:

- tokens: a new ``TokenPolicy`` whose tokens replace those of the one the front ends hold
  (``TokenPolicy.replace``), read once per call: new calls are judged by the new tokens and
  calls in flight are never revisited;
- gRPC TLS: the front end's ``reload_tls`` (for grpcio, ``GrpcTls`` here: the certificate
  configuration that grpc's dynamic server credentials fetch at the start of every
  handshake): new connections get the new certificate and client CA, open connections (and
  their calls) go on with the old until they close;
- /metrics: ``MetricsServer.set_token`` and ``set_tls``.

A file that does not parse (an empty token, a PEM block cut short, a key that does not match
its certificate) keeps the credentials in use and logs an error naming the file; the next
change to it is tried again. Writing a certificate and its key one after the other may show
the watcher the new certificate with the old key in between: that pair is refused, and the
next poll takes the matching pair. Replacing files atomically (write, then rename) avoids it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from .auth import ADMIN_TOKEN_ENV, INFERENCE_TOKEN_ENV, TokenPolicy, parse_token, read_token
from .metrics_http import tls_context
from .settings import ServerSettings

log = logging.getLogger(__name__)

#: Seconds between two looks at the credential files.
POLL_INTERVAL_S = 1.0


class CredentialError(ValueError):
    """A credential file that cannot be used; the message names the file and the flag."""


@dataclass(frozen=True)
class TlsMaterial:
    """A server certificate chain, its private key, and the CA that client certificates
    must be signed by (mutual TLS), all PEM."""

    cert_chain: bytes
    private_key: bytes
    client_ca: bytes | None = None


def check_tls(
    cert: Path,
    key: Path,
    client_ca: Path | None,
    contents: dict[Path, bytes],
    flags: tuple[str, str, str] = ("--tls-cert", "--tls-key", "--tls-client-ca"),
) -> TlsMaterial:
    """The TLS material in ``contents`` (the files' bytes, as read), checked the way a TLS
    library will use it. Raises CredentialError naming the file at fault."""
    cert_flag, key_flag, ca_flag = flags
    cert_pem, key_pem = contents[cert], contents[key]
    if b"-----BEGIN CERTIFICATE-----" not in cert_pem:
        raise CredentialError(f"{cert_flag} {cert} holds no PEM certificate")
    if b"PRIVATE KEY-----" not in key_pem:
        raise CredentialError(f"{key_flag} {key} holds no PEM private key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # ssl reads files only: check the files, then that they still hold what was read.
        context.load_cert_chain(certfile=str(cert), keyfile=str(key))
    except (OSError, ssl.SSLError) as e:
        raise CredentialError(
            f"{cert_flag} {cert} and {key_flag} {key} cannot be used together: {e}"
        ) from None
    if _read(cert) != cert_pem or _read(key) != key_pem:
        raise CredentialError(f"{cert_flag} {cert} or {key_flag} {key} changed while read")
    ca_pem = None
    if client_ca is not None:
        ca_pem = contents[client_ca]
        try:
            context.load_verify_locations(cadata=ca_pem.decode("ascii"))
        except (ValueError, ssl.SSLError) as e:
            raise CredentialError(
                f"{ca_flag} {client_ca} holds no usable PEM CA certificate: {e}"
            ) from None
    return TlsMaterial(cert_pem, key_pem, ca_pem)


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _certificate_configuration(material: TlsMaterial) -> Any:
    return grpc.ssl_server_certificate_configuration(
        [(material.private_key, material.cert_chain)], root_certificates=material.client_ca
    )


def tls_material(settings: ServerSettings) -> TlsMaterial | None:
    """The TLS of ``--tls-cert``/``--tls-key``/``--tls-client-ca``, read and checked, or None
    without a certificate: what either front end starts with. Raises CredentialError (a
    ValueError) naming a file that is unusable."""
    s = settings
    if s.tls_cert is None and s.tls_key is None:
        if s.tls_client_ca is not None:
            raise CredentialError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if s.tls_cert is None or s.tls_key is None:
        raise CredentialError("TLS needs both --tls-cert and --tls-key")
    paths = [p for p in (s.tls_cert, s.tls_key, s.tls_client_ca) if p is not None]
    contents = {p: _read(p) for p in paths}
    for path, data in contents.items():
        if data is None:
            raise CredentialError(f"{path} cannot be read")
    return check_tls(s.tls_cert, s.tls_key, s.tls_client_ca, contents)  # type: ignore[arg-type]


class GrpcTls:
    """TLS of the grpcio front end's port, replaceable while it serves.

    ``credentials()`` are grpc's dynamic SSL server credentials: at the start of every TLS
    handshake grpc calls ``_fetch`` (on one of its own threads), which hands over the
    configuration once after each ``update``. Whether client certificates are required is
    fixed when the port is bound (by whether a client CA was given then).
    """

    def __init__(self, material: TlsMaterial) -> None:
        self._lock = threading.Lock()
        self._material = material
        self._generation = 0
        self._fetched = 0

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> GrpcTls | None:
        """``tls_material``'s, for grpcio; None without a certificate."""
        material = tls_material(settings)
        return None if material is None else cls(material)

    @property
    def material(self) -> TlsMaterial:
        return self._material

    def update(self, material: TlsMaterial) -> None:
        with self._lock:
            self._material = material
            self._generation += 1

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            _certificate_configuration(self._material),
            self._fetch,
            require_client_authentication=self._material.client_ca is not None,
        )

    def _fetch(self) -> Any:
        with self._lock:
            if self._fetched == self._generation:
                return None  # unchanged
            self._fetched = self._generation
            return _certificate_configuration(self._material)


@dataclass
class _Group:
    """Files read and applied together."""

    what: str
    paths: tuple[Path, ...]
    parse: Callable[[dict[Path, bytes]], Any]
    apply: Callable[[Any], None]
    seen: dict[Path, bytes | None]


class CredentialWatcher:
    """Watches credential files; see the module docstring. ``on_tokens`` gets each new
    TokenPolicy, ``on_tls`` each new TlsMaterial of the gRPC port, ``on_metrics_token`` and
    ``on_metrics_tls`` those of /metrics (an ``ssl.SSLContext``). Only the groups whose
    files are configured and whose callback is given are watched."""

    def __init__(
        self,
        settings: ServerSettings,
        *,
        on_tokens: Callable[[TokenPolicy], None] | None = None,
        on_tls: Callable[[TlsMaterial], None] | None = None,
        on_metrics_token: Callable[[str], None] | None = None,
        on_metrics_tls: Callable[[ssl.SSLContext], None] | None = None,
        interval: float = POLL_INTERVAL_S,
    ) -> None:
        self.interval = interval
        self._groups: list[_Group] = []
        self._wake: asyncio.Event | None = None
        self._force = False
        self._check_lock = threading.Lock()
        s = settings
        token_files = tuple(p for p in (s.auth_token_file, s.admin_token_file) if p is not None)
        if on_tokens is not None and token_files:
            self._watch("tokens", token_files, self._tokens_of(s), on_tokens)
        if on_tls is not None and s.tls_cert is not None and s.tls_key is not None:
            cert, key, ca = s.tls_cert, s.tls_key, s.tls_client_ca
            self._watch(
                "TLS certificate",
                tuple(p for p in (cert, key, ca) if p is not None),
                lambda contents: check_tls(cert, key, ca, contents),
                on_tls,
            )
        if on_metrics_token is not None and s.metrics_token_file is not None:
            path = s.metrics_token_file
            self._watch(
                "metrics token",
                (path,),
                lambda contents: _parse_token(contents, path, "--metrics-token-file"),
                on_metrics_token,
            )
        if (
            on_metrics_tls is not None
            and s.metrics_tls_cert is not None
            and s.metrics_tls_key is not None
        ):
            mcert, mkey = s.metrics_tls_cert, s.metrics_tls_key
            flags = ("--metrics-tls-cert", "--metrics-tls-key", "")

            def metrics_tls(contents: dict[Path, bytes]) -> ssl.SSLContext:
                check_tls(mcert, mkey, None, contents, flags)  # the files hold what was read
                return tls_context(mcert, mkey)

            self._watch("metrics TLS certificate", (mcert, mkey), metrics_tls, on_metrics_tls)

    @property
    def watching(self) -> list[str]:
        return [g.what for g in self._groups]

    def _watch(
        self,
        what: str,
        paths: Sequence[Path],
        parse: Callable[[dict[Path, bytes]], Any],
        apply: Callable[[Any], None],
    ) -> None:
        # What the server started with is the baseline: only a change is applied.
        self._groups.append(_Group(what, tuple(paths), parse, apply, {p: _read(p) for p in paths}))

    @staticmethod
    def _tokens_of(s: ServerSettings) -> Callable[[dict[Path, bytes]], TokenPolicy]:
        def parse(contents: dict[Path, bytes]) -> TokenPolicy:
            def token(path: Path | None, env: str, flag: str) -> str | None:
                if path is None:
                    return read_token(None, env, flag)
                return _parse_token(contents, path, flag)

            return TokenPolicy(
                token(s.auth_token_file, INFERENCE_TOKEN_ENV, "--auth-token-file"),
                token(s.admin_token_file, ADMIN_TOKEN_ENV, "--admin-token-file"),
            )

        return parse

    # -- checking ------------------------------------------------------------------------
    def check(self, force: bool = False) -> list[str]:
        """Re-read the files; apply each group that changed (every group when ``force``)
        and parses. Returns what was applied. Safe to call from any thread."""
        return self._apply(self._read_changes(force))

    def _read_changes(self, force: bool) -> list[tuple[_Group, Any]]:
        """(group, parsed value) of each group whose files changed and parse; logs an error
        naming the file for each that does not."""
        changes: list[tuple[_Group, Any]] = []
        with self._check_lock:
            for group in self._groups:
                contents = {p: _read(p) for p in group.paths}
                if contents == group.seen and not force:
                    continue
                group.seen = contents
                missing = [p for p, data in contents.items() if data is None]
                try:
                    if missing:
                        raise CredentialError(f"{missing[0]} cannot be read")
                    changes.append((group, group.parse(contents)))  # type: ignore[arg-type]
                except (CredentialError, ValueError) as e:
                    log.error("%s; keeping the %s in use", e, group.what)
        return changes

    @staticmethod
    def _apply(changes: list[tuple[_Group, Any]]) -> list[str]:
        for group, value in changes:
            group.apply(value)
            log.info("%s reloaded from %s", group.what, ", ".join(str(p) for p in group.paths))
        return [group.what for group, _ in changes]

    def reload(self) -> None:
        """Ask for a re-read of every file now (SIGHUP); the running ``run()`` does it."""
        self._force = True
        if self._wake is not None:
            self._wake.set()

    async def run(self) -> None:
        """Poll until cancelled; ``reload()`` wakes it early. File reads and TLS checks run
        in a thread, off the event loop; the callbacks are called on the loop."""
        self._wake = asyncio.Event()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
            self._wake.clear()
            force, self._force = self._force, False
            # Reading and checking off the loop; the new credentials are handed over on it.
            self._apply(await asyncio.to_thread(self._read_changes, force))

    def start_thread(self, stop: threading.Event) -> threading.Thread:
        """Poll on a daemon thread until ``stop`` is set (a process without an event loop:
        the ``--workers`` supervisor). ``reload()`` is then picked up at the next poll."""

        def loop() -> None:
            while not stop.wait(self.interval):
                force, self._force = self._force, False
                self.check(force)

        thread = threading.Thread(target=loop, name="credentials", daemon=True)
        thread.start()
        return thread


def _parse_token(contents: dict[Path, bytes], path: Path, flag: str) -> str:
    try:
        return parse_token(contents[path], path, flag)
    except ValueError as e:
        raise CredentialError(str(e)) from None
