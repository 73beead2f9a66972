"""The request pipeline: decode -> route -> validate -> schedule -> run -> encode, timed.

The servicer hands it a ModelInferRequest and gets a ModelInferResponse back; every stage
in between works on the internal types, and every measurement lands in ``Metrics``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from tensorgate import codec
from tensorgate.datatypes import by_name
from tensorgate.errors import (
    BackendFailed,
    DeadlineExceeded,
    InvalidInput,
    ModelNotReady,
    Overloaded,
    TensorgateError,
    Unavailable,
)
from tensorgate.inference import InferenceRequest, InferenceResponse, OutputTensor
from tensorgate.protos import grpc_service_pb2 as pb

from .admission import Admission
from .metrics import UNKNOWN_MODEL, Telemetry, Trace
from .repository import Model, Repository, Variant
from .router import Plan, Router, compare_outputs
from .scheduler import Timings
from .signature import validate_inputs

log = logging.getLogger(__name__)

#: Mirrored requests in flight per shadow variant, at most (and at most half its queue).
SHADOW_MAX_INFLIGHT = 32
#: Outputs larger than this (elements) are compared off the event loop.
SHADOW_INLINE_ELEMENTS = 1 << 16
#: A shadow whose worst difference grows beyond this is logged as a warning.
SHADOW_LOG_ABOVE = 1e-4


@dataclass
class Served:
    """A reply and which variant produced it."""

    message: pb.ModelInferResponse
    variant: str


class Pipeline:
    def __init__(
        self,
        repository: Repository,
        router: Router,
        telemetry: Telemetry,
        admission: Admission | None = None,
        max_tensor_elements: int = codec.MAX_ELEMENTS,
    ) -> None:
        self.repository = repository
        self.router = router
        self.telemetry = telemetry
        self.metrics = telemetry.metrics
        # Server-wide in-flight limit and drain (--max-inflight, SIGTERM).
        self.admission = admission if admission is not None else Admission()
        self.max_tensor_elements = max_tensor_elements  # --max-tensor-elements
        self._shadow_tasks: set[asyncio.Task[None]] = set()

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
            with self.admission.admit():
                request = codec.decode_request(msg, self.max_tensor_elements)
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
            plan = self.router.plan(model, request)
            trace.variant = plan.primary
            trace.backend = model.variants[plan.primary].backend_name
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
                variant, outputs = await self._run(
                    model, plan, inputs, wanted or None, deadline, trace
                )
            except Unavailable:
                # The variant was swapped out by a reload between lookup and submit: the
                # new one is already in place, so try once more.
                if attempt == 0 and self.repository.models.get(request.model) is not model:
                    continue
                raise
            shadows = self.router.shadows(self.router.state(model).policy, variant.name)
            if shadows:
                self._mirror(model, variant.name, shadows, inputs, wanted or None, outputs)
            return self._outputs(model, variant, request, outputs)
        raise AssertionError("unreachable")

    async def _run(
        self,
        model: Model,
        plan: Plan,
        inputs: Mapping[str, np.ndarray],
        wanted: list[str] | None,
        deadline: float | None,
        trace: Trace,
    ) -> tuple[Variant, dict[str, np.ndarray]]:
        """Try the plan's variants in order until one answers; the trace names the last one
        tried and records each hand-over. Raises the last variant's error (its message
        lists what happened before) or DeadlineExceeded when no time is left to fall back.
        Invalid input, cancellation and an expired deadline are never retried."""
        state = self.router.state(model)
        candidates = plan.candidates
        earlier: list[str] = []
        for i, name in enumerate(candidates):
            last = i == len(candidates) - 1
            variant = model.variants[name]
            trace.variant, trace.backend = variant.name, variant.backend_name
            breaker = state.breakers[name]
            error: TensorgateError
            if not variant.ready or variant.scheduler is None:
                reason = "not_ready"
                error = ModelNotReady(
                    f"model '{model.name}' version '{name}' is not ready: "
                    f"{variant.reason or variant.state.value}"
                )
            elif not last and not breaker.allow():
                # An open circuit only diverts traffic when there is somewhere to go: the
                # last candidate is always tried, since a likely failure beats a certain one.
                reason = "circuit_open"
                error = Unavailable(
                    f"variant {model.name}/{name}: circuit open after "
                    f"{breaker.consecutive_failures} consecutive failures, next probe in "
                    f"{breaker.retry_in():.1f} s"
                )
            else:
                asked = not last  # allow() was called: an outcome must be reported
                if i > 0 and deadline is not None and time.monotonic() >= deadline:
                    if asked:
                        breaker.release()
                    raise DeadlineExceeded(
                        f"model '{model.name}': the deadline passed before fallback variant "
                        f"'{name}' could be tried; {'; '.join(earlier)}"
                    )
                attempt = variant.scheduler.submit(inputs, wanted, deadline, trace.timings)
                limit = None if last else state.policy.attempt_timeout_s
                try:
                    outputs = await (
                        asyncio.wait_for(attempt, limit) if limit is not None else attempt
                    )
                except TimeoutError:
                    # Only our own attempt limit raises this: the caller's deadline is the
                    # scheduler's (DeadlineExceeded). Cancelling the attempt frees its queue
                    # slot, or lets its result be dropped if it is computing.
                    breaker.failure()
                    state.counts[name].failed += 1
                    reason = "timeout"
                    error = Unavailable(
                        f"variant {model.name}/{name} did not answer within the "
                        f"{limit * 1e3:g} ms attempt timeout"
                    )
                except BackendFailed as e:
                    breaker.failure()
                    state.counts[name].failed += 1
                    reason, error = "error", e
                except Unavailable as e:
                    if self.repository.models.get(model.name) is not model:
                        if asked:
                            breaker.release()
                        raise  # reloaded meanwhile: _infer retries on the new model
                    breaker.failure()
                    state.counts[name].failed += 1
                    reason, error = "unavailable", e
                except Overloaded as e:
                    # A full queue says nothing about the variant's health: spill over to
                    # the fallback without counting a failure.
                    if asked:
                        breaker.release()
                    reason, error = "overloaded", e
                except BaseException:
                    if asked:
                        breaker.release()
                    raise
                else:
                    breaker.success()
                    counts = state.counts[name]
                    counts.served += 1
                    counts.as_fallback += i > 0
                    return variant, outputs
            if last:
                if earlier:
                    error.args = (f"{error}; before that: {'; '.join(earlier)}",)
                raise error
            trace.fallbacks.append((name, candidates[i + 1], reason))
            earlier.append(f"{name}: {reason}: {error}")
        raise AssertionError("unreachable")

    def _mirror(
        self,
        model: Model,
        served: str,
        shadows: tuple[str, ...],
        inputs: Mapping[str, np.ndarray],
        wanted: list[str] | None,
        outputs: dict[str, np.ndarray],
    ) -> None:
        """Send the request to each shadow variant in the background, after the reply."""
        for name in shadows:
            task = asyncio.create_task(
                self._shadow(model, served, name, inputs, wanted, outputs),
                name=f"shadow-{model.name}-{name}",
            )
            self._shadow_tasks.add(task)  # keep a reference until it finishes
            task.add_done_callback(self._shadow_tasks.discard)

    async def _shadow(
        self,
        model: Model,
        served: str,
        name: str,
        inputs: Mapping[str, np.ndarray],
        wanted: list[str] | None,
        outputs: dict[str, np.ndarray],
    ) -> None:
        """Run one mirrored request and compare; never raises (no caller is waiting)."""
        state = self.router.state(model)
        stats = state.shadow(served, name)
        labels = (model.name, served, name)
        variant = model.variants.get(name)
        # Mirrors may take at most half of the shadow's queue, so that they can never
        # crowd out the requests that variant serves itself.
        limit = max(1, min(SHADOW_MAX_INFLIGHT, model.config.instances.max_queue_size // 2))
        if (
            variant is None
            or variant.scheduler is None
            or not variant.ready
            or state.shadow_inflight.get(name, 0) >= limit
        ):
            stats.dropped += 1
            self.metrics.shadow_requests.labels(*labels, "dropped").inc()
            return
        state.shadow_inflight[name] = state.shadow_inflight.get(name, 0) + 1
        try:
            result = await variant.scheduler.submit(inputs, wanted, None, Timings())
            if sum(a.size for a in outputs.values()) > SHADOW_INLINE_ELEMENTS:
                divergence = await asyncio.to_thread(compare_outputs, outputs, result)
            else:
                divergence = compare_outputs(outputs, result)
        except (Overloaded, Unavailable):
            stats.dropped += 1
            self.metrics.shadow_requests.labels(*labels, "dropped").inc()
            return
        except Exception as e:
            stats.failed += 1
            self.metrics.shadow_requests.labels(*labels, "failed").inc()
            log.debug("shadow %s/%s failed: %s", model.name, name, e)
            return
        finally:
            state.shadow_inflight[name] -= 1
        diff = divergence.max_abs_diff
        stats.compared += 1
        stats.argmax_rows += divergence.argmax_rows
        stats.argmax_agree += divergence.argmax_agree
        m = self.metrics
        m.shadow_requests.labels(*labels, "compared").inc()
        m.shadow_max_abs_diff.labels(*labels).observe(diff)
        if divergence.argmax_rows:
            m.shadow_argmax_agreement.labels(*labels, "true").inc(divergence.argmax_agree)
            m.shadow_argmax_agreement.labels(*labels, "false").inc(
                divergence.argmax_rows - divergence.argmax_agree
            )
        if diff > stats.worst_abs_diff:
            stats.worst_abs_diff = diff
            # Logged only when a pair's worst case grows, so the log stays short.
            log.log(
                logging.WARNING if diff > SHADOW_LOG_ABOVE else logging.DEBUG,
                "shadow %s/%s differs from %s by up to %.3g (output '%s', arg-max agrees on "
                "%d of %d rows): the largest difference of this pair so far",
                model.name,
                name,
                served,
                diff,
                divergence.output,
                divergence.argmax_agree,
                divergence.argmax_rows,
            )

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
