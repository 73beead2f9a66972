"""Rollouts run inside the server (``tensorgate rollout``; rules in ``rollout.py``).

The process that receives StartRollout **leads** the rollout: a task on its event loop
that, every ``TICK_S``, reads the current phase's window, judges the gates, and moves to
the next phase, to ``promoted`` or back. It goes on when the client that started it has
gone. Routing changes are ``RouteState`` policies, the same as SetRoute's.

Under ``serve --workers N`` an admin call lands on one worker, so the workers share each
rollout through files in the supervisor's state directory (``settings.state_dir``,
``rollouts/``):

- ``MODEL.json``, the leader's record: the rollout's status, rewritten every tick. Every
  other worker **follows** it: applies the same phase's routing on top of its own routing
  from before, restores that routing on ``rolled_back``, makes the candidate its default
  on ``promoted``, and answers GetRollout from it.
- ``ID/PID.json``: each follower's numbers for the current phase; the leader sums them
  with its own, so the gates read every worker's requests.
- ``ID/abort``: an AbortRollout that landed on a follower; the leader acts on it.

A follower whose leader stops writing for ``STALE_S`` (it died) restores its routing.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import secrets
import time
from pathlib import Path

import grpc

from tensorgate.errors import InvalidInput, TensorgateError

from .metrics import Metrics
from .policy import RouteError, validate_policy
from .repository import Repository
from .rollout import (
    PROMOTED,
    ROLLED_BACK,
    RUNNING,
    SHADOW,
    STATES,
    STEP,
    Gate,
    Settings,
    Status,
    VariantStatus,
    Window,
    breach,
    judge,
    phase_done,
    phase_policy,
    quantile,
    serving_now,
)
from .rollout_local import LocalRollout, write_default_variant, write_json
from .router import Router

log = logging.getLogger(__name__)

TICK_S = 0.2
#: A leader that has not rewritten its record for this long is taken for dead.
STALE_S = 10.0
#: How long an AbortRollout on a follower waits for the leader to act.
ABORT_WAIT_S = 5.0


class RolloutRefused(TensorgateError):
    """A rollout that cannot start or stop now (FAILED_PRECONDITION)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class NoRollout(TensorgateError):
    """No such variant, or no rollout on the model (NOT_FOUND)."""

    code = grpc.StatusCode.NOT_FOUND


class Rollouts:
    """Every rollout of this process: those it leads and, with ``shared``, those it
    follows. ``open()`` on start-up, ``close()`` at shutdown."""

    def __init__(
        self, repository: Repository, router: Router, metrics: Metrics, shared: Path | None = None
    ) -> None:
        self.repository, self.router, self.metrics = repository, router, metrics
        self.dir = shared / "rollouts" if shared is not None else None
        self._led: dict[str, tuple[Status, LocalRollout]] = {}  # by model: the last one led here
        self._following: dict[str, tuple[str, LocalRollout]] = {}  # model -> (id, local)
        self._finished: set[str] = set()  # ids followed to their end
        self._tasks: set[asyncio.Task[None]] = set()

    def open(self) -> None:
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._spawn(self._follow_loop(), "rollout-follower")

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _spawn(self, coro, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the admin calls ---------------------------------------------------------------
    async def start(self, name: str, candidate: str, source: str, settings: Settings) -> Status:
        """Start a rollout led by this process. Raises NoRollout (unknown variant),
        InvalidInput (settings), RolloutRefused (candidate not ready, one running)."""
        model = self.repository.get(name)
        for variant in (candidate, source):
            if variant and variant not in model.variants:
                raise NoRollout(
                    f"model '{name}' has no variant '{variant}'; its variants are "
                    f"{sorted(model.variants)}"
                )
        settings.check()
        state = self.router.state(model)
        default = model.default_variant()
        source = (
            source
            or serving_now(state.policy, default.name if default else None, model.variants)
            or ""
        )
        if source == candidate:
            raise InvalidInput(
                f"--from and --to are both '{candidate}': roll out a variant other than the "
                "one serving now, or name --from"
            )
        running = self.running(name)
        if running is not None:
            raise RolloutRefused(
                f"a rollout of '{running.to_variant}' is already running on model '{name}' "
                f"({running.state}); wait for it to end or abort it: tensorgate rollout abort "
                f"{name}"
            )
        for variant, role in ((candidate, "candidate"), (source, "--from variant")):
            v = model.variants.get(variant)
            if not variant or v is None or not v.ready:
                raise RolloutRefused(
                    f"the {role} '{variant or '(none)'}' of model '{name}' is not ready"
                    + (f": {v.reason}" if v is not None and v.reason else "")
                )
        for check in (STEP, SHADOW):
            try:
                validate_policy(
                    phase_policy(
                        state.policy, check, 50.0, source, candidate, settings.shadow_fraction
                    ),
                    model.variants,
                )
            except RouteError as e:
                raise InvalidInput(f"the rollout's routing would be invalid: {e}") from None
        now = time.time()
        status = Status(
            model=name,
            id=secrets.token_hex(4),
            to_variant=candidate,
            from_variant=source,
            state=SHADOW,
            started=now,
            phase_started=now,
            settings=settings,
            message=f"shadow: mirroring {settings.shadow_fraction:.0%} of requests to {candidate}",
        )
        local = LocalRollout(self.metrics, model, state, source, candidate)
        self._fill(status, local, Window(), judge(settings, Window(), candidate, source))
        with self._shared_lock():
            other = self._record(name)  # another worker may have started one meanwhile
            if other is not None and other.state in RUNNING:
                raise RolloutRefused(
                    f"a rollout of '{other.to_variant}' is already running on model '{name}'"
                )
            self._led[name] = (status, local)
            self._publish(status, local)
        log.info(
            "rollout %s of %s/%s started (from %s): steps %s, gates: max |diff| %g, p99 ratio "
            "%g, error rate %g%s",
            status.id,
            name,
            candidate,
            source,
            list(settings.steps),
            settings.max_abs_diff,
            settings.max_p99_ratio,
            settings.max_error_rate,
            ""
            if settings.min_argmax_agreement is None
            else f", arg-max agreement {settings.min_argmax_agreement:g}",
        )
        self._spawn(self._lead(status, local), f"rollout-{name}")
        return status

    def get(self, name: str) -> Status:
        """The model's running rollout, else the last one that ended."""
        if self.dir is not None:
            self._follow_once()  # so that what this answers is what this worker applies
        led = self._led.get(name)
        record = self._record(name)
        if record is not None and (led is None or record.started > led[0].started):
            return record
        if led is None:
            raise NoRollout(f"no rollout on model '{name}' since the server started")
        return led[0]

    def running(self, name: str) -> Status | None:
        try:
            status = self.get(name)
        except NoRollout:
            return None
        return status if status.state in RUNNING else None

    async def abort(self, name: str) -> Status:
        """Abort the model's running rollout: its routing goes back at once."""
        status = self.running(name)
        if status is None:
            raise RolloutRefused(f"no rollout is running on model '{name}'")
        led = self._led.get(name)
        if led is not None and led[0].id == status.id:
            await self._end(led[0], led[1], "aborted", "aborted by an admin call")
            return led[0]
        assert self.dir is not None  # a rollout led by another worker
        (self._scratch(status.id) / "abort").touch()
        until = time.monotonic() + ABORT_WAIT_S
        while time.monotonic() < until:
            await asyncio.sleep(TICK_S / 2)
            self._follow_once()
            current = self.get(name)
            if current.state not in RUNNING:
                return current
        raise RolloutRefused(
            f"the worker leading rollout {status.id} did not answer the abort within "
            f"{ABORT_WAIT_S:g} s"
        )

    # -- leading -------------------------------------------------------------------------
    async def _lead(self, status: Status, local: LocalRollout) -> None:
        try:
            while status.state in RUNNING:
                await asyncio.sleep(TICK_S)
                if status.state not in RUNNING:  # aborted meanwhile
                    break
                await self._tick(status, local)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # never leave the routing half-way
            log.exception("rollout %s of %s failed", status.id, status.model)
            await self._end(status, local, "internal error", f"internal error: {e}")

    async def _tick(self, status: Status, local: LocalRollout) -> None:
        s, name = status.settings, status.model
        if local.replaced(self.repository):
            await self._end(
                status,
                local,
                "model reloaded",
                "the model was reloaded or unloaded; its routing is config.toml's",
                restore=False,
            )
            return
        if self.dir is not None and (self._scratch(status.id) / "abort").exists():
            await self._end(status, local, "aborted", "aborted by an admin call")
            return
        candidate = local.model.variants[status.to_variant]
        if not candidate.ready:
            await self._end(
                status,
                local,
                "candidate not ready",
                f"{status.to_variant} is no longer ready: {candidate.reason}",
            )
            return
        window = self._window(status, local)
        gates = judge(s, window, status.to_variant, status.from_variant)
        self._fill(status, local, window, gates)
        broken = breach(gates)
        now = time.time()
        if broken is not None:
            relation = ">=" if broken.name.startswith("min_") else "<="
            await self._end(
                status,
                local,
                broken.name,
                f"gate {broken.name}: {broken.value:.4g}, not {relation} {broken.limit:g}",
            )
            return
        if phase_done(s, status.state, now - status.phase_started, window, status.to_variant):
            if status.state == STEP and status.step == len(s.steps):
                await self._promote(status, local)
                return
            status.step += 1
            status.state = STEP
            status.weight = s.steps[status.step - 1]
            status.phase_started = now
            status.message = (
                f"step {status.step} of {len(s.steps)}: {status.to_variant} at {status.weight:g} %"
            )
            log.info("rollout %s of %s: %s", status.id, name, status.message)
        self._publish(status, local)

    def _window(self, status: Status, local: LocalRollout) -> Window:
        """This process's window plus every follower's for the same phase."""
        window = local.meter.window()
        if self.dir is None:
            return window
        for path in self._scratch(status.id).glob("*.json"):
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # being replaced
            if data.get("phase") == [status.state, status.step]:
                window = window.plus(Window.model_validate(data["window"]))
        return window

    @staticmethod
    def _fill(status: Status, local: LocalRollout, window: Window, gates: list[Gate]) -> None:
        status.gates = gates
        status.workers = window.workers
        status.compared = window.compared
        status.max_abs_diff = window.max_abs_diff
        status.argmax_agreement = (
            window.argmax_agree / window.argmax_rows if window.argmax_rows else 1.0
        )
        status.variants = [
            VariantStatus(
                name=v,
                weight=weight,
                requests=window.of(v).requests,
                errors=window.of(v).errors,
                p99_ms=1e3 * quantile(0.99, window.of(v).buckets),
            )
            for v, weight in zip(
                (status.from_variant, status.to_variant), local.weights(status), strict=True
            )
        ]

    async def _promote(self, status: Status, local: LocalRollout) -> None:
        status.state, status.weight, status.phase_started = PROMOTED, 100.0, time.time()
        status.message = f"promoted: {status.to_variant} is the default variant"
        local.apply(status)
        try:
            await asyncio.to_thread(write_default_variant, local.model.directory, status.to_variant)
        except OSError as e:
            status.message += f" (config.toml not written: {e})"
            log.error("rollout %s of %s: %s", status.id, status.model, status.message)
        log.info("rollout %s of %s: %s", status.id, status.model, status.message)
        self._publish(status, local)

    async def _end(
        self, status: Status, local: LocalRollout, reason: str, message: str, restore: bool = True
    ) -> None:
        """Roll back: the routing from before the rollout, at once."""
        if status.state not in RUNNING:
            return
        status.state, status.reason, status.weight = ROLLED_BACK, reason, 0.0
        status.message = f"rolled back: {message}"
        status.phase_started = time.time()
        if restore:
            local.apply(status)
        log.warning(
            "rollout %s of %s/%s: %s", status.id, status.model, status.to_variant, status.message
        )
        self._publish(status, local)

    def _publish(self, status: Status, local: LocalRollout) -> None:
        """Apply ``status`` here, show it on the gauges, and write it for the followers."""
        local.apply(status)
        self._gauges(status, local)
        if self.dir is None:
            return
        record = {"leader": os.getpid(), "updated": time.time(), "status": status.model_dump()}
        write_json(self.dir / f"{status.model}.json", record)

    def _gauges(self, status: Status, local: LocalRollout) -> None:
        m, name = self.metrics, status.model
        for state in STATES:
            m.rollout_state.labels(name, state).set(int(state == status.state))
        source, candidate = local.weights(status)
        m.rollout_weight.labels(name, status.to_variant).set(candidate)
        m.rollout_weight.labels(name, status.from_variant).set(source)

    # -- following (serve --workers) ------------------------------------------------------
    def _record(self, name: str) -> Status | None:
        """The model's record in the shared directory, if another worker leads it."""
        if self.dir is None:
            return None
        try:
            data = json.loads((self.dir / f"{name}.json").read_text())
        except (OSError, ValueError):
            return None
        if data.get("leader") == os.getpid():
            return None
        status = Status.model_validate(data["status"])
        if status.state in RUNNING and time.time() - data["updated"] > STALE_S:
            status.state, status.reason = ROLLED_BACK, "leader gone"
            status.message = (
                f"rolled back: the worker leading it (pid {data['leader']}) stopped "
                f"{time.time() - data['updated']:.0f} s ago"
            )
        return status

    async def _follow_loop(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            try:
                self._follow_once()
            except Exception:
                log.exception("following the rollouts of other workers failed")

    def _follow_once(self) -> None:
        assert self.dir is not None
        for path in self.dir.glob("*.json"):
            name = path.stem
            status = self._record(name)
            if status is None or status.id in self._finished:
                continue
            entry = self._following.get(name)
            if entry is None or entry[0] != status.id:
                if status.state not in RUNNING:
                    continue  # ended before this worker saw it
                model = self.repository.models.get(name)
                if model is None or status.to_variant not in model.variants:
                    continue
                state = self.router.state(model)
                local = LocalRollout(
                    self.metrics, model, state, status.from_variant, status.to_variant
                )
                entry = self._following[name] = (status.id, local)
                log.info("following rollout %s of %s/%s", status.id, name, status.to_variant)
            local = entry[1]
            if local.replaced(self.repository):
                self._stop_following(name, status.id)
                continue
            local.apply(status)
            self._gauges(status, local)
            if status.state not in RUNNING:
                self._stop_following(name, status.id)
                continue
            window = local.meter.window()
            write_json(
                self._scratch(status.id) / f"{os.getpid()}.json",
                {"phase": [status.state, status.step], "window": window.model_dump()},
            )

    def _stop_following(self, name: str, rollout_id: str) -> None:
        self._following.pop(name, None)
        self._finished.add(rollout_id)
        with contextlib.suppress(OSError):
            (self._scratch(rollout_id) / f"{os.getpid()}.json").unlink()

    def _scratch(self, rollout_id: str) -> Path:
        """The directory of one rollout's follower windows and abort request."""
        assert self.dir is not None
        path = self.dir / rollout_id
        path.mkdir(exist_ok=True)
        return path

    @contextlib.contextmanager
    def _shared_lock(self):
        """Held while a start checks for a running rollout and writes its record."""
        if self.dir is None:
            yield
            return
        fd = os.open(self.dir / ".lock", os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
