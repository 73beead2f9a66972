"""The gateway process: a gRPC front end (native or grpcio: server/frontends/) in front of
the shared servicers and pipeline, the metrics endpoint, the model repository, and orderly
start-up and shutdown.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time

from . import frontends, heap
from .admin import RoutingAdminServicer
from .admission import Admission
from .auth import TokenPolicy
from .credentials import CredentialWatcher
from .frontends import FrontEnd, Services
from .frontends.grpcio import INFERENCE_SERVICE
from .metrics import Metrics, Telemetry
from .metrics_http import MetricsServer, start_metrics
from .pipeline import Pipeline
from .polling import RepositoryPoller
from .repository import Repository
from .rollouts import Rollouts
from .router import Router
from .servicer import InferenceServicer
from .settings import ServerSettings
from .statistics import Statistics
from .writelock import wait_until_written

log = logging.getLogger(__name__)

#: Seconds the drain holds new calls after the last accepted one finished, before the gRPC
#: server stops (then they are refused with UNAVAILABLE).
DRAIN_LINGER = 0.5
#: Seconds between the start of the gRPC server's stop (GOAWAY sent, port closed) and the
#: refusal of the calls held meanwhile.
STOP_SETTLE = 0.05


class Gateway:
    """One gateway process. ``start()`` binds and loads; ``stop()`` drains and exits."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.statistics = Statistics()
        self.repository = Repository(settings.repository, self.metrics)
        circuit = self.metrics.circuit_state
        self.router = Router(
            on_circuit_change=lambda model, variant, backend, state: circuit.labels(
                model, variant, backend
            ).set(state),
            metrics=self.metrics,
        )
        self.rollouts = Rollouts(self.repository, self.router, self.metrics, settings.state_dir)
        self.admission = Admission(settings.max_inflight)
        self.pipeline = Pipeline(
            self.repository,
            self.router,
            Telemetry(self.metrics, self.statistics),
            admission=self.admission,
        )
        self.ready = False
        self.draining = False
        self.grpc_port = 0
        self.metrics_port: int | None = None
        self.front_end: FrontEnd | None = None
        self._metrics_server: MetricsServer | None = None
        self.credentials: CredentialWatcher | None = None
        self._credentials_task: asyncio.Task[None] | None = None
        self._poller = (
            RepositoryPoller(
                self.repository, settings.poll_interval, self.model_health_changed_async
            )
            if settings.poll_interval
            else None
        )
        self._poll_task: asyncio.Task[None] | None = None
        self._enough: bool | None = None  # require_models met, as last reported
        self._gc_thresholds: tuple[int, int, int] | None = None  # before heap.configure

    async def start(self) -> None:
        s = self.settings
        kind = frontends.resolve(s.front_end)
        inference = InferenceServicer(
            self.repository,
            self.pipeline,
            self.statistics,
            is_ready=self.serving,
            models_changed=self.model_health_changed,
            max_tensor_elements=s.max_tensor_elements,
            worker_index=s.worker_index,
        )
        tokens = TokenPolicy(s.auth_token, s.admin_token)  # replaced in place on reloads
        services = Services(
            settings=s,
            inference=inference,
            admin=RoutingAdminServicer(self.repository, self.router, self.rollouts),
            tokens=tokens,
        )
        front_end = frontends.build(kind, services)
        await front_end.start()
        self.front_end = front_end
        self.grpc_port = front_end.port
        log.info("front end: %s", front_end.name)
        await self._set_health(False)
        self._metrics_server = metrics = start_metrics(self.metrics.registry, s)
        if metrics is not None:
            self.metrics_port = metrics.port
        self._watch_credentials(tokens, front_end, metrics)
        started = time.perf_counter()
        await wait_until_written(self.repository.root)  # health NOT_SERVING meanwhile
        if self._poller is not None:
            self._poller.prime()  # changes made while loading are picked up by the first poll
        await self.repository.load_all()
        self._gc_thresholds = heap.configure()  # heap.settle() follows, just below
        self.rollouts.open()
        self.ready = True
        await self.model_health_changed_async()
        if self._poller is not None:
            self._poll_task = asyncio.create_task(self._poller.run(), name="repository-poll")
        log.info(
            "tensorgate serving gRPC on %s:%d, metrics on %s, %d model(s) loaded in %.1f s",
            s.host,
            self.grpc_port,
            f"{metrics.scheme}://{s.metrics_host or s.host}:{self.metrics_port}/metrics"
            if metrics is not None
            else "(off)",
            sum(m.ready for m in self.repository.models.values()),
            time.perf_counter() - started,
        )
        if s.port_file is not None:
            tmp = s.port_file.with_suffix(".tmp")
            tmp.write_text(
                json.dumps({"grpc_port": self.grpc_port, "metrics_port": self.metrics_port})
            )
            tmp.replace(s.port_file)

    def _watch_credentials(
        self, tokens: TokenPolicy, front_end: FrontEnd, metrics: MetricsServer | None
    ) -> None:
        """Re-read the token and TLS files on SIGHUP and when they change
        (server/credentials.py): the token policy is replaced in place (front ends read it
        per call), the front end takes new TLS material for its next handshakes."""
        self.credentials = CredentialWatcher(
            self.settings,
            on_tokens=tokens.replace if tokens.enabled else None,
            on_tls=lambda m: front_end.reload_tls(m.cert_chain, m.private_key, m.client_ca),
            on_metrics_token=metrics.set_token if metrics is not None else None,
            on_metrics_tls=metrics.set_tls if metrics is not None else None,
        )
        self._credentials_task = asyncio.create_task(self.credentials.run(), name="credentials")

    def serving(self) -> bool:
        """ServerReady: started, not draining, and ``--require-models`` ready (as health)."""
        ready = sum(m.ready for m in self.repository.models.values())
        return self.ready and not self.draining and ready >= self.settings.require_models

    def reload_credentials(self) -> None:
        """SIGHUP: re-read the credential files now (they are also polled)."""
        if self.credentials is not None:
            self.credentials.reload()

    async def _set_health(self, serving: bool) -> None:
        assert self.front_end is not None
        await self.front_end.set_health("", serving)
        await self.front_end.set_health(INFERENCE_SERVICE, serving)

    async def model_health_changed_async(self) -> None:
        """Per-model health entries: a model name is SERVING while it has a ready variant.
        The server's own entry is SERVING once started, while ``require_models`` are ready."""
        if self.front_end is None:
            return
        if self.ready:
            heap.settle()  # models were loaded or unloaded: see server/heap.py
        for name, model in self.repository.models.items():
            await self.front_end.set_health(name, model.ready and not self.draining)
        if not self.ready or self.draining:
            return
        ready = sum(m.ready for m in self.repository.models.values())
        enough = ready >= self.settings.require_models
        if not enough and self._enough is not False:
            log.error(
                "%d model(s) ready, fewer than --require-models %d: health NOT_SERVING until "
                "enough are loaded (RepositoryModelLoad, or --poll-interval)",
                ready,
                self.settings.require_models,
            )
        self._enough = enough
        await self._set_health(enough)

    def model_health_changed(self) -> None:
        asyncio.get_running_loop().create_task(self.model_health_changed_async())

    async def stop(self, grace: float | None = None) -> None:
        """Drain: health NOT_SERVING, new inference calls refused with UNAVAILABLE, accepted
        ones finish (at most ``grace`` seconds, default ``--drain-timeout``), then the gRPC
        server stops and the models are unloaded."""
        grace = self.settings.drain_timeout if grace is None else grace
        until = time.monotonic() + grace
        self.draining = True
        self.ready = False
        inflight = self.admission.start_draining()
        if self.front_end is not None:
            self.front_end.end_streams()
        log.info("draining: %d inference request(s) in flight, up to %.1f s", inflight, grace)
        if self.front_end is not None:
            await self._set_health(False)
            await self.model_health_changed_async()
            await self.front_end.enter_graceful_shutdown()  # no later set() turns it back on
        for task in (self._poll_task, self._credentials_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await self.rollouts.close()
        if not await self.admission.wait_idle(grace):
            log.warning(
                "drain timeout: %d inference request(s) still in flight are cancelled",
                self.admission.inflight,
            )
        else:
            # Callers that get "draining" retry at once, so gRPC's core always holds a few
            # calls it has not handed to us yet, and stopping the server cancels those
            # (CANCELLED, which clients do not retry). So for a moment new calls are held
            # instead: each caller's latest call then waits in a handler, none in the core.
            self.admission.hold_arrivals()
            await asyncio.sleep(min(DRAIN_LINGER, max(0.0, until - time.monotonic())))
        if self.front_end is not None:
            # Stopping sends GOAWAY and closes the port: callers' next calls are refused
            # with UNAVAILABLE by their own channel. Then the held calls are answered
            # "draining", and other calls (metadata, repository, open streams) get what
            # time is left.
            stopping = asyncio.create_task(self.front_end.stop(max(0.0, until - time.monotonic())))
            await asyncio.sleep(STOP_SETTLE)
            self.admission.release_held()
            await stopping
        else:
            self.admission.release_held()
        self.pipeline.telemetry.flush()
        await self.repository.close()
        if self._metrics_server is not None:
            self._metrics_server.close()
        if self._gc_thresholds is not None:
            heap.restore(self._gc_thresholds)
            self._gc_thresholds = None

    async def wait(self) -> None:
        assert self.front_end is not None
        await self.front_end.wait()


async def serve(settings: ServerSettings) -> None:
    """Run a gateway until SIGTERM/SIGINT, then drain and return."""
    gateway = Gateway(settings)
    loop = asyncio.get_running_loop()
    log.info("event loop: %s.%s", type(loop).__module__, type(loop).__name__)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, gateway.reload_credentials)
    try:
        await gateway.start()
    except BaseException:  # e.g. an interrupted repository write: close what did start
        await gateway.stop(grace=0)
        raise
    await stop.wait()
    log.info("signal received: draining (up to %.0f s)", settings.drain_timeout)
    await gateway.stop()
    log.info("stopped")
