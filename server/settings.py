"""What one gateway process is told to do: the ``serve`` command's options, typed.

Built by the CLI (``tensorgate serve``), by the ``--workers`` supervisor for each worker, and
by tests that start a gateway in-process.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tensorgate.limits import MAX_ELEMENTS, MAX_MESSAGE_BYTES


@dataclass
class ServerSettings:
    repository: Path
    host: str = "127.0.0.1"
    port: int = 8001
    metrics_port: int | None = 8002  # None: no metrics endpoint
    metrics_host: str | None = None  # default: same as host
    # /metrics over HTTPS, and a bearer token it requires (server/metrics_http.py).
    metrics_tls_cert: Path | None = None
    metrics_tls_key: Path | None = None
    metrics_token_file: Path | None = None
    max_message_bytes: int = MAX_MESSAGE_BYTES
    drain_timeout: float = 30.0
    port_file: Path | None = None
    # Reliability and limits (docs/reliability.md).
    max_inflight: int | None = None  # inference requests in flight, server-wide
    max_tensor_elements: int = MAX_ELEMENTS
    poll_interval: float | None = None  # seconds between repository polls; None: no polling
    # Health is SERVING only while at least this many models are ready (0: an empty
    # repository is healthy).
    require_models: int = 0
    # Security (docs/security.md): TLS (mutual when a client CA is given) and bearer tokens.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    auth_token: str | None = None
    admin_token: str | None = None
    # Where the tokens were read from (None: the environment, or no token): re-read on
    # SIGHUP and when they change (server/credentials.py), as are the TLS files.
    auth_token_file: Path | None = None
    admin_token_file: Path | None = None
    # Set by the --workers supervisor (server/workers.py): share the port with sibling
    # worker processes (SO_REUSEPORT), and this worker's index, sent as trailing metadata.
    reuse_port: bool = False
    worker_index: int | None = None
    # A directory every worker of one supervisor shares (rollouts: server/rollouts.py).
    state_dir: Path | None = None
    # The asyncio event loop implementation (server/eventloop.py): "auto" (uvloop when it
    # is installed), "uvloop" or "asyncio".
    event_loop: str = "auto"
    # The gRPC front end (server/frontends/): "python" (grpc.aio), "native" (the Rust
    # extension) or "auto" (native when the extension is installed).
    front_end: str = "auto"

    def __repr__(self) -> str:  # never print the tokens
        hidden = {"auth_token", "admin_token"}
        fields = ", ".join(
            f"{k}={'<set>' if k in hidden and v is not None else repr(v)}"
            for k, v in self.__dict__.items()
        )
        return f"ServerSettings({fields})"
