"""``inference.GRPCInferenceService``: thin translation between RPCs and the gateway.

Servicers hold no logic: ModelInfer goes to the pipeline, the rest read the repository.
RPCs not overridden here answer UNIMPLEMENTED.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TypeVar

import grpc

import tensorgate
from tensorgate import codec
from tensorgate.datatypes import by_name
from tensorgate.errors import InvalidInput, ModelNotFound, ModelNotReady, TensorgateError
from tensorgate.inference import InferenceRequest, InferenceResponse
from tensorgate.limits import MAX_ELEMENTS
from tensorgate.protos import grpc_service_pb2 as pb
from tensorgate.protos import grpc_service_pb2_grpc as pb_grpc
from tensorgate.protos import model_config_pb2 as mc

from .interceptors import status_of
from .pipeline import Pipeline
from .repository import Model, Repository, State, Variant, check_model_name
from .statistics import Statistics

VARIANT_METADATA_KEY = "tensorgate-variant"
#: With ``serve --workers N``: which worker process (0..N-1) answered, for load-spread checks.
WORKER_METADATA_KEY = "tensorgate-worker"
EXTENSIONS = ["model_repository", "model_configuration", "statistics"]
# Requests of one ModelStreamInfer stream being served at once; the reader waits beyond.
STREAM_WINDOW = 128
#: A stream request's own timeout, in microseconds: Triton's request parameter.
TIMEOUT_PARAMETER = "timeout"
R = TypeVar("R")


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """``is_ready`` answers ServerReady; ``models_changed`` is called after a repository
    RPC loaded or unloaded a model (per-model health follows it)."""

    def __init__(
        self,
        repository: Repository,
        pipeline: Pipeline,
        statistics: Statistics,
        *,
        is_ready: Callable[[], bool],
        models_changed: Callable[[], None],
        max_tensor_elements: int = MAX_ELEMENTS,
        worker_index: int | None = None,
    ) -> None:
        self.repository = repository
        self.pipeline = pipeline
        self.statistics = statistics
        self._is_ready = is_ready
        self._models_changed = models_changed
        self._max_elements = max_tensor_elements
        self._open_streams: set[Callable[[], None]] = set()
        self._draining = False
        self._worker_metadata = (
            () if worker_index is None else ((WORKER_METADATA_KEY, str(worker_index)),)
        )

    # -- health ---------------------------------------------------------------------------
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self._is_ready())

    async def ModelReady(self, request, context):
        model = self.repository.models.get(request.name)
        if model is None or not model.ready:
            return pb.ModelReadyResponse(ready=False)
        if request.version:
            try:
                variant = model.variant(request.version)
            except ModelNotFound:
                return pb.ModelReadyResponse(ready=False)
            return pb.ModelReadyResponse(ready=variant.ready)
        return pb.ModelReadyResponse(ready=True)

    # -- metadata -------------------------------------------------------------------------
    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(
            name="tensorgate", version=tensorgate.__version__, extensions=EXTENSIONS
        )

    def _ready_model(self, name: str, version: str) -> tuple[Model, Variant | None]:
        """The model, and the variant ``version`` pins (None when it pins none)."""
        model = self.repository.get(name)
        variant = model.variant(version) if version else None
        if model.signature is None:
            raise ModelNotReady(f"model '{name}' is not ready: {model.reason}")
        return model, variant

    async def ModelMetadata(self, request, context):
        model, variant = self._ready_model(request.name, request.version)
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
            versions=model.pinnable_versions(),
            platform=variant.platform if variant is not None else model.platform,
            inputs=meta(sig.inputs),
            outputs=meta(sig.outputs),
        )

    async def ModelConfig(self, request, context):
        model, variant = self._ready_model(request.name, request.version)
        sig = model.signature
        assert sig is not None
        integers = model.integer_versions(variant)
        config = mc.ModelConfig(
            name=model.name,
            platform=variant.platform if variant is not None else model.platform,
            backend=variant.backend_name if variant is not None else model.backend_name,
            version_policy=mc.ModelVersionPolicy(
                specific=mc.ModelVersionPolicy.Specific(versions=integers)
            )
            if integers
            else None,
            max_batch_size=sig.max_batch_size,
            input=[
                mc.ModelInput(name=s.name, data_type=_triton_type(s.datatype), dims=sig.dims(s))
                for s in sig.inputs
            ],
            output=[
                mc.ModelOutput(name=s.name, data_type=_triton_type(s.datatype), dims=sig.dims(s))
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
            versions = model.statistics_versions()
            if request.version and request.version not in versions:
                # Pinned by a name: answered under the name asked for.
                versions = {request.version: (model.variant(request.version).name,)}
            elif request.version:
                versions = {request.version: versions[request.version]}
            wanted = {model.name: versions}
        else:
            wanted = {name: m.statistics_versions() for name, m in self.repository.models.items()}
        self.pipeline.telemetry.flush()  # the requests answered so far, all counted
        return self.statistics.report(wanted)

    # -- inference ------------------------------------------------------------------------
    async def serve(
        self,
        model: str,
        decode: Callable[[], InferenceRequest],
        encode: Callable[[InferenceResponse], R],
        metadata: Mapping[str, str],
        deadline: float | None,
        stream: bool = False,
    ) -> tuple[R, str]:
        """One inference request, from either front end: admit and measure it, ``decode`` it
        (the front end's decoder: protobuf or the native hand-over), serve it through the
        pipeline, ``encode`` the reply. ``deadline`` is the call's, in ``time.monotonic()``
        time; a streamed request's ``timeout`` parameter narrows it. Returns the encoded
        reply and the variant that served it; raises what the pipeline raises."""
        pipeline = self.pipeline
        if pipeline.admission.holding:  # the drain's last moment: see Gateway.stop
            await pipeline.admission.held()
        with pipeline.call(model) as trace:
            request = decode()
            request.metadata = metadata
            if stream and TIMEOUT_PARAMETER in request.parameters:
                deadline = stream_deadline(request.parameters[TIMEOUT_PARAMETER], deadline)
            trace.decoded()
            response = await pipeline.infer(request, deadline, trace)
            trace.encoding()
            reply = encode(response)
        return reply, response.variant

    async def _infer(
        self, msg: pb.ModelInferRequest, context: grpc.aio.ServicerContext, stream: bool = False
    ) -> tuple[pb.ModelInferResponse, str]:
        """One ModelInfer, unary or streamed, through ``serve``."""
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        return await self.serve(
            msg.model_name,
            lambda: codec.decode_request(msg, self._max_elements),
            codec.encode_response,
            _CallMetadata(context),
            deadline,
            stream,
        )

    async def ModelInfer(self, request, context):
        reply, variant = await self._infer(request, context)
        context.set_trailing_metadata(((VARIANT_METADATA_KEY, variant), *self._worker_metadata))
        return reply

    async def ModelStreamInfer(self, request_iterator, context):
        """Bidirectional stream of ModelInfer requests (Triton's message types).

        Requests are served concurrently, up to ``STREAM_WINDOW`` at a time per stream, and
        replies are sent as they complete; each carries the request's ``id``. Every request
        gets exactly one reply: a failed one answers with ``error_message`` ("CODE: message",
        the status a unary call would get) and the stream goes on, as in Triton. A request's
        ``timeout`` parameter (microseconds) is its deadline within the stream's.
        """
        replies: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        window = asyncio.Semaphore(STREAM_WINDOW)
        tasks: set[asyncio.Task[None]] = set()
        ending = False  # the drain asked this stream to end once nothing is in flight

        def end_when_idle() -> None:
            nonlocal ending
            ending = True
            if not tasks:
                reader.cancel()

        async def serve_one(request: pb.ModelInferRequest) -> None:
            try:
                served, _ = await self._infer(request, context, stream=True)
                reply = pb.ModelStreamInferResponse(infer_response=served)
            except Exception as e:
                reply = pb.ModelStreamInferResponse(
                    error_message=stream_error(e),
                    infer_response=pb.ModelInferResponse(
                        model_name=request.model_name,
                        model_version=request.model_version,
                        id=request.id,
                    ),
                )
            finally:
                window.release()
            await replies.put(reply)
            if ending and tasks <= {asyncio.current_task()}:
                reader.cancel()  # the last reply is queued: end the stream for the drain

        async def read_all() -> None:
            try:
                async for request in request_iterator:
                    await window.acquire()
                    task = asyncio.create_task(serve_one(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if tasks:
                    await asyncio.gather(*tasks)
            except asyncio.CancelledError:
                if not ending:
                    raise
            finally:
                await replies.put(None)

        reader = asyncio.create_task(read_all())
        self._open_streams.add(end_when_idle)
        if self._draining:
            end_when_idle()
        try:
            while (reply := await replies.get()) is not None:
                yield reply
            await reader  # surfaces a broken request stream
        finally:
            self._open_streams.discard(end_when_idle)
            reader.cancel()

    def end_streams(self) -> None:
        """The drain begins: every open ModelStreamInfer ends (OK) as soon as it has no
        request in flight, so that an idle stream does not hold the stopping server for
        the whole drain timeout; its client reconnects, elsewhere."""
        self._draining = True
        for end_when_idle in list(self._open_streams):
            end_when_idle()

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
                alias = model.alias(v.name)
                if alias is not None:  # listed under its integer too, for Triton's tools
                    about = f"version {alias} of variant '{v.name}'"
                    reason = f"{about}: {v.reason}" if v.reason else about
                    entries.append(Index(name=name, version=alias, state=v.state, reason=reason))
        return pb.RepositoryIndexResponse(models=entries)

    async def RepositoryModelLoad(self, request, context):
        check_model_name(request.model_name)
        model = await self.repository.load(request.model_name)
        if not model.ready:
            reasons = model.reason or "; ".join(
                f"{v.name}: {v.reason}" for v in model.variants.values()
            )
            raise LoadFailed(f"failed to load model '{request.model_name}': {reasons}")
        self._models_changed()
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        check_model_name(request.model_name)
        await self.repository.unload(request.model_name)
        self._models_changed()
        return pb.RepositoryModelUnloadResponse()


class _CallMetadata(Mapping[str, str]):
    """The call's text metadata (sticky routing keys may travel there), read from gRPC only
    when routing asks for it: most requests never do."""

    __slots__ = ("_context", "_items")

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self._context = context
        self._items: dict[str, str] | None = None

    def _load(self) -> dict[str, str]:
        if self._items is None:
            pairs = self._context.invocation_metadata() or ()
            self._items = {k: v for k, v in pairs if isinstance(v, str)}
        return self._items

    def __getitem__(self, key: str) -> str:
        return self._load()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._load())

    def __len__(self) -> int:
        return len(self._load())


def _triton_type(datatype: str | None) -> int:
    """model_config.proto's DataType for an OIP datatype name."""
    return mc.DataType.Value(by_name(datatype).triton)  # type: ignore[arg-type]


class LoadFailed(TensorgateError):
    code = grpc.StatusCode.FAILED_PRECONDITION


#: The protocol's name for each kind of decoded parameter value, for messages.
_PARAMETER_KINDS = ((bool, "bool_param"), (int, "int64_param"), (float, "double_param"),
                    (str, "string_param"))  # fmt: skip


def stream_deadline(micros: object, deadline: float | None) -> float | None:
    """A stream request's deadline: now + its ``timeout`` parameter (microseconds; 0: none),
    within the stream's own ``deadline``."""
    if isinstance(micros, bool) or not isinstance(micros, int):
        kind = next((k for t, k in _PARAMETER_KINDS if isinstance(micros, t)), None)
        raise InvalidInput(
            f"request parameter '{TIMEOUT_PARAMETER}' is the request's timeout in "
            f"microseconds and must be int64_param or uint64_param, not {kind}"
        )
    if micros <= 0:
        return deadline
    own = time.monotonic() + micros / 1e6
    return own if deadline is None else min(own, deadline)


def stream_error(error: Exception) -> str:
    """A failed streamed request's ``error_message``: "CODE: message", the status a unary
    call would end with (the stream itself goes on, as in Triton)."""
    code, message = status_of(error, "ModelStreamInfer")
    return f"{code.name}: {message}"
