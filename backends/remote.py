"""Remote backend: a variant whose model runs on another Open Inference Protocol server.

The variant directory holds a ``remote.toml`` instead of a model file::

    target = "10.0.0.7:8001"     # host:port, or any gRPC target (dns:///svc:8001 ...)
    model = "scorer"             # the model's name there
    version = ""                 # its model_version there ("": the server's default)
    timeout_s = 10               # deadline of each call to the remote, seconds
    tls = false                  # true: TLS; optional ca_file, cert_file + key_file (mTLS)
    channels = 2                 # gRPC channels (HTTP/2 connections) used round-robin

The other server can be another tensorgate, Triton, KServe or MLServer: only the standard
ModelMetadata, ModelReady and ModelInfer RPCs are used. Tensors are encoded by the same codec
the gateway and the Python client use (``server/codec.py``), in raw contents.

Failure policy. ``load`` waits up to ``timeout_s`` for the remote to answer (so a front and a
back tier may start together); if it still cannot reach it, the variant is UNAVAILABLE with
that reason and RepositoryModelLoad brings it back once the remote is up. Once loaded, a remote
that goes down makes ``infer`` fail fast with ``BackendUnreachable`` (UNAVAILABLE to the
caller), and the channels reconnect on their own when it returns: no reload is needed.

Like every backend, ``infer`` runs in the variant's worker threads, so this module uses the
synchronous gRPC API. Each call waits on the network, not the CPU: give the model
``[instances] count`` of about the concurrency it should carry to the remote.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar

import grpc
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from tensorgate import codec
from tensorgate.limits import MAX_MESSAGE_BYTES
from tensorgate.protos import grpc_service_pb2 as pb
from tensorgate.protos import grpc_service_pb2_grpc as pb_grpc
from tensorgate.tomlconfig import TomlError, load_toml

from .base import (
    Backend,
    BackendError,
    BackendInputError,
    BackendOptions,
    BackendUnreachable,
    Signature,
    TensorSpec,
)

logger = logging.getLogger(__name__)

CONFIG_FILE = "remote.toml"
#: Same default as the server's --max-message-bytes: what the front accepts, it can forward.
# gRPC's default reconnect backoff grows to 120 s, so a back tier that was down for a while
# would stay unused for up to two minutes after it returned. Cap it at a few seconds.
_RECONNECT_BACKOFF_MS = (
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
)

#: Remote status codes that say "not now" rather than "never": reported as UNAVAILABLE.
_TRANSIENT = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.CANCELLED,
    # The model was unloaded (or is reloading) over there.
    grpc.StatusCode.NOT_FOUND,
}
_CALLER_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE}


class RemoteConfig(BaseModel):
    """``VARIANT/remote.toml``. Unknown fields are refused, as in config.toml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target: str
    model: str
    version: str = ""
    timeout_s: Annotated[float, Field(gt=0)] = 10.0
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    channels: Annotated[int, Field(ge=1, le=64)] = 2

    @field_validator("target", "model")
    @classmethod
    def _not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v.strip()


_EXAMPLE = {"target": '"host:8001"', "model": '"name-of-the-model-there"'}


def read_config(path: Path) -> RemoteConfig:
    """Read and check ``remote.toml``. Raises BackendError naming the file and field."""
    try:
        config = load_toml(path, RemoteConfig, examples=_EXAMPLE)
    except TomlError as e:
        raise BackendError(str(e)) from None
    files = {"ca_file": config.ca_file, "cert_file": config.cert_file, "key_file": config.key_file}
    given = [name for name, value in files.items() if value]
    if given and not config.tls:
        raise BackendError(f"{path}: field '{given[0]}' is set but tls = false; set tls = true")
    if bool(config.cert_file) != bool(config.key_file):
        raise BackendError(
            f"{path}: fields 'cert_file' and 'key_file' go together (a client certificate "
            "and its key, for mutual TLS); set both or neither"
        )
    return config


def _read_file(variant_dir: Path, config_path: Path, field: str, value: str | None) -> bytes | None:
    if not value:
        return None
    file = variant_dir / value  # an absolute path stays absolute
    try:
        return file.read_bytes()
    except OSError as e:
        raise BackendError(f"{config_path}: field '{field}': cannot read {file}: {e}") from None


class RemoteBackend(Backend):
    """Forwards each inference to a model on another OIP server over gRPC.

    ``infer`` may be called from several threads at once: gRPC channels are thread-safe, and
    calls are spread over ``channels`` channels in turn.
    """

    name: ClassVar[str] = "remote"
    may_run_inline: ClassVar[bool] = False  # its calls wait on another process
    accepts_deadline: ClassVar[bool] = True
    #: Until loaded; then the instance's ``platform`` is the remote model's (e.g.
    #: "onnxruntime_onnx"), so clients see what actually computes.
    platform: ClassVar[str] = "remote"

    def __init__(self) -> None:
        self._config: RemoteConfig | None = None
        self._channels: list[grpc.Channel] = []
        self._stubs: list[pb_grpc.GRPCInferenceServiceStub] = []
        self._turn = itertools.count()
        self._where = ""
        self.remote_platform = ""

    @classmethod
    def find_model_file(cls, variant_dir: Path) -> Path | None:
        path = variant_dir / CONFIG_FILE
        return path if path.is_file() else None

    def load(self, path: Path, options: BackendOptions) -> Signature:
        config = read_config(path)
        where = f"remote {config.target} (model '{config.model}'"
        where += f" version '{config.version}')" if config.version else ")"
        channels = self._open(path, config)
        stubs = [pb_grpc.GRPCInferenceServiceStub(c) for c in channels]
        try:
            # wait_for_ready: a remote that is still starting gets timeout_s to come up.
            meta = stubs[0].ModelMetadata(
                pb.ModelMetadataRequest(name=config.model, version=config.version),
                timeout=config.timeout_s,
                wait_for_ready=True,
            )
            # One call per channel: checks readiness and opens every connection now, not
            # on the first requests.
            for stub in stubs:
                ready = stub.ModelReady(
                    pb.ModelReadyRequest(name=config.model, version=config.version),
                    timeout=config.timeout_s,
                    wait_for_ready=True,
                )
                if not ready.ready:
                    raise BackendError(f"{where} is not ready there")
        except grpc.RpcError as e:
            status = _status(e)
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:  # type: ignore[attr-defined]
                # Waiting hides why: one call that does not wait says (connection refused...).
                status = f"no answer within timeout_s = {config.timeout_s:g} s"
                status += f" ({_why_not(stubs[0], config)})"
            for c in channels:
                c.close()
            raise BackendError(
                f"{where}: {status}; check {path}. Once the remote serves the "
                "model, RepositoryModelLoad loads this one again"
            ) from None
        except BackendError:
            for c in channels:
                c.close()
            raise
        if options.instances == 1:
            logger.warning(
                "%s: [instances] count = 1, so requests are sent to the remote one at a time; "
                "raise it to the concurrency the remote should carry",
                path,
            )
        self._config, self._channels, self._stubs, self._where = config, channels, stubs, where
        self.remote_platform = meta.platform
        self.platform = meta.platform or "remote"  # type: ignore[misc]
        return Signature(
            inputs=tuple(_spec(t) for t in meta.inputs),
            outputs=tuple(_spec(t) for t in meta.outputs),
        )

    @staticmethod
    def _open(path: Path, config: RemoteConfig) -> list[grpc.Channel]:
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # Channels with equal arguments share one connection unless each has its own
            # subchannel pool: the pool would be one HTTP/2 connection otherwise.
            ("grpc.use_local_subchannel_pool", 1),
            # A dns:/// target naming a headless Service resolves to every pod: spread the
            # calls over all of them, per request.
            ("grpc.lb_policy_name", "round_robin"),
            *_RECONNECT_BACKOFF_MS,
        ]
        if not config.tls:
            return [grpc.insecure_channel(config.target, options) for _ in range(config.channels)]
        variant_dir = path.parent
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read_file(variant_dir, path, "ca_file", config.ca_file),
            private_key=_read_file(variant_dir, path, "key_file", config.key_file),
            certificate_chain=_read_file(variant_dir, path, "cert_file", config.cert_file),
        )
        return [
            grpc.secure_channel(config.target, credentials, options) for _ in range(config.channels)
        ]

    def infer(
        self,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None = None,
        deadline: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Forward to the remote server; the call ends at ``timeout_s`` or the caller's
        ``deadline`` (a ``time.monotonic()`` value), whichever comes first."""
        config = self._config
        if config is None:
            raise BackendError("remote variant is not loaded")
        request = codec.encode_request(config.model, inputs, config.version, outputs or ())
        stub = self._stubs[next(self._turn) % len(self._stubs)]
        try:
            timeout = config.timeout_s
            if deadline is not None:
                timeout = min(timeout, max(deadline - time.monotonic(), 0.001))
            reply = stub.ModelInfer(request, timeout=timeout)
        except grpc.RpcError as e:
            code = e.code()  # type: ignore[attr-defined]
            if code in _TRANSIENT:
                raise BackendUnreachable(f"{self._where}: {_status(e)}") from None
            if code in _CALLER_ERRORS:
                raise BackendInputError(
                    f"{self._where} refused the request: {_status(e)}"
                ) from None
            raise BackendError(f"{self._where} failed: {_status(e)}") from None
        try:
            return codec.decode_response(reply)
        except Exception as e:
            raise BackendError(f"{self._where} sent a malformed reply: {e}") from None

    def unload(self) -> None:
        channels, self._channels, self._stubs = self._channels, [], []
        self._config = None
        for channel in channels:
            channel.close()


def _why_not(stub: pb_grpc.GRPCInferenceServiceStub, config: RemoteConfig) -> str:
    try:
        stub.ModelReady(pb.ModelReadyRequest(name=config.model, version=config.version), timeout=1)
    except grpc.RpcError as e:
        return f"last attempt: {_status(e)}"
    return "it answers now"


def _status(e: grpc.RpcError) -> str:
    code = e.code()  # type: ignore[attr-defined]
    return f"{code.name}: {e.details() or ''}"  # type: ignore[attr-defined]


def _spec(t: pb.ModelMetadataResponse.TensorMetadata) -> TensorSpec:
    return TensorSpec(name=t.name, datatype=t.datatype, shape=tuple(int(d) for d in t.shape))
