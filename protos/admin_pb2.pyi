from google.protobuf import field_mask_pb2 as _field_mask_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CircuitState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CIRCUIT_STATE_CLOSED: _ClassVar[CircuitState]
    CIRCUIT_STATE_OPEN: _ClassVar[CircuitState]
    CIRCUIT_STATE_HALF_OPEN: _ClassVar[CircuitState]
CIRCUIT_STATE_CLOSED: CircuitState
CIRCUIT_STATE_OPEN: CircuitState
CIRCUIT_STATE_HALF_OPEN: CircuitState

class GetRoutesRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class GetRoutesResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelRoute]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelRoute, _Mapping]]] = ...) -> None: ...

class SetRouteRequest(_message.Message):
    __slots__ = ("model", "update_mask", "route")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    model: str
    update_mask: _field_mask_pb2.FieldMask
    route: RouteSpec
    def __init__(self, model: _Optional[str] = ..., update_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ..., route: _Optional[_Union[RouteSpec, _Mapping]] = ...) -> None: ...

class SetRouteResponse(_message.Message):
    __slots__ = ("route",)
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    route: ModelRoute
    def __init__(self, route: _Optional[_Union[ModelRoute, _Mapping]] = ...) -> None: ...

class RouteSpec(_message.Message):
    __slots__ = ("weights", "sticky_key", "shadow", "fallback", "breaker_failures", "breaker_cooldown_s")
    class WeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    STICKY_KEY_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_FIELD_NUMBER: _ClassVar[int]
    BREAKER_FAILURES_FIELD_NUMBER: _ClassVar[int]
    BREAKER_COOLDOWN_S_FIELD_NUMBER: _ClassVar[int]
    weights: _containers.ScalarMap[str, float]
    sticky_key: str
    shadow: Shadow
    fallback: Fallback
    breaker_failures: int
    breaker_cooldown_s: float
    def __init__(self, weights: _Optional[_Mapping[str, float]] = ..., sticky_key: _Optional[str] = ..., shadow: _Optional[_Union[Shadow, _Mapping]] = ..., fallback: _Optional[_Union[Fallback, _Mapping]] = ..., breaker_failures: _Optional[int] = ..., breaker_cooldown_s: _Optional[float] = ...) -> None: ...

class Shadow(_message.Message):
    __slots__ = ("variants", "fraction")
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    variants: _containers.RepeatedScalarFieldContainer[str]
    fraction: float
    def __init__(self, variants: _Optional[_Iterable[str]] = ..., fraction: _Optional[float] = ...) -> None: ...

class Fallback(_message.Message):
    __slots__ = ("variants", "by_variant")
    class ByVariantEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: VariantList
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[VariantList, _Mapping]] = ...) -> None: ...
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    BY_VARIANT_FIELD_NUMBER: _ClassVar[int]
    variants: _containers.RepeatedScalarFieldContainer[str]
    by_variant: _containers.MessageMap[str, VariantList]
    def __init__(self, variants: _Optional[_Iterable[str]] = ..., by_variant: _Optional[_Mapping[str, VariantList]] = ...) -> None: ...

class VariantList(_message.Message):
    __slots__ = ("variants",)
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    variants: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, variants: _Optional[_Iterable[str]] = ...) -> None: ...

class ModelRoute(_message.Message):
    __slots__ = ("model", "route", "default_variant", "overridden", "variants", "shadow_comparisons")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_VARIANT_FIELD_NUMBER: _ClassVar[int]
    OVERRIDDEN_FIELD_NUMBER: _ClassVar[int]
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    SHADOW_COMPARISONS_FIELD_NUMBER: _ClassVar[int]
    model: str
    route: RouteSpec
    default_variant: str
    overridden: bool
    variants: _containers.RepeatedCompositeFieldContainer[VariantRoute]
    shadow_comparisons: _containers.RepeatedCompositeFieldContainer[ShadowComparison]
    def __init__(self, model: _Optional[str] = ..., route: _Optional[_Union[RouteSpec, _Mapping]] = ..., default_variant: _Optional[str] = ..., overridden: _Optional[bool] = ..., variants: _Optional[_Iterable[_Union[VariantRoute, _Mapping]]] = ..., shadow_comparisons: _Optional[_Iterable[_Union[ShadowComparison, _Mapping]]] = ...) -> None: ...

class VariantRoute(_message.Message):
    __slots__ = ("name", "backend", "ready", "share", "circuit", "consecutive_failures", "next_probe_s", "served", "served_as_fallback", "failed", "version", "reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    CIRCUIT_FIELD_NUMBER: _ClassVar[int]
    CONSECUTIVE_FAILURES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PROBE_S_FIELD_NUMBER: _ClassVar[int]
    SERVED_FIELD_NUMBER: _ClassVar[int]
    SERVED_AS_FALLBACK_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    backend: str
    ready: bool
    share: float
    circuit: CircuitState
    consecutive_failures: int
    next_probe_s: float
    served: int
    served_as_fallback: int
    failed: int
    version: int
    reason: str
    def __init__(self, name: _Optional[str] = ..., backend: _Optional[str] = ..., ready: _Optional[bool] = ..., share: _Optional[float] = ..., circuit: _Optional[_Union[CircuitState, str]] = ..., consecutive_failures: _Optional[int] = ..., next_probe_s: _Optional[float] = ..., served: _Optional[int] = ..., served_as_fallback: _Optional[int] = ..., failed: _Optional[int] = ..., version: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class ShadowComparison(_message.Message):
    __slots__ = ("primary", "shadow", "compared", "failed", "dropped", "worst_abs_diff", "argmax_rows", "argmax_agree")
    PRIMARY_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FIELD_NUMBER: _ClassVar[int]
    COMPARED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    WORST_ABS_DIFF_FIELD_NUMBER: _ClassVar[int]
    ARGMAX_ROWS_FIELD_NUMBER: _ClassVar[int]
    ARGMAX_AGREE_FIELD_NUMBER: _ClassVar[int]
    primary: str
    shadow: str
    compared: int
    failed: int
    dropped: int
    worst_abs_diff: float
    argmax_rows: int
    argmax_agree: int
    def __init__(self, primary: _Optional[str] = ..., shadow: _Optional[str] = ..., compared: _Optional[int] = ..., failed: _Optional[int] = ..., dropped: _Optional[int] = ..., worst_abs_diff: _Optional[float] = ..., argmax_rows: _Optional[int] = ..., argmax_agree: _Optional[int] = ...) -> None: ...

class StartRolloutRequest(_message.Message):
    __slots__ = ("model", "to_variant", "from_variant", "steps", "step_seconds", "min_requests", "shadow_fraction", "shadow_seconds", "max_abs_diff", "min_argmax_agreement", "max_p99_ratio", "max_error_rate")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TO_VARIANT_FIELD_NUMBER: _ClassVar[int]
    FROM_VARIANT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MIN_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FRACTION_FIELD_NUMBER: _ClassVar[int]
    SHADOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_DIFF_FIELD_NUMBER: _ClassVar[int]
    MIN_ARGMAX_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    MAX_P99_RATIO_FIELD_NUMBER: _ClassVar[int]
    MAX_ERROR_RATE_FIELD_NUMBER: _ClassVar[int]
    model: str
    to_variant: str
    from_variant: str
    steps: _containers.RepeatedScalarFieldContainer[float]
    step_seconds: float
    min_requests: int
    shadow_fraction: float
    shadow_seconds: float
    max_abs_diff: float
    min_argmax_agreement: float
    max_p99_ratio: float
    max_error_rate: float
    def __init__(self, model: _Optional[str] = ..., to_variant: _Optional[str] = ..., from_variant: _Optional[str] = ..., steps: _Optional[_Iterable[float]] = ..., step_seconds: _Optional[float] = ..., min_requests: _Optional[int] = ..., shadow_fraction: _Optional[float] = ..., shadow_seconds: _Optional[float] = ..., max_abs_diff: _Optional[float] = ..., min_argmax_agreement: _Optional[float] = ..., max_p99_ratio: _Optional[float] = ..., max_error_rate: _Optional[float] = ...) -> None: ...

class GetRolloutRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class AbortRolloutRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class RolloutSettings(_message.Message):
    __slots__ = ("steps", "step_seconds", "min_requests", "shadow_fraction", "shadow_seconds", "max_abs_diff", "min_argmax_agreement", "max_p99_ratio", "max_error_rate")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MIN_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FRACTION_FIELD_NUMBER: _ClassVar[int]
    SHADOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_DIFF_FIELD_NUMBER: _ClassVar[int]
    MIN_ARGMAX_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    MAX_P99_RATIO_FIELD_NUMBER: _ClassVar[int]
    MAX_ERROR_RATE_FIELD_NUMBER: _ClassVar[int]
    steps: _containers.RepeatedScalarFieldContainer[float]
    step_seconds: float
    min_requests: int
    shadow_fraction: float
    shadow_seconds: float
    max_abs_diff: float
    min_argmax_agreement: float
    max_p99_ratio: float
    max_error_rate: float
    def __init__(self, steps: _Optional[_Iterable[float]] = ..., step_seconds: _Optional[float] = ..., min_requests: _Optional[int] = ..., shadow_fraction: _Optional[float] = ..., shadow_seconds: _Optional[float] = ..., max_abs_diff: _Optional[float] = ..., min_argmax_agreement: _Optional[float] = ..., max_p99_ratio: _Optional[float] = ..., max_error_rate: _Optional[float] = ...) -> None: ...

class RolloutVariant(_message.Message):
    __slots__ = ("name", "weight", "requests", "errors", "p99_ms")
    NAME_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    P99_MS_FIELD_NUMBER: _ClassVar[int]
    name: str
    weight: float
    requests: int
    errors: int
    p99_ms: float
    def __init__(self, name: _Optional[str] = ..., weight: _Optional[float] = ..., requests: _Optional[int] = ..., errors: _Optional[int] = ..., p99_ms: _Optional[float] = ...) -> None: ...

class RolloutGate(_message.Message):
    __slots__ = ("name", "limit", "judged", "value", "ok")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    JUDGED_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    name: str
    limit: float
    judged: bool
    value: float
    ok: bool
    def __init__(self, name: _Optional[str] = ..., limit: _Optional[float] = ..., judged: _Optional[bool] = ..., value: _Optional[float] = ..., ok: _Optional[bool] = ...) -> None: ...

class Rollout(_message.Message):
    __slots__ = ("model", "id", "to_variant", "from_variant", "state", "step", "weight", "elapsed_s", "phase_elapsed_s", "variants", "compared", "max_abs_diff", "argmax_agreement", "gates", "reason", "message", "settings", "workers")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    TO_VARIANT_FIELD_NUMBER: _ClassVar[int]
    FROM_VARIANT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_S_FIELD_NUMBER: _ClassVar[int]
    PHASE_ELAPSED_S_FIELD_NUMBER: _ClassVar[int]
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    COMPARED_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_DIFF_FIELD_NUMBER: _ClassVar[int]
    ARGMAX_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    GATES_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    model: str
    id: str
    to_variant: str
    from_variant: str
    state: str
    step: int
    weight: float
    elapsed_s: float
    phase_elapsed_s: float
    variants: _containers.RepeatedCompositeFieldContainer[RolloutVariant]
    compared: int
    max_abs_diff: float
    argmax_agreement: float
    gates: _containers.RepeatedCompositeFieldContainer[RolloutGate]
    reason: str
    message: str
    settings: RolloutSettings
    workers: int
    def __init__(self, model: _Optional[str] = ..., id: _Optional[str] = ..., to_variant: _Optional[str] = ..., from_variant: _Optional[str] = ..., state: _Optional[str] = ..., step: _Optional[int] = ..., weight: _Optional[float] = ..., elapsed_s: _Optional[float] = ..., phase_elapsed_s: _Optional[float] = ..., variants: _Optional[_Iterable[_Union[RolloutVariant, _Mapping]]] = ..., compared: _Optional[int] = ..., max_abs_diff: _Optional[float] = ..., argmax_agreement: _Optional[float] = ..., gates: _Optional[_Iterable[_Union[RolloutGate, _Mapping]]] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ..., settings: _Optional[_Union[RolloutSettings, _Mapping]] = ..., workers: _Optional[int] = ...) -> None: ...
