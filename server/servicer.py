"""``inference.GRPCInferenceService``: thin translation between RPCs and the gateway.

Servicers hold no logic: ModelInfer goes to the pipeline, the rest read the repository.
RPCs not overridden here answer UNIMPLEMENTED.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import grpc

import tensorgate
from tensorgate.backends.datatypes import by_name
from tensorgate.protos import grpc_service_pb2 as pb
from tensorgate.protos import grpc_service_pb2_grpc as pb_grpc
from tensorgate.protos import model_config_pb2 as mc

from .errors import InvalidInput, ModelNotFound, ModelNotReady, TensorgateError
from .repository import Model, State, check_model_name
from .statistics import NAMED_VARIANTS_VERSION

if TYPE_CHECKING:
    from .app import Gateway

VARIANT_METADATA_KEY = "tensorgate-variant"
#: With ``serve --workers N``: which worker process (0..N-1) answered, for load-spread checks.
WORKER_METADATA_KEY = "tensorgate-worker"
EXTENSIONS = ["model_repository", "model_configuration", "statistics"]
# Requests of one ModelStreamInfer stream being served at once; the reader waits beyond.
STREAM_WINDOW = 128
#: A stream request's own timeout, in microseconds: Triton's request parameter.
TIMEOUT_PARAMETER = "timeout"


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.repository = gateway.repository
        index = gateway.settings.worker_index
        self._worker_metadata = () if index is None else ((WORKER_METADATA_KEY, str(index)),)

    # -- health ---------------------------------------------------------------------------
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.gateway.ready)

    async def ModelReady(self, request, context):
        model = self.repository.models.get(request.name)
        if model is None or not model.ready:
            return pb.ModelReadyResponse(ready=False)
        if request.version:
            v = model.variants.get(request.version)
            return pb.ModelReadyResponse(ready=v is not None and v.ready)
        return pb.ModelReadyResponse(ready=True)

    # -- metadata -------------------------------------------------------------------------
    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(
            name="tensorgate", version=tensorgate.__version__, extensions=EXTENSIONS
        )

    def _ready_model(self, name: str, version: str) -> tuple[Model, str]:
        model = self.repository.get(name)
        if version and version not in model.variants:
            raise ModelNotFound(name, version)
        if model.signature is None:
            raise ModelNotReady(f"model '{name}' is not ready: {model.reason}")
        platform = model.variants[version].platform if version else model.platform
        return model, platform

    async def ModelMetadata(self, request, context):
        model, platform = self._ready_model(request.name, request.version)
        sig = model.signature
        assert sig is not None

        def meta(specs):
            return [
                pb.ModelMetadataResponse.TensorMetadata(
                    name=s.name, datatype=s.datatype, shape=s.shape
                )
                for s in specs
            ]

        return pb.ModelMetadataResponse(
            name=model.name,
            versions=[v.name for v in model.variants.values() if v.ready],
            platform=platform,
            inputs=meta(sig.inputs),
            outputs=meta(sig.outputs),
        )

    async def ModelConfig(self, request, context):
        model, platform = self._ready_model(request.name, request.version)
        sig = model.signature
        assert sig is not None
        batched = sig.max_batch_size > 0

        def dims(shape):
            return list(shape[1:] if batched else shape)

        config = mc.ModelConfig(
            name=model.name,
            platform=platform,
            backend=model.variants[request.version].backend_name
            if request.version
            else model.backend_name,
            max_batch_size=sig.max_batch_size,
            input=[
                mc.ModelInput(
                    name=s.name,
                    data_type=mc.DataType.Value(by_name(s.datatype).triton),
                    dims=dims(s.shape),
                )
                for s in sig.inputs
            ],
            output=[
                mc.ModelOutput(
                    name=s.name,
                    data_type=mc.DataType.Value(by_name(s.datatype).triton),
                    dims=dims(s.shape),
                )
                for s in sig.outputs
            ],
            instance_group=[
                mc.ModelInstanceGroup(
                    name=model.name,
                    count=model.config.instances.count,
                    kind=mc.ModelInstanceGroup.KIND_GPU
                    if model.config.device.startswith("cuda")
                    else mc.ModelInstanceGroup.KIND_CPU,
                )
            ],
        )
        return pb.ModelConfigResponse(config=config)

    async def ModelStatistics(self, request, context):
        if request.name:
            model = self.repository.get(request.name)
            if request.version and request.version not in model.variants and (
                request.version != NAMED_VARIANTS_VERSION or not _named(model.variants)
            ):
                raise ModelNotFound(request.name, request.version)
            wanted = {model.name: [request.version] if request.version else _versions(model)}
        else:
            wanted = {name: _versions(m) for name, m in self.repository.models.items()}
        return self.gateway.statistics.report(wanted)

    # -- inference ------------------------------------------------------------------------
    async def ModelInfer(self, request, context):
        metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        served = await self.gateway.pipeline.model_infer(
            request, context.time_remaining(), metadata
        )
        context.set_trailing_metadata(
            ((VARIANT_METADATA_KEY, served.variant), *self._worker_metadata)
        )
        return served.message

    async def ModelStreamInfer(self, request_iterator, context):
        """Bidirectional stream of ModelInfer requests (Triton's message types).

        Requests are served concurrently, up to ``STREAM_WINDOW`` at a time per stream, and
        replies are sent as they complete; each carries the request's ``id``. A failed
        request answers with ``error_message`` set and the stream goes on, as in Triton. A
        request's ``timeout`` parameter (microseconds) is its deadline within the stream's.
        """
        metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        replies: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        window = asyncio.Semaphore(STREAM_WINDOW)
        pipeline = self.gateway.pipeline

        async def serve_one(request: pb.ModelInferRequest) -> None:
            try:
                timeout = _stream_timeout(request, context.time_remaining())
                served = await pipeline.model_infer(request, timeout, metadata)
                reply = pb.ModelStreamInferResponse(infer_response=served.message)
            except TensorgateError as e:
                reply = pb.ModelStreamInferResponse(
                    error_message=f"{e.code.name}: {e}",
                    infer_response=pb.ModelInferResponse(
                        model_name=request.model_name,
                        model_version=request.model_version,
                        id=request.id,
                    ),
                )
            finally:
                window.release()
            await replies.put(reply)

        async def read_all() -> None:
            tasks: set[asyncio.Task[None]] = set()
            try:
                async for request in request_iterator:
                    await window.acquire()
                    task = asyncio.create_task(serve_one(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if tasks:
                    await asyncio.gather(*tasks)
            finally:
                await replies.put(None)

        reader = asyncio.create_task(read_all())
        try:
            while (reply := await replies.get()) is not None:
                yield reply
            await reader  # surfaces a broken request stream
        finally:
            reader.cancel()

    # -- repository -----------------------------------------------------------------------
    async def RepositoryIndex(self, request, context):
        entries: list[pb.RepositoryIndexResponse.ModelIndex] = []
        Index = pb.RepositoryIndexResponse.ModelIndex
        on_disk = set(self.repository.scan())
        for name in sorted(on_disk | set(self.repository.models)):
            model = self.repository.models.get(name)
            if model is None:
                if not request.ready:
                    entries.append(Index(name=name, state=State.UNAVAILABLE, reason="unloaded"))
                continue
            if not model.variants and not request.ready:
                entries.append(Index(name=name, state=State.UNAVAILABLE, reason=model.reason))
            for v in model.variants.values():
                if request.ready and not v.ready:
                    continue
                entries.append(Index(name=name, version=v.name, state=v.state, reason=v.reason))
        return pb.RepositoryIndexResponse(models=entries)

    async def RepositoryModelLoad(self, request, context):
        check_model_name(request.model_name)
        model = await self.repository.load(request.model_name)
        if not model.ready:
            reasons = model.reason or "; ".join(
                f"{v.name}: {v.reason}" for v in model.variants.values()
            )
            raise LoadFailed(f"failed to load model '{request.model_name}': {reasons}")
        self.gateway.model_health_changed()
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        check_model_name(request.model_name)
        await self.repository.unload(request.model_name)
        self.gateway.model_health_changed()
        return pb.RepositoryModelUnloadResponse()


def _stream_timeout(request: pb.ModelInferRequest, remaining: float | None) -> float | None:
    """Seconds a stream request may take: its ``timeout`` parameter (microseconds; 0 or
    absent: none), within what is left of the stream's own deadline."""
    micros = 0
    if TIMEOUT_PARAMETER in request.parameters:
        param = request.parameters[TIMEOUT_PARAMETER]
        choice = param.WhichOneof("parameter_choice")
        if choice not in ("int64_param", "uint64_param"):
            raise InvalidInput(
                f"request parameter '{TIMEOUT_PARAMETER}' is the request's timeout in "
                f"microseconds and must be int64_param or uint64_param, not {choice}"
            )
        micros = getattr(param, choice)
    if micros <= 0:
        return remaining
    own = micros / 1e6
    return own if remaining is None else min(own, remaining)


def _named(variants) -> list[str]:
    return [v for v in variants if not v.isdigit()]


def _versions(model: Model) -> list[str]:
    """What an unpinned ModelStatistics lists: integer versions one by one, and the named
    variants together under version "0" (Triton clients parse versions as integers)."""
    versions = [v for v in model.variants if v.isdigit()]
    return versions + ([NAMED_VARIANTS_VERSION] if _named(model.variants) else [])


class LoadFailed(TensorgateError):
    code = grpc.StatusCode.FAILED_PRECONDITION
