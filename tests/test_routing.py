"""Routing between a model's variants: weights, sticky keys, pinning, shadow comparison,
fallback, circuit breakers, and the admin API that changes them at run time.

Unit tests drive the pure strategy (``server/policy.py``, ``breaker.py``, ``router.py``) with a
seeded random source and a fake clock; integration tests start a real gateway on a repository
of real framework models built here (the demo MLP in TorchScript, SavedModel and ONNX, an ONNX
variant with other weights that must diverge, and TorchScript variants that fail always or on
NaN input) and talk to it through gRPC, the project's client, /metrics and the CLI.
"""

from __future__ import annotations

import asyncio
import math
import random
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from prometheus_client.parser import text_string_to_metric_families

from tensorgate.clients import Client, InferenceError
from tensorgate.inference import InferenceRequest
from tensorgate.protos import admin_pb2 as apb
from tensorgate.protos import admin_pb2_grpc as apb_grpc
from tensorgate.protos import grpc_service_pb2 as pb
from tensorgate.protos import grpc_service_pb2_grpc as pb_grpc
from tensorgate.server.breaker import CircuitBreaker, CircuitState
from tensorgate.server.config import load_model_config
from tensorgate.server.demo import MLP_TENSORS, build_mlp_onnx, mlp_reference, mlp_weights
from tensorgate.server.policy import (
    RouteError,
    ShadowPolicy,
    choose_variant,
    make_policy,
    policy_from_config,
    rendezvous_score,
    routing_key,
    validate_policy,
)
from tensorgate.server.repository import Model, State, Variant
from tensorgate.server.router import Router
from tensorgate.server.shadow import compare_outputs

from . import modelfactory as mf
from .serverproc import ServerProcess

# Talks gRPC: runs against both front ends (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("front_end")

SIGMAS = 4.5  # binomial tolerance: a correct router fails a check about once in 150,000 runs


def tolerance(p: float, n: int) -> float:
    return SIGMAS * math.sqrt(p * (1 - p) / n)


# =========================================================================================
# Unit tests: the pure strategy
# =========================================================================================


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_draws_split_by_weight() -> None:
    rng = random.Random(7)
    n = 20_000
    counts = Counter(
        choose_variant({"torch": 90, "tf": 10, "onnx": 0}, None, rng) for _ in range(n)
    )
    assert set(counts) == {"torch", "tf"}  # weight 0: never drawn
    assert abs(counts["tf"] / n - 0.1) < tolerance(0.1, n)


def test_a_sticky_key_always_gets_the_same_variant() -> None:
    weights = {"torch": 50, "tf": 30, "onnx": 20}
    for key in ("alice", "bob", "42"):
        # The random source plays no part once there is a key.
        chosen = {choose_variant(weights, key, random.Random(seed)) for seed in range(50)}
        assert len(chosen) == 1


def test_sticky_keys_spread_by_weight() -> None:
    n = 20_000
    counts = Counter(
        choose_variant({"torch": 70, "tf": 30}, f"user-{i}", random.Random(0)) for i in range(n)
    )
    assert abs(counts["tf"] / n - 0.3) < tolerance(0.3, n)


def test_the_model_name_salts_the_hash() -> None:
    keys = [f"user-{i}" for i in range(2000)]
    weights = {"a": 1, "b": 1}
    one = [choose_variant(weights, k, random.Random(0), salt="m1") for k in keys]
    two = [choose_variant(weights, k, random.Random(0), salt="m2") for k in keys]
    same = sum(a == b for a, b in zip(one, two, strict=True)) / len(keys)
    assert abs(same - 0.5) < tolerance(0.5, len(keys))  # independent, not correlated


@pytest.mark.parametrize(
    ("before", "after", "grows"),
    [
        ({"torch": 90, "tf": 10}, {"torch": 80, "tf": 20}, "tf"),
        ({"torch": 90, "tf": 10}, {"torch": 40, "tf": 60}, "tf"),
        ({"a": 50, "b": 30, "c": 20}, {"a": 50, "b": 30, "c": 40}, "c"),
        ({"a": 1, "b": 1}, {"a": 1, "b": 1, "c": 2}, "c"),  # a new variant
    ],
)
def test_a_weight_change_moves_only_the_keys_that_must_move(before, after, grows) -> None:
    n = 20_000
    rng = random.Random(0)
    keys = [f"k{i}" for i in range(n)]
    old = [choose_variant(before, k, rng) for k in keys]
    new = [choose_variant(after, k, rng) for k in keys]
    moved = [(a, b) for a, b in zip(old, new, strict=True) if a != b]
    # Keys only move into the variant whose share grew...
    assert all(b == grows for _, b in moved)
    # ...and as many as its share grew by.
    share = lambda w, v: w.get(v, 0) / sum(w.values())  # noqa: E731
    expected = share(after, grows) - share(before, grows)
    assert abs(len(moved) / n - expected) < tolerance(expected, n)


def test_rendezvous_score_grows_with_weight() -> None:
    assert rendezvous_score("k", "v", 2.0) == pytest.approx(2 * rendezvous_score("k", "v", 1.0))
    assert rendezvous_score("k", "v", 1.0) > 0


def test_routing_key_from_parameter_or_metadata() -> None:
    req = InferenceRequest("m", "", parameters={"user": "p"}, metadata={"user": "m"})
    assert routing_key(req, "user") == "p"  # the request parameter wins
    assert routing_key(InferenceRequest("m", "", metadata={"user": "m"}), "user") == "m"
    assert routing_key(InferenceRequest("m", "", parameters={"user": 17}), "user") == "17"
    assert routing_key(InferenceRequest("m", "", parameters={"user": ""}), "user") is None
    assert routing_key(req, None) is None
    assert routing_key(req, "session") is None


def test_breaker_opens_probes_and_closes() -> None:
    clock = FakeClock()
    changes: list[CircuitState] = []
    b = CircuitBreaker(3, 10.0, clock, changes.append)
    b.failure()
    b.failure()
    b.success()  # a success resets the count
    b.failure()
    b.failure()
    assert b.state is CircuitState.CLOSED and b.allow()
    b.failure()
    assert b.state is CircuitState.OPEN
    assert not b.allow() and b.retry_in() == pytest.approx(10.0)
    clock.now += 9.9
    assert not b.allow()
    clock.now += 0.1
    assert b.allow()  # the cool-down is over: one probe...
    assert b.state is CircuitState.HALF_OPEN
    assert not b.allow()  # ...at a time
    b.failure()  # the probe failed: open again, for a new cool-down
    assert b.state is CircuitState.OPEN and not b.allow()
    clock.now += 10
    assert b.allow()
    b.release()  # the probe said nothing (queue full, cancelled): another may go
    assert b.allow()
    b.success()
    assert b.state is CircuitState.CLOSED and b.consecutive_failures == 0
    assert changes == [
        CircuitState.OPEN,
        CircuitState.HALF_OPEN,
        CircuitState.OPEN,
        CircuitState.HALF_OPEN,
        CircuitState.CLOSED,
    ]


def test_breaker_with_no_cooldown_probes_at_once() -> None:
    clock = FakeClock()
    b = CircuitBreaker(1, 0.0, clock)
    b.failure()
    assert b.state is CircuitState.OPEN
    assert b.allow() and b.state is CircuitState.HALF_OPEN


def test_fallback_list_and_chains() -> None:
    listed = make_policy(fallback=["tf", "onnx", "torch"])
    assert listed.fallbacks_for("torch") == ("tf", "onnx")
    assert listed.fallbacks_for("tf") == ("onnx", "torch")
    chains = make_policy(fallback={"canary": ["torch", "onnx"], "torch": ["tf"], "tf": ["onnx"]})
    # Depth first: torch's own fallback (tf, then tf's) before canary's next one.
    assert chains.fallbacks_for("canary") == ("torch", "tf", "onnx")
    assert chains.fallbacks_for("torch") == ("tf", "onnx")
    assert chains.fallbacks_for("onnx") == ()


VARIANTS = ["torch", "tf", "onnx"]


@pytest.mark.parametrize(
    ("kwargs", "field", "fragments"),
    [
        ({"weights": {"jax": 1}}, "weights", ["unknown variant 'jax'", "['onnx', 'tf', 'torch']"]),
        ({"weights": {"torch": -1}}, "weights.torch", ["-1.0", ">= 0"]),
        ({"weights": {"torch": math.nan}}, "weights.torch", ["nan"]),
        ({"weights": {"torch": 0, "tf": 0}}, "weights", ["every weight is 0", "positive"]),
        ({"sticky_key": "User Id"}, "sticky_key", ["lower-case"]),
        ({"shadow": ShadowPolicy(("jax",), 0.1)}, "shadow.variants", ["unknown variant"]),
        ({"shadow": ShadowPolicy((), 0.1)}, "shadow.variants", ["is empty"]),
        ({"shadow": ShadowPolicy(("onnx",), 1.5)}, "shadow.fraction", ["from 0 to 1"]),
        ({"fallback": ["tf", "tf"]}, "fallback", ["more than once"]),
        ({"fallback": ["jax"]}, "fallback", ["unknown variant 'jax'"]),
        ({"fallback": {"tf": ["tf"]}}, "fallback.tf", ["names itself"]),
        (
            {"fallback": {"tf": ["onnx"], "onnx": ["torch"], "torch": ["tf"]}},
            "fallback",
            ["cycle", "onnx -> torch -> tf -> onnx"],
        ),
        ({"breaker_failures": 0}, "breaker_failures", ["1 or more"]),
        ({"breaker_cooldown_s": -1.0}, "breaker_cooldown_s", [">= 0"]),
    ],
)
def test_invalid_policies_are_refused(kwargs, field, fragments) -> None:
    with pytest.raises(RouteError) as info:
        validate_policy(make_policy(**kwargs), VARIANTS)
    assert info.value.field == field
    for fragment in fragments:
        assert fragment in str(info.value)


def test_policy_from_config_toml(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text(
        "[routing]\n"
        "weights = { torch = 90, tf = 10 }\n"
        'sticky_key = "user"\n'
        'shadow = { variants = ["onnx"], fraction = 0.1 }\n'
        'fallback = ["tf"]\n'
        "breaker_failures = 2\n"
        "breaker_cooldown_s = 1.5\n"
    )
    policy = validate_policy(policy_from_config(load_model_config(tmp_path).routing), VARIANTS)
    assert dict(policy.weights) == {"torch": 90.0, "tf": 10.0}
    assert policy.sticky_key == "user"
    assert policy.shadow == ShadowPolicy(("onnx",), 0.1)
    assert policy.fallbacks_for("torch") == ("tf",)
    assert (policy.breaker_failures, policy.breaker_cooldown_s) == (2, 1.5)
    assert policy.share("torch") == pytest.approx(0.9) and policy.share("onnx") == 0
    (tmp_path / "config.toml").write_text("[routing]\nweights = {}\n")
    with pytest.raises(RouteError, match="is empty"):
        policy_from_config(load_model_config(tmp_path).routing)


def _model(*names: str, ready: tuple[str, ...] | None = None, **policy) -> Model:
    model = Model("m", Path("/nonexistent"))
    for name in names:
        state = State.READY if ready is None or name in ready else State.UNAVAILABLE
        model.variants[name] = Variant("m", name, "onnxruntime", "onnxruntime_onnx", Path(), state)
    model.policy = validate_policy(make_policy(**policy), names)
    return model


def test_router_plans_pinned_weighted_and_default_requests() -> None:
    router = Router(rng=random.Random(0))
    model = _model("torch", "tf", "onnx", weights={"tf": 1}, fallback=["onnx", "torch"])
    pinned = router.plan(model, InferenceRequest("m", "torch"))
    assert (pinned.primary, pinned.fallbacks, pinned.pinned) == ("torch", (), True)
    routed = router.plan(model, InferenceRequest("m", ""))
    assert routed.candidates == ("tf", "onnx", "torch") and not routed.pinned
    with pytest.raises(Exception, match="version jax is not found"):
        router.plan(model, InferenceRequest("m", "jax"))
    default = _model("2", "1", ready=("1",))  # no weights: the newest ready version
    assert router.plan(default, InferenceRequest("m", "")).primary == "1"


def test_router_state_exports_breakers_and_takes_new_policies() -> None:
    seen: list[tuple[str, str, str, CircuitState]] = []
    router = Router(
        rng=random.Random(0),
        clock=FakeClock(),
        on_circuit_change=lambda *args: seen.append(args),
    )
    model = _model("torch", "tf", weights={"torch": 1}, breaker_failures=1)
    state = router.state(model)
    assert state is router.state(model)  # created once per loaded model
    assert sorted(seen) == [
        ("m", "tf", "onnxruntime", CircuitState.CLOSED),
        ("m", "torch", "onnxruntime", CircuitState.CLOSED),
    ]
    state.breakers["torch"].failure()
    assert seen[-1] == ("m", "torch", "onnxruntime", CircuitState.OPEN)
    state.set_policy(make_policy(weights={"tf": 1}, breaker_failures=4, breaker_cooldown_s=1))
    assert state.overridden and state.breakers["tf"].failure_threshold == 4
    assert router.plan(model, InferenceRequest("m", "")).primary == "tf"


def test_shadows_mirror_a_fraction_and_never_the_serving_variant() -> None:
    router = Router(rng=random.Random(3))
    policy = make_policy(shadow=ShadowPolicy(("onnx", "tf"), 0.25))
    n = 8000
    picked = [router.shadows(policy, "tf") for _ in range(n)]
    assert all(p in ((), ("onnx",)) for p in picked)
    share = sum(bool(p) for p in picked) / n
    assert abs(share - 0.25) < tolerance(0.25, n)
    assert router.shadows(make_policy(shadow=ShadowPolicy(("onnx",), 0.0)), "tf") == ()
    assert router.shadows(make_policy(shadow=ShadowPolicy(("onnx",), 1.0)), "tf") == ("onnx",)


def test_compare_outputs() -> None:
    a = np.array([[0.1, 0.9, 0.0], [0.5, 0.2, 0.3]], np.float32)
    same = compare_outputs({"y": a}, {"y": a.copy()})
    assert same.max_abs_diff == 0.0 and (same.argmax_rows, same.argmax_agree) == (2, 2)
    b = a.copy()
    b[1] = [0.1, 0.2, 0.7]
    d = compare_outputs({"y": a, "z": np.zeros(3)}, {"y": b, "z": np.zeros(3)})
    assert d.max_abs_diff == pytest.approx(0.4) and d.output == "y"
    assert (d.argmax_rows, d.argmax_agree) == (2, 1)
    assert compare_outputs({"y": a}, {"y": a[:1]}).max_abs_diff == math.inf
    assert compare_outputs({"y": a}, {}).max_abs_diff == math.inf
    nan = np.array([np.nan, 1.0])
    assert compare_outputs({"y": nan}, {"y": nan.copy()}).max_abs_diff == 0.0
    assert compare_outputs({"y": nan}, {"y": np.array([0.0, 1.0])}).max_abs_diff == math.inf
    text = np.array([b"a", b"b"], dtype=object)
    assert compare_outputs({"t": text}, {"t": text.copy()}).max_abs_diff == 0.0
    assert compare_outputs({"t": text}, {"t": text[::-1].copy()}).max_abs_diff == math.inf


# =========================================================================================
# Integration: a real gateway on a repository of real models
# =========================================================================================

ROUTING = {
    # The core model: the demo MLP in three frameworks, split 70/30 between two of them.
    "core": """
[routing]
weights = { torch = 70, tf = 30 }
sticky_key = "user"
""",
    # Every request mirrored to an ONNX copy of the same weights and to one with others.
    "mirror": """
[routing]
weights = { torch = 1 }
shadow = { variants = ["onnx", "odd"], fraction = 1.0 }
""",
    # A primary that always fails; the breaker is kept out of the way.
    "backup": """
[routing]
weights = { broken = 1 }
fallback = ["onnx"]
breaker_failures = 1000
""",
    # A primary whose file cannot be loaded.
    "unloaded": """
[routing]
weights = { gone = 1 }
fallback = ["onnx"]
""",
    # Chains are followed: broken -> gone -> onnx.
    "chain": """
[routing]
weights = { broken = 1 }
fallback = { broken = ["gone"], gone = ["onnx"] }
breaker_failures = 1000
""",
    # One queue slot per variant: bursts spill over to the fallback. A single counted
    # failure would open the primary's circuit, so the test can tell that spills do not count.
    "spill": """
[instances]
max_queue_size = 1

[routing]
weights = { torch = 1 }
fallback = ["onnx"]
breaker_failures = 1
""",
    # A primary that fails on NaN input only; its breaker opens after 3 failures.
    "breaker": """
[routing]
weights = { flaky = 1 }
fallback = ["onnx"]
breaker_failures = 3
breaker_cooldown_s = 3600
""",
}

# Models whose [routing] must be refused at load: (config, variants, fragments of the reason).
BAD_ROUTING = {
    "bad_unknown": (
        "weights = { onnx = 1, jax = 1 }",
        ["onnx"],
        ["field 'routing.weights'", "unknown variant 'jax'", "variants are ['onnx']"],
    ),
    "bad_negative": ("weights = { onnx = -5 }", ["onnx"], ["routing.weights.onnx", ">= 0"]),
    "bad_zero": ("weights = { onnx = 0 }", ["onnx"], ["routing.weights", "positive weight"]),
    "bad_self": (
        'fallback = { a = ["a"] }',
        ["a", "b"],
        ["routing.fallback.a", "names itself", "remove it"],
    ),
    "bad_cycle": (
        'fallback = { a = ["b"], b = ["a"] }',
        ["a", "b"],
        ["routing.fallback", "cycle (a -> b -> a)", "use a list"],
    ),
    "bad_shadow": (
        'shadow = { variants = ["onnx", "jax"], fraction = 0.1 }',
        ["onnx"],
        ["routing.shadow.variants", "unknown variant 'jax'"],
    ),
    "bad_fraction": (
        'shadow = { variants = ["onnx"], fraction = 2 }',
        ["onnx"],
        ["routing.shadow.fraction", "from 0 to 1"],
    ),
    "bad_field": ("weight = { onnx = 1 }", ["onnx"], ["routing.weight", "unknown field"]),
}


def build_broken_torchscript(path: Path) -> Path:
    """Takes the scorer's input and always raises."""
    import torch

    class Broken(torch.nn.Module):
        def forward(self, input: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("deliberately broken variant")

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(Broken()), str(path))
    return path


def build_nan_guarded_torchscript(path: Path, mlp: Path) -> Path:
    """The scorer MLP in ``mlp``, refusing (raising on) input that holds a NaN."""
    import torch

    class Guarded(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input: torch.Tensor) -> torch.Tensor:
            if bool(torch.isnan(input).any()):
                raise RuntimeError("poisoned input: NaN")
            return self.inner(input)

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(Guarded(torch.jit.load(str(mlp)))), str(path))
    return path


@pytest.fixture(scope="module")
def routing_repo(tmp_path_factory: pytest.TempPathFactory, demo_repo: Path) -> Path:
    root = tmp_path_factory.mktemp("routing") / "models"
    scorer = demo_repo / "scorer"
    torch_file, onnx_file = scorer / "torch" / "model.pt", scorer / "onnx" / "model.onnx"

    def copy(src: Path, dst: Path) -> None:
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)

    for variant in ("torch", "tf", "onnx"):
        copy(scorer / variant, root / "core" / variant)
    copy(torch_file, root / "mirror" / "torch" / "model.pt")
    copy(onnx_file, root / "mirror" / "onnx" / "model.onnx")
    build_mlp_onnx(root / "mirror" / "odd" / "model.onnx", mlp_weights(seed=1))
    build_broken_torchscript(root / "backup" / "broken" / "model.pt")
    copy(onnx_file, root / "backup" / "onnx" / "model.onnx")
    mf.write_broken_model(root / "unloaded" / "gone" / "model.onnx")
    copy(onnx_file, root / "unloaded" / "onnx" / "model.onnx")
    build_broken_torchscript(root / "chain" / "broken" / "model.pt")
    mf.write_broken_model(root / "chain" / "gone" / "model.onnx")
    copy(onnx_file, root / "chain" / "onnx" / "model.onnx")
    copy(torch_file, root / "spill" / "torch" / "model.pt")
    copy(onnx_file, root / "spill" / "onnx" / "model.onnx")
    build_nan_guarded_torchscript(root / "breaker" / "flaky" / "model.pt", torch_file)
    copy(onnx_file, root / "breaker" / "onnx" / "model.onnx")
    tensors = MLP_TENSORS
    for name, routing in ROUTING.items():
        (root / name / "config.toml").write_text(tensors + routing)
    for name, (routing, variants, _) in BAD_ROUTING.items():
        for variant in variants:
            copy(onnx_file, root / name / variant / "model.onnx")
        (root / name / "config.toml").write_text(f"[routing]\n{routing}\n")
    return root


@pytest.fixture(scope="module")
def gateway(
    front_end: str, routing_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    proc = ServerProcess(routing_repo, tmp_path_factory.mktemp("routing-server"))
    with proc:
        yield proc
    assert proc.proc is not None and proc.proc.returncode == 0, proc.log()


@pytest.fixture(scope="module")
def client(gateway: ServerProcess) -> Iterator[Client]:
    with Client(gateway.address) as c:
        yield c


@pytest.fixture(scope="module")
def channel(gateway: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(gateway.address) as ch:
        yield ch


@pytest.fixture(scope="module")
def admin(channel: grpc.Channel) -> apb_grpc.RoutingAdminStub:
    return apb_grpc.RoutingAdminStub(channel)


RNG = np.random.default_rng(3)


def x64(rows: int = 1) -> np.ndarray:
    return RNG.standard_normal((rows, 64)).astype(np.float32)


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(scrape: dict, name: str, **labels: str) -> float:
    return scrape.get((name, tuple(sorted(labels.items()))), 0.0)


def fallbacks(scrape: dict, model: str, source: str, target: str, reason: str) -> float:
    labels = {"model": model, "from": source, "to": target, "reason": reason}
    return metric(scrape, "tensorgate_fallbacks_total", **labels)


def route(admin, model: str) -> apb.ModelRoute:
    (found,) = admin.GetRoutes(apb.GetRoutesRequest(model=model), timeout=10).models
    return found


def variant_state(admin, model: str, variant: str) -> apb.VariantRoute:
    return next(v for v in route(admin, model).variants if v.name == variant)


def set_route(admin, model: str, *fields: str, **spec) -> apb.ModelRoute:
    request = apb.SetRouteRequest(
        model=model, update_mask=FieldMask(paths=list(fields)), route=apb.RouteSpec(**spec)
    )
    return admin.SetRoute(request, timeout=10).route


# -- split, stickiness, pinning ----------------------------------------------------------


def test_unpinned_requests_split_by_weight(client: Client) -> None:
    n = 400
    counts = Counter(client.infer("core", {"input": x64()}, timeout=30).variant for _ in range(n))
    assert set(counts) <= {"torch", "tf"}  # onnx has no weight: no unpinned traffic
    assert abs(counts["tf"] / n - 0.3) < tolerance(0.3, n), counts


def test_sticky_key_in_a_request_parameter(client: Client) -> None:
    seen: dict[str, set[str]] = {}
    for i in range(60):
        key = f"user-{i}"
        seen[key] = {
            client.infer("core", {"input": x64()}, parameters={"user": key}).variant
            for _ in range(5)
        }
    assert all(len(v) == 1 for v in seen.values()), seen  # 100 % sticky
    assert {v for (v,) in seen.values()} == {"torch", "tf"}  # and keys spread


def test_sticky_key_in_grpc_metadata(gateway: ServerProcess, client: Client) -> None:
    for key in ("alice", "bob", "carol"):
        expected = client.infer("core", {"input": x64()}, parameters={"user": key}).variant
        with Client(gateway.address, metadata={"user": key}) as keyed:
            got = {keyed.infer("core", {"input": x64()}).variant for _ in range(20)}
        assert got == {expected}, key  # the same key places the same way either way


def test_pinning_overrides_weights_and_keys(client: Client, channel: grpc.Channel) -> None:
    for variant in ("onnx", "tf", "torch"):
        x = x64(2)
        result = client.infer("core", {"input": x}, version=variant, parameters={"user": "alice"})
        assert result.variant == variant
        np.testing.assert_allclose(result["output"], mlp_reference(x, mlp_weights()), atol=1e-5)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    req = pb.ModelInferRequest(model_name="core", model_version="onnx")
    req.inputs.add(name="input", datatype="FP32", shape=[1, 64])
    req.raw_input_contents.append(x64().tobytes())
    reply, call = stub.ModelInfer.with_call(req, timeout=30)
    assert reply.model_version == "onnx"
    assert ("tensorgate-variant", "onnx") in tuple(call.trailing_metadata())


def test_keys_move_as_little_as_the_weights_change(client: Client, admin) -> None:
    keys = [f"mover-{i}" for i in range(300)]

    def placement() -> list[str]:
        return [
            client.infer("core", {"input": x64()}, parameters={"user": k}).variant for k in keys
        ]

    before = placement()
    set_route(admin, "core", "weights", weights={"torch": 40, "tf": 60})
    try:
        after = placement()
    finally:
        set_route(admin, "core", "weights", weights={"torch": 70, "tf": 30})
    moved = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
    assert all(pair == ("torch", "tf") for pair in moved), moved  # only towards tf
    assert abs(len(moved) / len(keys) - 0.3) < tolerance(0.3, len(keys)), len(moved)
    assert placement() == before  # the same weights place the same keys the same way


# -- shadow ------------------------------------------------------------------------------


def test_shadow_compares_without_touching_the_reply(
    gateway: ServerProcess, client: Client, admin
) -> None:
    n = 20
    labels = {
        shadow: {"model": "mirror", "primary": "torch", "shadow": shadow}
        for shadow in ("onnx", "odd")
    }
    before = samples(gateway.scrape())
    for _ in range(n):
        x = x64(3)
        result = client.infer("mirror", {"input": x}, timeout=30)
        assert result.variant == "torch"  # the primary answers, with its own outputs
        np.testing.assert_allclose(result["output"], mlp_reference(x, mlp_weights()), atol=1e-5)

    def delta(after: dict, name: str, **extra: str) -> float:
        return metric(after, name, **extra) - metric(before, name, **extra)

    deadline = time.monotonic() + 60  # mirrors run after the replies: wait for them
    while True:
        after = samples(gateway.scrape())
        done = [
            delta(after, "tensorgate_shadow_requests_total", **labels[s], outcome="compared")
            for s in ("onnx", "odd")
        ]
        if done == [n, n] or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert done == [n, n], gateway.log()[-2000:]
    hist = "tensorgate_shadow_max_abs_diff_bucket"
    # The same weights in another framework: float32 rounding only.
    assert delta(after, hist, **labels["onnx"], le="0.0001") == n
    assert (
        delta(after, "tensorgate_shadow_argmax_agreement_total", **labels["onnx"], agree="true")
        == 3 * n
    )
    assert (
        delta(after, "tensorgate_shadow_argmax_agreement_total", **labels["onnx"], agree="false")
        == 0
    )
    # Other weights: far apart, and the arg-max often disagrees.
    assert delta(after, hist, **labels["odd"], le="0.01") == 0
    assert delta(after, hist, **labels["odd"], le="+Inf") == n
    assert (
        delta(after, "tensorgate_shadow_argmax_agreement_total", **labels["odd"], agree="false") > 0
    )
    assert delta(after, "tensorgate_shadow_requests_total", **labels["odd"], outcome="failed") == 0
    comparisons = {c.shadow: c for c in route(admin, "mirror").shadow_comparisons}
    assert comparisons["onnx"].compared >= n and comparisons["onnx"].worst_abs_diff < 1e-4
    assert comparisons["odd"].worst_abs_diff > 0.01
    assert comparisons["odd"].argmax_agree < comparisons["odd"].argmax_rows
    assert "shadow mirror/odd differs from torch" in gateway.log()


# -- fallback ----------------------------------------------------------------------------


def test_fallback_when_the_primary_fails(gateway: ServerProcess, client: Client, admin) -> None:
    before = samples(gateway.scrape())
    served_before = variant_state(admin, "backup", "onnx").served_as_fallback
    for _ in range(5):
        x = x64(2)
        result = client.infer("backup", {"input": x}, timeout=30)
        assert result.variant == "onnx"  # the caller sees success, from the fallback
        np.testing.assert_allclose(result["output"], mlp_reference(x, mlp_weights()), atol=1e-5)
    after = samples(gateway.scrape())
    assert (
        fallbacks(after, "backup", "broken", "onnx", "error")
        - fallbacks(before, "backup", "broken", "onnx", "error")
        == 5
    )
    assert variant_state(admin, "backup", "onnx").served_as_fallback - served_before == 5
    assert variant_state(admin, "backup", "broken").failed >= 5
    ok = {"model": "backup", "variant": "onnx", "backend": "onnxruntime", "code": "OK"}
    assert (
        metric(after, "tensorgate_requests_total", **ok)
        - metric(before, "tensorgate_requests_total", **ok)
        == 5
    )


def test_fallback_when_the_primary_is_not_loaded(gateway: ServerProcess, client: Client) -> None:
    before = samples(gateway.scrape())
    assert {client.infer("unloaded", {"input": x64()}).variant for _ in range(3)} == {"onnx"}
    after = samples(gateway.scrape())
    assert (
        fallbacks(after, "unloaded", "gone", "onnx", "not_ready")
        - fallbacks(before, "unloaded", "gone", "onnx", "not_ready")
        == 3
    )


def test_fallback_chains_are_followed(gateway: ServerProcess, client: Client) -> None:
    before = samples(gateway.scrape())
    assert client.infer("chain", {"input": x64()}).variant == "onnx"
    after = samples(gateway.scrape())
    for source, target, reason in (("broken", "gone", "error"), ("gone", "onnx", "not_ready")):
        assert (
            fallbacks(after, "chain", source, target, reason)
            - fallbacks(before, "chain", source, target, reason)
            == 1
        )


def test_pinned_and_invalid_requests_are_never_retried(gateway: ServerProcess, client) -> None:
    before = samples(gateway.scrape())
    with pytest.raises(InferenceError) as info:
        client.infer("backup", {"input": x64()}, version="broken")  # pinned: that one only
    assert info.value.code == grpc.StatusCode.INTERNAL
    assert "deliberately broken" in info.value.message
    with pytest.raises(InferenceError) as info:
        client.infer("backup", {"input": x64()[:, :8]})  # wrong shape: the caller's error
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    after = samples(gateway.scrape())
    assert fallbacks(after, "backup", "broken", "onnx", "error") == fallbacks(
        before, "backup", "broken", "onnx", "error"
    )


def test_a_full_queue_spills_over_without_counting_as_a_failure(
    gateway: ServerProcess, admin
) -> None:
    async def burst(n: int) -> list[str]:
        """n concurrent calls: the variant that served each, or the status it failed with."""
        client = Client(gateway.address)
        try:
            calls = [client.aio.infer("spill", {"input": x64(8)}, timeout=30) for _ in range(n)]
            results = await asyncio.gather(*calls, return_exceptions=True)
        finally:
            await client.aio.close()
            client.close()
        return [r.variant if not isinstance(r, BaseException) else repr(r) for r in results]

    before = samples(gateway.scrape())
    outcomes: Counter[str] = Counter()
    for _ in range(20):  # until a burst outruns the one queue slot of torch
        outcomes.update(asyncio.run(burst(32)))
        if set(outcomes) - {"torch"}:
            break
    assert outcomes["onnx"] > 0, outcomes
    # The fallback has one slot too, so a call may still be refused - as overloaded, never
    # as anything else - and every spill is counted.
    refused = {o for o in outcomes if o not in ("torch", "onnx")}
    assert all("RESOURCE_EXHAUSTED" in o for o in refused), refused
    spilled = sum(n for o, n in outcomes.items() if o != "torch")
    after = samples(gateway.scrape())
    assert (
        fallbacks(after, "spill", "torch", "onnx", "overloaded")
        - fallbacks(before, "spill", "torch", "onnx", "overloaded")
        == spilled
    )
    torch_state = variant_state(admin, "spill", "torch")
    assert torch_state.circuit == apb.CIRCUIT_STATE_CLOSED and torch_state.failed == 0


def test_breaker_opens_and_recovers(gateway: ServerProcess, client: Client, admin) -> None:
    poison = np.full((1, 64), np.nan, np.float32)
    labels = {"model": "breaker", "variant": "flaky", "backend": "torchscript"}

    def circuit() -> tuple[int, float]:
        return (
            variant_state(admin, "breaker", "flaky").circuit,
            metric(samples(gateway.scrape()), "tensorgate_circuit_state", **labels),
        )

    assert client.infer("breaker", {"input": x64()}).variant == "flaky"
    assert circuit() == (apb.CIRCUIT_STATE_CLOSED, 0)
    before = samples(gateway.scrape())
    for _ in range(3):  # three consecutive failures: the fallback answers each time
        assert client.infer("breaker", {"input": poison}).variant == "onnx"
    assert circuit() == (apb.CIRCUIT_STATE_OPEN, 1)
    failed = variant_state(admin, "breaker", "flaky").failed
    # Open: good requests go straight to the fallback; the flaky variant is not tried.
    for _ in range(2):
        assert client.infer("breaker", {"input": x64()}).variant == "onnx"
    assert variant_state(admin, "breaker", "flaky").failed == failed
    after = samples(gateway.scrape())
    assert (
        fallbacks(after, "breaker", "flaky", "onnx", "error")
        - fallbacks(before, "breaker", "flaky", "onnx", "error")
        == 3
    )
    assert (
        fallbacks(after, "breaker", "flaky", "onnx", "circuit_open")
        - fallbacks(before, "breaker", "flaky", "onnx", "circuit_open")
        == 2
    )
    # End the cool-down: the next request is a probe. A failed probe opens it again...
    set_route(admin, "breaker", "breaker_cooldown_s", breaker_cooldown_s=0)
    assert client.infer("breaker", {"input": poison}).variant == "onnx"
    assert circuit() == (apb.CIRCUIT_STATE_OPEN, 1)
    assert variant_state(admin, "breaker", "flaky").failed == failed + 1
    # ...and a successful one closes it.
    assert client.infer("breaker", {"input": x64()}).variant == "flaky"
    assert circuit() == (apb.CIRCUIT_STATE_CLOSED, 0)
    assert client.infer("breaker", {"input": x64()}).variant == "flaky"


# -- admin API and CLI ---------------------------------------------------------------------


def test_get_routes_reports_config_and_state(admin) -> None:
    models = {m.model: m for m in admin.GetRoutes(apb.GetRoutesRequest(), timeout=10).models}
    assert set(ROUTING) <= set(models)
    core = models["core"]
    assert dict(core.route.weights) == {"torch": 70, "tf": 30}
    assert core.route.sticky_key == "user"
    assert (core.route.breaker_failures, core.route.breaker_cooldown_s) == (5, 10)
    shares = {v.name: v.share for v in core.variants}
    assert shares == pytest.approx({"torch": 0.7, "tf": 0.3, "onnx": 0.0})
    mirror = models["mirror"].route
    assert list(mirror.shadow.variants) == ["onnx", "odd"] and mirror.shadow.fraction == 1.0
    assert list(models["backup"].route.fallback.variants) == ["onnx"]
    chain = models["chain"].route.fallback.by_variant
    assert {k: list(v.variants) for k, v in chain.items()} == {"broken": ["gone"], "gone": ["onnx"]}
    gone = next(v for v in models["unloaded"].variants if v.name == "gone")
    assert not gone.ready and gone.backend == "onnxruntime"
    with pytest.raises(grpc.RpcError) as info:
        admin.GetRoutes(apb.GetRoutesRequest(model="nosuch"), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("fields", "spec", "fragments"),
    [
        (["weights"], {"weights": {"jax": 1}}, ["field 'weights'", "unknown variant 'jax'"]),
        (["weights"], {"weights": {"torch": -1}}, ["field 'weights.torch'", ">= 0"]),
        (["weights"], {"weights": {"torch": 0}}, ["every weight is 0"]),
        (
            ["fallback"],
            {"fallback": apb.Fallback(by_variant={"tf": apb.VariantList(variants=["tf"])})},
            ["field 'fallback.tf'", "names itself"],
        ),
        (
            ["fallback"],
            {
                "fallback": apb.Fallback(
                    by_variant={
                        "tf": apb.VariantList(variants=["torch"]),
                        "torch": apb.VariantList(variants=["tf"]),
                    }
                )
            },
            ["cycle"],
        ),
        (["shadow"], {"shadow": apb.Shadow(variants=["onnx"], fraction=2)}, ["shadow.fraction"]),
        (["sticky_key"], {"sticky_key": "Not A Key"}, ["sticky_key"]),
        ([], {"weights": {"tf": 1}}, ["update_mask", "is empty"]),
        (["weight"], {"weights": {"tf": 1}}, ["update_mask", "unknown field(s) ['weight']"]),
    ],
)
def test_set_route_refuses_invalid_changes(admin, fields, spec, fragments) -> None:
    before = route(admin, "core").route
    with pytest.raises(grpc.RpcError) as info:
        set_route(admin, "core", *fields, **spec)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for fragment in (*fragments, "nothing was changed"):
        assert fragment in info.value.details(), info.value.details()
    assert route(admin, "core").route == before


def test_set_route_under_load_drops_nothing(gateway: ServerProcess, admin) -> None:
    stop = threading.Event()
    errors: list[BaseException] = []
    served: Counter[str] = Counter()

    def load(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with Client(gateway.address) as c:
            while not stop.is_set():
                x = rng.standard_normal((1, 64)).astype(np.float32)
                try:
                    served[c.infer("core", {"input": x}, timeout=30).variant] += 1
                except Exception as e:  # every failure counts
                    errors.append(e)

    threads = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(3)]
    for t in threads:
        t.start()
    steps = [{"tf": 1}, {"onnx": 1}, {"torch": 1, "onnx": 1}, {"torch": 1}]
    try:
        with Client(gateway.address) as c:
            for weights in steps:
                time.sleep(0.3)  # let the load run under the previous weights
                changed = set_route(admin, "core", "weights", weights=weights)
                assert dict(changed.route.weights) == weights and changed.overridden
                # In effect from the reply on: the next request follows the new weights.
                got = {c.infer("core", {"input": x64()}).variant for _ in range(10)}
                assert got <= set(weights), (weights, got)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        set_route(admin, "core", "weights", weights={"torch": 70, "tf": 30})
    assert not errors, errors[:3]
    assert sum(served.values()) > 20 and {"tf", "onnx"} <= set(served), served


def test_config_errors_are_refused_at_load(client: Client) -> None:
    index = {(e["name"], e.get("version", "")): e for e in client.repository_index()}
    for name, (_, _, fragments) in BAD_ROUTING.items():
        entries = [e for (model, _), e in index.items() if model == name]
        assert entries and all(e["state"] == "UNAVAILABLE" for e in entries), name
        reason = entries[0]["reason"]
        for fragment in (f"{name}/config.toml", *fragments):
            assert fragment in reason, (name, reason)
        assert not client.is_model_ready(name)


def test_admin_service_is_listed_by_reflection(channel: grpc.Channel) -> None:
    from grpc_reflection.v1alpha import reflection_pb2

    call = channel.stream_stream(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    (reply,) = list(
        call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    )
    names = {s.name for s in reply.list_services_response.service}
    assert "tensorgate.admin.v1.RoutingAdmin" in names


def tensorgate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tensorgate.server.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_routes_cli_shows_and_changes_routes(gateway: ServerProcess, admin) -> None:
    url = ("--url", gateway.address)
    shown = tensorgate("routes", *url)
    assert shown.returncode == 0, shown.stderr
    for text in ("core", "torch", "tf_savedmodel", "70", "sticky key: user", "mirror", "odd"):
        assert text in shown.stdout, text
    changed = tensorgate(
        "routes", "set", "core", "--weight", "torch=1", "--weight", "onnx=3",
        "--shadow", "tf:0.5", "--fallback", "tf", "--json", *url,
    )  # fmt: skip
    try:
        assert changed.returncode == 0, changed.stderr
        now = route(admin, "core")
        assert dict(now.route.weights) == {"torch": 1, "onnx": 3}
        assert list(now.route.shadow.variants) == ["tf"] and now.route.shadow.fraction == 0.5
        assert list(now.route.fallback.variants) == ["tf"] and now.overridden
        assert '"onnx": 3.0' in changed.stdout
    finally:
        reset = tensorgate(
            "routes", "set", "core", "--weight", "torch=70", "--weight", "tf=30",
            "--no-shadow", "--no-fallback", *url,
        )  # fmt: skip
        assert reset.returncode == 0, reset.stderr
    assert not route(admin, "core").route.shadow.variants
    refused = tensorgate("routes", "set", "core", "--weight", "jax=1", *url)
    assert refused.returncode == 1 and "unknown variant 'jax'" in refused.stderr
    one = tensorgate("routes", "show", "breaker", "--json", *url)
    assert one.returncode == 0 and '"model": "breaker"' in one.stdout and "core" not in one.stdout
