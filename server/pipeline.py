"""The request pipeline: admit -> look up -> validate -> route -> outputs, timed.

The servicer decodes a request into the internal types, calls ``infer`` inside ``call``
(which admits and measures it) and encodes the reply; the pipeline never sees protobuf.
Every routing decision (variant, fallback, breaker, shadow) is the router's.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

from tensorgate.datatypes import by_name
from tensorgate.errors import BackendFailed, InvalidInput, ModelNotReady, TensorgateError
from tensorgate.inference import InferenceRequest, InferenceResponse, OutputTensor

from .admission import Admission
from .metrics import UNKNOWN_MODEL, Telemetry, Trace
from .repository import Model, Repository
from .router import Router
from .scheduler import Retired
from .signature import validate_inputs


class Call:
    """One inference call's admission and measurement (``Pipeline.call``). A class, not a
    generator context manager: this runs twice per request, where each microsecond shows."""

    __slots__ = ("_pipeline", "trace")

    def __init__(self, pipeline: Pipeline, model: str) -> None:
        self._pipeline = pipeline
        self.trace = Trace(
            start=time.perf_counter(),
            model=model if model in pipeline.repository.models else UNKNOWN_MODEL,
        )

    def __enter__(self) -> Trace:
        telemetry = self._pipeline.telemetry
        telemetry.entered(self.trace.model)
        try:
            self._pipeline.admission.enter()
        except TensorgateError as e:
            telemetry.left(self.trace.model)
            telemetry.failed(self.trace, e.code.name)
            raise
        return self.trace

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, _tb) -> None:
        pipeline = self._pipeline
        pipeline.admission.leave()
        pipeline.telemetry.left(self.trace.model)
        if error is None:
            self.trace.finished()
            pipeline.telemetry.succeeded(self.trace)
        elif isinstance(error, TensorgateError):
            pipeline.telemetry.failed(self.trace, error.code.name)
        elif isinstance(error, asyncio.CancelledError):
            pipeline.telemetry.failed(self.trace, "CANCELLED")
        else:
            pipeline.telemetry.failed(self.trace, "INTERNAL")


class Pipeline:
    def __init__(
        self,
        repository: Repository,
        router: Router,
        telemetry: Telemetry,
        admission: Admission | None = None,
    ) -> None:
        self.repository = repository
        self.router = router
        self.telemetry = telemetry
        self.metrics = telemetry.metrics
        # Server-wide in-flight limit and drain (--max-inflight, SIGTERM).
        self.admission = admission if admission is not None else Admission()

    def call(self, model: str) -> Call:
        """Admit one inference call for ``model`` and measure it, decode and encode
        included: the servicer runs its whole call inside ``with pipeline.call(name) as
        trace``. Raises Overloaded (in-flight limit) or Unavailable (draining) on entry;
        the call's outcome, success or the code of the error that leaves the block, goes
        to the metrics and statistics."""
        return Call(self, model)

    async def infer(
        self, request: InferenceRequest, deadline: float | None, trace: Trace
    ) -> InferenceResponse:
        """Serve one decoded request; ``deadline`` is the caller's, in ``time.monotonic()``
        time. Raises a TensorgateError subclass (mapped to a gRPC status in one place,
        ``interceptors.status_of``)."""
        for attempt in range(2):
            model = self.repository.get(request.model)
            if request.version:  # pinned: known before validation, so failures count there
                pinned = model.variant(request.version)
                trace.variant, trace.backend = pinned.name, pinned.backend_name
            if model.signature is None or not model.ready:
                raise ModelNotReady(
                    f"model '{model.name}' is not ready: {model.reason or 'no ready variant'}"
                )
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
                variant, outputs = await self.router.infer(
                    model, request, inputs, wanted or None, deadline, trace
                )
            except Retired:
                # The model was replaced by a reload between lookup and submit: the new one
                # is already in place, so try once more.
                if attempt == 0 and self.repository.models.get(request.model) is not model:
                    continue
                raise
            return self._outputs(model, variant, request, outputs)
        raise AssertionError("unreachable")

    @staticmethod
    def _outputs(
        model: Model, variant: str, request: InferenceRequest, outputs: dict[str, np.ndarray]
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
                    f"variant {model.name}/{variant} returned no output '{spec.name}'"
                )
            want = by_name(spec.datatype).numpy  # type: ignore[arg-type]
            if spec.datatype != "BYTES" and arr.dtype != want:
                arr = arr.astype(want)
            result.append(OutputTensor(spec.name, spec.datatype, arr))  # type: ignore[arg-type]
        return InferenceResponse(model.name, variant, request.id, result)
