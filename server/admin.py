"""``tensorgate.admin.v1.RoutingAdmin``: read and change each model's routing at run time,
and run rollouts.

Thin, like the inference servicer: the checks are ``policy.validate_policy`` (the same as
for config.toml) and the change is one ``RouteState.set_policy``. A change lasts until the
model is reloaded or the server restarts; config.toml is the source of truth. Rollouts are
``rollouts.Rollouts``'; this only translates their messages.
"""

from __future__ import annotations

import logging
import time

from tensorgate.errors import ConfigError
from tensorgate.protos import admin_pb2 as apb
from tensorgate.protos import admin_pb2_grpc as apb_grpc

from .policy import RouteError, RoutePolicy, ShadowPolicy, make_policy, validate_policy
from .repository import Model, Repository
from .rollout import RUNNING, Settings
from .rollouts import RolloutRefused, Rollouts, Status
from .router import Router, RouteState

log = logging.getLogger(__name__)

ADMIN_SERVICE = apb.DESCRIPTOR.services_by_name["RoutingAdmin"].full_name
#: What SetRoute's update_mask may name.
MUTABLE_FIELDS = (
    "weights",
    "sticky_key",
    "shadow",
    "fallback",
    "breaker_failures",
    "breaker_cooldown_s",
)


class RouteUpdateError(ConfigError):
    """A SetRoute that cannot be applied (INVALID_ARGUMENT); nothing was changed."""


def spec_to_proto(policy: RoutePolicy) -> apb.RouteSpec:
    spec = apb.RouteSpec(
        weights=dict(policy.weights),
        sticky_key=policy.sticky_key or "",
        breaker_failures=policy.breaker_failures,
        breaker_cooldown_s=policy.breaker_cooldown_s,
    )
    if policy.shadow is not None:
        spec.shadow.variants.extend(policy.shadow.variants)
        spec.shadow.fraction = policy.shadow.fraction
    spec.fallback.variants.extend(policy.fallback)
    for name, chain in policy.fallback_by_variant.items():
        spec.fallback.by_variant[name].variants.extend(chain)
    return spec


def updated_policy(current: RoutePolicy, mask: list[str], spec: apb.RouteSpec) -> RoutePolicy:
    """``current`` with the fields named in ``mask`` taken from ``spec`` (not yet checked
    against the model's variants). Raises RouteError for an empty or unknown mask."""
    if not mask:
        raise RouteError(
            "update_mask",
            f"is empty; name the fields to change, from {list(MUTABLE_FIELDS)}",
        )
    unknown = [p for p in mask if p not in MUTABLE_FIELDS]
    if unknown:
        raise RouteError(
            "update_mask", f"unknown field(s) {unknown}; use names from {list(MUTABLE_FIELDS)}"
        )
    fields = set(mask)
    weights = dict(spec.weights) if "weights" in fields else dict(current.weights)
    sticky = spec.sticky_key if "sticky_key" in fields else current.sticky_key
    shadow = current.shadow
    if "shadow" in fields:
        shadow = (
            ShadowPolicy(tuple(spec.shadow.variants), spec.shadow.fraction)
            if spec.HasField("shadow") and spec.shadow.variants
            else None
        )
    fallback: tuple[str, ...] | dict[str, tuple[str, ...]]
    if "fallback" in fields:
        if spec.fallback.by_variant:
            fallback = {k: tuple(v.variants) for k, v in spec.fallback.by_variant.items()}
            if spec.fallback.variants:
                raise RouteError("fallback", "give either a list or a table of variants, not both")
        else:
            fallback = tuple(spec.fallback.variants)
    else:
        fallback = (
            dict(current.fallback_by_variant) if current.fallback_by_variant else current.fallback
        )
    return make_policy(
        weights=weights,
        sticky_key=sticky,
        shadow=shadow,
        fallback=fallback,
        breaker_failures=spec.breaker_failures
        if "breaker_failures" in fields
        else current.breaker_failures,
        breaker_cooldown_s=spec.breaker_cooldown_s
        if "breaker_cooldown_s" in fields
        else current.breaker_cooldown_s,
        attempt_timeout_s=current.attempt_timeout_s,  # config.toml only, kept as it is
    )


def model_route(model: Model, state: RouteState) -> apb.ModelRoute:
    policy = state.policy
    default = model.default_variant()
    route = apb.ModelRoute(
        model=model.name,
        route=spec_to_proto(policy),
        default_variant=default.name if default is not None else "",
        overridden=state.overridden,
    )
    for v in model.variants.values():
        breaker = state.breakers[v.name]
        counts = state.counts[v.name]
        route.variants.add(
            name=v.name,
            backend=v.backend_name,
            ready=v.ready,
            share=policy.share(v.name)
            if policy.weighted
            else float(default is not None and v.name == default.name),
            circuit=int(breaker.state),
            consecutive_failures=breaker.consecutive_failures,
            next_probe_s=breaker.retry_in(),
            served=counts.served,
            served_as_fallback=counts.as_fallback,
            failed=counts.failed,
            version=int(model.alias(v.name) or 0),
            reason=v.reason,
        )
    for (primary, shadow), s in sorted(state.shadow_stats.items()):
        route.shadow_comparisons.add(
            primary=primary,
            shadow=shadow,
            compared=s.compared,
            failed=s.failed,
            dropped=s.dropped,
            worst_abs_diff=s.worst_abs_diff,
            argmax_rows=s.argmax_rows,
            argmax_agree=s.argmax_agree,
        )
    return route


#: StartRolloutRequest's optional fields, each a ``rollout.Settings`` field of that name.
ROLLOUT_FIELDS = (
    "step_seconds",
    "min_requests",
    "shadow_fraction",
    "shadow_seconds",
    "max_abs_diff",
    "min_argmax_agreement",
    "max_p99_ratio",
    "max_error_rate",
)


def rollout_settings(request: apb.StartRolloutRequest) -> Settings:
    """The settings a StartRollout asks for: the defaults where a field is unset."""
    given = {f: getattr(request, f) for f in ROLLOUT_FIELDS if request.HasField(f)}
    if request.steps:
        given["steps"] = tuple(request.steps)
    return Settings(**given)


def rollout_proto(status: Status, now: float | None = None) -> apb.Rollout:
    now = time.time() if now is None else now
    running = status.state in RUNNING
    end = now if running else status.phase_started
    message = apb.Rollout(
        model=status.model,
        id=status.id,
        to_variant=status.to_variant,
        from_variant=status.from_variant,
        state=status.state,
        step=status.step,
        weight=status.weight,
        elapsed_s=max(0.0, end - status.started),
        phase_elapsed_s=max(0.0, now - status.phase_started) if running else 0.0,
        compared=status.compared,
        max_abs_diff=status.max_abs_diff,
        argmax_agreement=status.argmax_agreement,
        reason=status.reason,
        message=status.message,
        workers=status.workers,
    )
    for v in status.variants:
        message.variants.add(**v.model_dump())
    for g in status.gates:
        message.gates.add(**g.model_dump())
    settings = status.settings.model_dump(exclude_none=True)
    message.settings.steps.extend(settings.pop("steps"))
    for name, value in settings.items():
        setattr(message.settings, name, value)
    return message


class RoutingAdminServicer(apb_grpc.RoutingAdminServicer):
    def __init__(self, repository: Repository, router: Router, rollouts: Rollouts) -> None:
        self.repository = repository
        self.router = router
        self.rollouts = rollouts

    async def StartRollout(self, request, context):
        try:
            settings = rollout_settings(request)
        except ValueError as e:  # pydantic: a value of the wrong kind
            raise RouteUpdateError(f"StartRollout: {e}") from None
        status = await self.rollouts.start(
            request.model, request.to_variant, request.from_variant, settings
        )
        return rollout_proto(status)

    async def GetRollout(self, request, context):
        self.repository.get(request.model)
        return rollout_proto(self.rollouts.get(request.model))

    async def AbortRollout(self, request, context):
        self.repository.get(request.model)
        return rollout_proto(await self.rollouts.abort(request.model))

    async def GetRoutes(self, request, context):
        if request.model:
            models = [self.repository.get(request.model)]
        else:
            models = [self.repository.models[n] for n in sorted(self.repository.models)]
        return apb.GetRoutesResponse(models=[model_route(m, self.router.state(m)) for m in models])

    async def SetRoute(self, request, context):
        model = self.repository.get(request.model)
        running = self.rollouts.running(model.name)
        if running is not None:
            raise RolloutRefused(
                f"SetRoute for model '{model.name}': rollout {running.id} of "
                f"'{running.to_variant}' is changing its routing; wait for it to end or abort "
                f"it (tensorgate rollout abort {model.name}); nothing was changed"
            )
        state = self.router.state(model)
        try:
            policy = updated_policy(state.policy, list(request.update_mask.paths), request.route)
            validate_policy(policy, model.variants)
        except RouteError as e:
            raise RouteUpdateError(
                f"SetRoute for model '{model.name}': field '{e.field}': {e}; nothing was changed"
            ) from None
        state.set_policy(policy)
        log.info(
            "routing of %s changed at run time (%s): weights %s, shadow %s, fallback %s",
            model.name,
            ", ".join(request.update_mask.paths),
            dict(policy.weights),
            policy.shadow,
            dict(policy.fallback_by_variant) or list(policy.fallback),
        )
        return apb.SetRouteResponse(route=model_route(model, state))
