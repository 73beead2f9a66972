"""The request pipeline: decode -> route -> validate -> schedule -> run -> encode, timed.

The servicer hands it a ModelInferRequest and gets a ModelInferResponse back; every stage
in between works on the internal types, and every measurement lands in ``Metrics``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from tensorgate.backends.datatypes import by_name
from tensorgate.protos import grpc_service_pb2 as pb

from . import codec
from .errors import BackendFailed, InvalidInput, ModelNotReady, TensorgateError, Unavailable
from .metrics import UNKNOWN_MODEL, Telemetry, Trace
from .repository import Model, Repository, Variant
from .router import Router
from .signature import validate_inputs
from .types import InferenceRequest, InferenceResponse, OutputTensor


@dataclass
class Served:
    """A reply and which variant produced it."""

    message: pb.ModelInferResponse
    variant: str


class Pipeline:
    def __init__(self, repository: Repository, router: Router, telemetry: Telemetry) -> None:
        self.repository = repository
        self.router = router
        self.telemetry = telemetry
        self.metrics = telemetry.metrics

    async def model_infer(
        self,
        msg: pb.ModelInferRequest,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> Served:
        """Serve one ModelInfer. ``timeout`` is the caller's remaining time in seconds.

        Raises a TensorgateError subclass (mapped to a gRPC status by the interceptor).
        """
        trace = Trace(
            start=time.perf_counter(),
            model=msg.model_name if msg.model_name in self.repository.models else UNKNOWN_MODEL,
        )
        deadline = time.monotonic() + timeout if timeout is not None else None
        inflight = self.metrics.inflight.labels(trace.model)
        inflight.inc()
        try:
            request = codec.decode_request(msg)
            trace.decode = time.perf_counter() - trace.start
            if metadata:
                request.metadata = dict(metadata)
            response = await self._infer(request, deadline, trace)
            encode_start = time.perf_counter()
            reply = codec.encode_response(response)
            trace.end = time.perf_counter()
            trace.encode = trace.end - encode_start
        except TensorgateError as e:
            self.telemetry.failed(trace, e.code.name)
            raise
        except asyncio.CancelledError:
            self.telemetry.failed(trace, "CANCELLED")
            raise
        except Exception:
            self.telemetry.failed(trace, "INTERNAL")
            raise
        finally:
            inflight.dec()
        self.telemetry.succeeded(trace)
        return Served(reply, trace.variant)

    async def _infer(
        self, request: InferenceRequest, deadline: float | None, trace: Trace
    ) -> InferenceResponse:
        for attempt in range(2):
            model = self.repository.get(request.model)
            if model.signature is None or not model.ready:
                raise ModelNotReady(
                    f"model '{model.name}' is not ready: {model.reason or 'no ready variant'}"
                )
            variant = self.router.choose(model, request)
            trace.variant, trace.backend = variant.name, variant.backend_name
            inputs = validate_inputs(model.name, model.signature, request.inputs)
            wanted = request.requested_outputs
            for name in wanted:
                if name not in model.signature.output_names:
                    raise InvalidInput(
                        f"model '{model.name}' has no output '{name}'; its outputs are "
                        f"{list(model.signature.output_names)}"
                    )
            if model.signature.max_batch_size > 0 and request.inputs:
                trace.rows = request.inputs[0].shape[0]
            try:
                outputs = await variant.scheduler.submit(  # type: ignore[union-attr]
                    inputs, wanted or None, deadline, trace.timings
                )
            except Unavailable:
                # The variant was swapped out by a reload between lookup and submit: the
                # new one is already in place, so try once more.
                if attempt == 0 and self.repository.models.get(request.model) is not model:
                    continue
                raise
            return self._outputs(model, variant, request, outputs)
        raise AssertionError("unreachable")

    @staticmethod
    def _outputs(
        model: Model, variant: Variant, request: InferenceRequest, outputs: dict[str, np.ndarray]
    ) -> InferenceResponse:
        sig = model.signature
        assert sig is not None
        names = request.requested_outputs or list(sig.output_names)
        result: list[OutputTensor] = []
        for spec in sig.outputs:
            if spec.name not in names:
                continue
            arr = outputs.get(spec.name)  # type: ignore[arg-type]
            if arr is None:
                raise BackendFailed(
                    f"variant {model.name}/{variant.name} returned no output '{spec.name}'"
                )
            want = by_name(spec.datatype).numpy  # type: ignore[arg-type]
            if spec.datatype != "BYTES" and arr.dtype != want:
                arr = arr.astype(want)
            result.append(OutputTensor(spec.name, spec.datatype, arr))  # type: ignore[arg-type]
        return InferenceResponse(model.name, variant.name, request.id, result)
