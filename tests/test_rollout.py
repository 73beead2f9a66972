"""Rollouts run by the server (``tensorgate rollout``, docs/rollouts.md).

Unit tests drive the pure rules of ``server/rollout.py``. Integration tests start a real
gateway on ONNX variants of the demo scorer built here (an equal copy, one with other
weights, one that computes the same outputs ten times slower, one that fails every
request) and keep real traffic flowing from several threads while each rollout runs.
Phases are short (``--shadow-seconds``/``--step-seconds`` of a fraction of a second, a few
dozen ``--min-requests``) so that the file runs in well under two minutes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import tomllib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import json_format

from tensorgate import codec
from tensorgate.errors import InvalidInput
from tensorgate.protos import admin_pb2 as apb
from tensorgate.protos import admin_pb2_grpc as apb_grpc
from tensorgate.protos import grpc_service_pb2_grpc as pb_grpc
from tensorgate.server.demo import MLP_TENSORS, build_mlp_onnx, mlp_weights, save_onnx
from tensorgate.server.metrics import LATENCY_BUCKETS
from tensorgate.server.policy import make_policy
from tensorgate.server.rollout import (
    SHADOW,
    STEP,
    Settings,
    VariantWindow,
    Window,
    breach,
    judge,
    phase_done,
    phase_policy,
    quantile,
)
from tensorgate.server.servicer import VARIANT_METADATA_KEY, WORKER_METADATA_KEY

from .serverproc import ServerProcess

# Every test that talks gRPC runs against both front ends (issue 18).
pytestmark = pytest.mark.usefixtures("front_end")

# Quick phases: the file's whole run stays well under two minutes. The p99 limit is loose:
# the traffic below saturates a small machine, and mirroring every request doubles one
# side's load; the slow variant is ten times slower.
FAST = ("--shadow-seconds", "0.5", "--step-seconds", "0.5", "--min-requests", "40")
FAST += ("--max-p99-ratio", "3")
THREADS = 4
#: The module's gateway keeps its admin service behind this token; the helpers send it.
ADMIN_TOKEN = "rollout-admin-token"
AUTH = (("authorization", f"Bearer {ADMIN_TOKEN}"),)


# =========================================================================================
# Unit tests: the rules
# =========================================================================================


def _hist(seconds: float, n: int) -> list[float]:
    counts = [0.0] * (len(LATENCY_BUCKETS) + 1)
    counts[int(np.searchsorted(LATENCY_BUCKETS, seconds))] += n
    return counts


def test_settings_refuse_steps_that_do_not_increase_within_1_to_100() -> None:
    Settings(steps=(5, 25, 50, 100)).check()
    Settings(steps=(100,)).check()
    for steps in ((), (0, 50), (50, 25), (5, 5, 100), (5, 101)):
        with pytest.raises(InvalidInput, match="steps"):
            Settings(steps=steps).check()
    with pytest.raises(InvalidInput, match="shadow_fraction"):
        Settings(shadow_fraction=1.5).check()
    with pytest.raises(InvalidInput, match="min_argmax_agreement"):
        Settings(min_argmax_agreement=2.0).check()
    with pytest.raises(InvalidInput, match="max_p99_ratio"):
        Settings(max_p99_ratio=0).check()


def test_quantile_interpolates_like_prometheus() -> None:
    assert quantile(0.99, [0.0] * 18) == 0.0
    # 100 requests in (1 ms, 2.5 ms]: p99 is 99 % of the way through that bucket.
    assert quantile(0.99, _hist(2e-3, 100)) == pytest.approx(1e-3 + 0.99 * 1.5e-3)
    assert quantile(0.99, _hist(60.0, 10)) == LATENCY_BUCKETS[-1]  # +Inf: the last bound


def test_gates_judge_only_with_enough_numbers_and_name_the_breach() -> None:
    s = Settings(min_requests=50, max_p99_ratio=1.5, max_error_rate=0.01)
    fast, slow = (
        VariantWindow(requests=60, buckets=_hist(1e-3, 60)),
        VariantWindow(requests=60, buckets=_hist(20e-3, 60)),
    )
    w = Window(variants={"a": fast, "b": slow}, compared=60, max_abs_diff=0.0)
    gates = {g.name: g for g in judge(s, w, "b", "a")}
    assert gates["max_p99_ratio"].judged and not gates["max_p99_ratio"].ok
    assert breach(judge(s, w, "b", "a")).name == "max_p99_ratio"
    few = Window(variants={"a": fast, "b": VariantWindow(requests=5, buckets=_hist(20e-3, 5))})
    assert breach(judge(s, few, "b", "a")) is None  # 5 requests say nothing of a p99
    # The last step leaves the source no requests: no p99 to compare with in this window.
    alone = Window(variants={"b": slow}, compared=60)
    assert not {g.name: g for g in judge(s, alone, "b", "a")}["max_p99_ratio"].judged
    # One comparison beyond the limit is enough.
    diverged = Window(variants={"a": fast, "b": fast}, compared=1, max_abs_diff=0.5)
    assert breach(judge(s, diverged, "b", "a")).name == "max_abs_diff"
    # Mirrored requests that failed on the candidate count as its errors.
    failing = Window(variants={"a": fast}, compared=0, mirror_errors=50)
    gate = breach(judge(s, failing, "b", "a"))
    assert gate.name == "max_error_rate" and gate.value == 1.0
    agree = Settings(min_requests=10, min_argmax_agreement=0.99)
    split = Window(argmax_rows=100, argmax_agree=90, compared=100)
    assert breach(judge(agree, split, "b", "a")).name == "min_argmax_agreement"


def test_phases_end_after_their_seconds_and_requests() -> None:
    s = Settings(shadow_seconds=10, step_seconds=5, min_requests=20)
    w = Window(variants={"b": VariantWindow(requests=20)}, compared=19)
    assert not phase_done(s, SHADOW, 11, w, "b")  # 19 comparisons
    assert phase_done(s, SHADOW, 11, w.model_copy(update={"compared": 20}), "b")
    assert not phase_done(s, STEP, 4, w, "b")
    assert phase_done(s, STEP, 5, w, "b")


def test_phase_routing_builds_on_the_routing_before() -> None:
    base = make_policy(sticky_key="user", fallback=["a"])
    shadow = phase_policy(base, SHADOW, 0, "a", "b", 0.5)
    assert not shadow.weighted and shadow.shadow.variants == ("b",)
    step = phase_policy(base, STEP, 25, "a", "b", 0.5)
    assert dict(step.weights) == {"a": 75, "b": 25}
    assert step.shadow.variants == ("b", "a")  # each side mirrored to the other
    assert (step.sticky_key, step.fallback) == ("user", ("a",))


# =========================================================================================
# Integration: a real server under real traffic
# =========================================================================================


def build_scorer_onnx(path: Path, side: str) -> Path:
    """The demo scorer (weights seed 0) with a side branch whose result is multiplied by 0
    and added to the output, so that the outputs stay exactly the scorer's: "slow", a
    loop of 256x256 matmuls; "fail", a Reshape that fails on every request."""
    from onnx import TensorProto, helper, numpy_helper

    weights = mlp_weights()
    nodes = [
        helper.make_node("Gemm", ["input", "w1", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["a1"]),
        helper.make_node("Gemm", ["a1", "w2", "b2"], ["h2"]),
        helper.make_node("Relu", ["h2"], ["a2"]),
        helper.make_node("Gemm", ["a2", "w3", "b3"], ["logits"]),
    ]
    initializers = [numpy_helper.from_array(v, name=k) for k, v in weights.items()]
    initializers.append(numpy_helper.from_array(np.array([0.0], np.float32), "zero"))
    if side == "slow":
        w = (np.random.default_rng(0).standard_normal((256, 256)) / 16).astype(np.float32)
        initializers += [
            numpy_helper.from_array(w, "side_w"),
            numpy_helper.from_array(np.array(400, np.int64), "side_n"),
            numpy_helper.from_array(np.array(True), "side_c"),
        ]
        body = helper.make_graph(
            [
                helper.make_node("Identity", ["ci"], ["co"]),
                helper.make_node("MatMul", ["hi", "side_w"], ["m"]),
                helper.make_node("Tanh", ["m"], ["ho"]),
            ],
            "step",
            [
                helper.make_tensor_value_info("i", TensorProto.INT64, []),
                helper.make_tensor_value_info("ci", TensorProto.BOOL, []),
                helper.make_tensor_value_info("hi", TensorProto.FLOAT, ["batch", 256]),
            ],
            [
                helper.make_tensor_value_info("co", TensorProto.BOOL, []),
                helper.make_tensor_value_info("ho", TensorProto.FLOAT, ["batch", 256]),
            ],
        )
        nodes.append(helper.make_node("Loop", ["side_n", "side_c", "a1"], ["side"], body=body))
    else:
        bad = numpy_helper.from_array(np.array([-1, 7], np.int64), "bad_shape")
        initializers.append(bad)
        nodes.append(helper.make_node("Reshape", ["input", "bad_shape"], ["side"]))
    nodes += [
        helper.make_node("ReduceSum", ["side"], ["s"], keepdims=0),
        helper.make_node("Mul", ["s", "zero"], ["z"]),
        helper.make_node("Add", ["logits", "z"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        "scorer",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 10])],
        initializer=initializers,
    )
    return save_onnx(graph, path)


#: model -> its variants besides "a" (the demo scorer, the default).
MODELS = {
    "equal": {"b": "equal"},
    "diverge": {"odd": "other weights"},
    "slow": {"slow": "slow"},
    "failing": {"fail": "fail"},
    "aborted": {"b": "equal"},
    "refused": {"b": "equal", "gone": "broken"},
}


def write_models(root: Path, names: list[str]) -> Path:
    for name in names:
        build_mlp_onnx(root / name / "a" / "model.onnx", mlp_weights())
        for variant, kind in MODELS[name].items():
            path = root / name / variant / "model.onnx"
            if kind == "equal":
                build_mlp_onnx(path, mlp_weights())
            elif kind == "other weights":
                build_mlp_onnx(path, mlp_weights(seed=1))
            elif kind == "broken":
                path.parent.mkdir(parents=True)
                path.write_bytes(b"not a model")
            else:
                build_scorer_onnx(path, kind)
        (root / name / "config.toml").write_text(
            '# written by tests/test_rollout.py\ndefault_variant = "a"\n' + MLP_TENSORS
        )
    return root


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = write_models(tmp_path_factory.mktemp("rollout") / "models", list(MODELS))
    token = root.parent / "admin-token"
    token.write_text(ADMIN_TOKEN)
    with ServerProcess(root, root.parent, "--admin-token-file", str(token)) as proc:
        yield proc
    assert proc.proc is not None and proc.proc.returncode == 0, proc.log()


class Traffic:
    """Unpinned ModelInfer calls to ``model`` from several threads, each reconnecting
    every few calls (so that ``--workers`` spread them), until the block ends. Counts the
    variant (and worker) that answered each call, and the errors."""

    def __init__(self, address: str, model: str, threads: int = THREADS) -> None:
        self.address, self.model = address, model
        self.served: Counter[tuple[str, str]] = Counter()
        self.errors: Counter[str] = Counter()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def _run(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not self._stop.is_set():
            options = [("grpc.use_local_subchannel_pool", 1)]
            with grpc.insecure_channel(self.address, options=options) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                for _ in range(25):
                    if self._stop.is_set():
                        return
                    x = rng.standard_normal((1, 64)).astype(np.float32)
                    request = codec.encode_request(self.model, {"input": x})
                    try:
                        _, call = stub.ModelInfer.with_call(request, timeout=30)
                    except grpc.RpcError as e:
                        with self._lock:
                            self.errors[e.code().name] += 1
                        continue
                    time.sleep(0.002)  # about 500 requests/s per thread at most
                    trailing = dict(call.trailing_metadata() or ())
                    key = (trailing[VARIANT_METADATA_KEY], trailing.get(WORKER_METADATA_KEY, ""))
                    with self._lock:
                        self.served[key] += 1

    def variants(self) -> Counter[str]:
        with self._lock:
            out: Counter[str] = Counter()
            for (variant, _), n in self.served.items():
                out[variant] += n
            return out

    def __enter__(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)


def cli(server: ServerProcess, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tensorgate.server.cli", "rollout", *args, "--url", server.address],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "TENSORGATE_TOKEN": ADMIN_TOKEN},
    )


def status(server: ServerProcess, model: str) -> dict:
    """GetRollout, as ``tensorgate rollout status --json`` prints it."""
    with grpc.insecure_channel(server.address) as channel:
        stub = apb_grpc.RoutingAdminStub(channel)
        reply = stub.GetRollout(apb.GetRolloutRequest(model=model), timeout=10, metadata=AUTH)
    return json_format.MessageToDict(
        reply, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def route(server: ServerProcess, model: str) -> apb.ModelRoute:
    with grpc.insecure_channel(server.address) as channel:
        stub = apb_grpc.RoutingAdminStub(channel)
        return stub.GetRoutes(apb.GetRoutesRequest(model=model), timeout=10, metadata=AUTH).models[
            0
        ]


def rolled_back(server: ServerProcess, model: str, candidate: str, gate: str) -> dict:
    """Run a rollout of ``candidate`` under traffic that must roll back on ``gate``; check
    that the routing is what it was before, and return the final status."""
    before = route(server, model)
    with Traffic(server.address, model) as traffic:
        done = cli(server, "start", model, "--to", candidate, "--wait", *FAST)  # fmt: skip
        ended_at = sum(traffic.variants().values())
        time.sleep(1.0)  # traffic after the rollback
    assert done.returncode == 1, done.stdout + done.stderr
    final = status(server, model)
    assert final["state"] == "rolled_back" and final["reason"] == gate, final
    breached = {g["name"]: g for g in final["gates"]}[gate]
    assert breached["judged"] and not breached["ok"]
    assert gate in final["message"] and f"{breached['limit']:g}" in final["message"]
    after = route(server, model)
    assert after.route == before.route and after.overridden == before.overridden
    assert after.default_variant == "a"
    assert sum(traffic.variants().values()) > ended_at  # traffic kept flowing, all to "a"
    return final


def test_an_equal_variant_is_promoted_and_kept_after_a_restart(tmp_path: Path) -> None:
    root = write_models(tmp_path / "models", ["equal"])
    server = ServerProcess(root, tmp_path)
    with server, Traffic(server.address, "equal") as traffic:
        done = cli(server, "start", "equal", "--to", "b", "--steps", "20,60,100", *FAST)
        assert done.returncode == 0, done.stderr
        assert "shadow" in done.stdout  # the table of the first state
        seen: set[tuple[str, int]] = set()
        while (s := status(server, "equal"))["state"] in ("shadow", "step"):
            seen.add((s["state"], s["step"]))
            if s["state"] == "step":
                assert s["weight"] == [20, 60, 100][s["step"] - 1]
            time.sleep(0.05)
        assert s["state"] == "promoted", s
        assert ("shadow", 0) in seen and any(state == "step" for state, _ in seen)
        assert s["weight"] == 100 and s["reason"] == ""
        assert server.metric("tensorgate_rollout_state", model="equal", state="promoted") == 1
        assert server.metric("tensorgate_rollout_weight", model="equal", variant="b") == 100
        shown = cli(server, "status", "equal")
        assert shown.returncode == 0, shown.stderr
        for fragment in ("promoted", "max_abs_diff", "max_p99_ratio", "p99 ms", "holds"):
            assert fragment in shown.stdout, shown.stdout
        watched = cli(server, "status", "equal", "--watch", "--json")  # ended: one line
        assert watched.returncode == 0 and json.loads(watched.stdout)["state"] == "promoted"
        assert json.loads(cli(server, "status", "equal", "--json").stdout) == status(
            server, "equal"
        ) | {"elapsed_s": json.loads(cli(server, "status", "equal", "--json").stdout)["elapsed_s"]}
        time.sleep(0.5)
        before = traffic.variants()
        time.sleep(1.0)
        after = traffic.variants()
    assert after["b"] > before["b"] and after["a"] == before["a"]  # all of it to "b" now
    assert not traffic.errors, traffic.errors
    config = (root / "equal" / "config.toml").read_text()
    assert tomllib.loads(config)["default_variant"] == "b"
    assert config.startswith("# written by tests/test_rollout.py")  # comments kept
    with ServerProcess(root, tmp_path) as again:
        assert route(again, "equal").default_variant == "b"


def test_divergence_rolls_back_at_once(gateway: ServerProcess) -> None:
    final = rolled_back(gateway, "diverge", "odd", "max_abs_diff")
    assert final["max_abs_diff"] > 1e-4 and int(final["compared"]) > 0
    assert gateway.metric("tensorgate_rollout_state", model="diverge", state="rolled_back") == 1
    assert gateway.metric("tensorgate_rollout_weight", model="diverge", variant="odd") == 0


def test_a_slower_variant_rolls_back_on_latency(gateway: ServerProcess) -> None:
    final = rolled_back(gateway, "slow", "slow", "max_p99_ratio")
    slow = {v["name"]: v for v in final["variants"]}
    assert slow["slow"]["p99_ms"] > 3 * slow["a"]["p99_ms"]


def test_a_failing_variant_rolls_back_on_errors(gateway: ServerProcess) -> None:
    final = rolled_back(gateway, "failing", "fail", "max_error_rate")
    assert final["state"] == "rolled_back"


def test_abort_restores_the_routing(gateway: ServerProcess) -> None:
    before = route(gateway, "aborted")
    with Traffic(gateway.address, "aborted"):
        slow_steps = ("--shadow-seconds", "0", "--step-seconds", "60", "--min-requests", "5")
        slow_steps += ("--max-p99-ratio", "1000")  # nothing but the abort ends it
        done = cli(gateway, "start", "aborted", "--to", "b", "--steps", "50,100", *slow_steps)
        assert done.returncode == 0, done.stderr
        while status(gateway, "aborted")["state"] != "step":
            time.sleep(0.1)
        assert dict(route(gateway, "aborted").route.weights) == {"a": 50, "b": 50}
        done = cli(gateway, "abort", "aborted")
        assert done.returncode == 0, done.stderr
    final = status(gateway, "aborted")
    assert (final["state"], final["reason"]) == ("rolled_back", "aborted")
    after = route(gateway, "aborted")
    assert after.route == before.route and after.overridden == before.overridden


def test_refusals(gateway: ServerProcess) -> None:
    with grpc.insecure_channel(gateway.address) as channel:
        stub = apb_grpc.RoutingAdminStub(channel)

        def refused(code: grpc.StatusCode, fragment: str, **fields) -> None:
            with pytest.raises(grpc.RpcError) as e:
                stub.StartRollout(apb.StartRolloutRequest(**fields), timeout=10, metadata=AUTH)
            assert e.value.code() == code, e.value.details()
            assert fragment in e.value.details()

        refused(grpc.StatusCode.NOT_FOUND, "nope", model="nope", to_variant="b")
        refused(grpc.StatusCode.NOT_FOUND, "no variant 'c'", model="refused", to_variant="c")
        refused(grpc.StatusCode.FAILED_PRECONDITION, "not ready", model="refused",
                to_variant="gone")  # fmt: skip
        refused(grpc.StatusCode.INVALID_ARGUMENT, "steps 50,25", model="refused",
                to_variant="b", steps=[50, 25])  # fmt: skip
        refused(grpc.StatusCode.INVALID_ARGUMENT, "steps", model="refused", to_variant="b",
                steps=[5, 150])  # fmt: skip
        with Traffic(gateway.address, "refused", threads=2):
            first = stub.StartRollout(
                apb.StartRolloutRequest(model="refused", to_variant="b", step_seconds=60),
                timeout=10,
                metadata=AUTH,
            )
            refused(grpc.StatusCode.FAILED_PRECONDITION, "already running", model="refused",
                    to_variant="b")  # fmt: skip
            with pytest.raises(grpc.RpcError) as e:
                stub.SetRoute(
                    apb.SetRouteRequest(
                        model="refused",
                        update_mask={"paths": ["weights"]},
                        route=apb.RouteSpec(weights={"a": 1}),
                    ),
                    timeout=10,
                    metadata=AUTH,
                )
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            ended = stub.AbortRollout(
                apb.AbortRolloutRequest(model="refused"), timeout=10, metadata=AUTH
            )
        assert (ended.id, ended.state, ended.reason) == (first.id, "rolled_back", "aborted")
        with pytest.raises(grpc.RpcError) as e:
            stub.AbortRollout(apb.AbortRolloutRequest(model="refused"), timeout=10, metadata=AUTH)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # none running
        # Every rollout call needs the admin token.
        for call, request in (
            (stub.StartRollout, apb.StartRolloutRequest(model="refused", to_variant="b")),
            (stub.GetRollout, apb.GetRolloutRequest(model="refused")),
            (stub.AbortRollout, apb.AbortRolloutRequest(model="refused")),
        ):
            with pytest.raises(grpc.RpcError) as e:
                call(request, timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    done = cli(gateway, "start", "refused", "--to", "b", "--steps", "50,25", "--wait")
    assert done.returncode == 2 and "steps 50,25" in done.stderr


def test_one_rollout_drives_every_worker(tmp_path: Path) -> None:
    root = write_models(tmp_path / "models", ["equal"])
    server = ServerProcess(root, tmp_path, "--workers", "2")
    with server, Traffic(server.address, "equal", threads=6) as traffic:
        done = cli(server, "start", "equal", "--to", "b", "--steps", "50,100", "--wait", *FAST)
        assert done.returncode == 0, done.stdout + done.stderr
        final = status(server, "equal")  # from whichever worker this lands on
        assert final["state"] == "promoted" and final["workers"] == 2, final
        time.sleep(0.5)
        before = Counter(traffic.served)
        time.sleep(1.5)
        after = Counter(traffic.served)
        new = after - before
        assert {worker for _, worker in new} == {"0", "1"}, new  # both workers served...
        assert {variant for variant, _ in new} == {"b"}, new  # ...and both route to "b"
        assert tomllib.loads((root / "equal" / "config.toml").read_text())["default_variant"] == "b"
        # A rollout started on one worker, watched and aborted through the other.
        with worker_channels(server.address) as (lead, other):
            first = lead.StartRollout(
                apb.StartRolloutRequest(
                    model="equal", to_variant="a", steps=[50, 100], shadow_seconds=0,
                    step_seconds=60, min_requests=5, max_p99_ratio=1000,
                ),
                timeout=10,
            )  # fmt: skip
            deadline = time.monotonic() + 30
            while (
                other.GetRollout(apb.GetRolloutRequest(model="equal"), timeout=10).state != "step"
            ):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            for stub in (lead, other):  # the follower applies the step too
                (r,) = stub.GetRoutes(apb.GetRoutesRequest(model="equal"), timeout=10).models
                assert dict(r.route.weights) == {"a": 50, "b": 50}
            ended = other.AbortRollout(apb.AbortRolloutRequest(model="equal"), timeout=10)
            assert (ended.id, ended.state, ended.reason) == (first.id, "rolled_back", "aborted")
            for stub in (lead, other):  # both back to the routing before it
                (r,) = stub.GetRoutes(apb.GetRoutesRequest(model="equal"), timeout=10).models
                assert not r.route.weights and r.default_variant == "b" and not r.overridden


@contextmanager
def worker_channels(address: str) -> Iterator[tuple[apb_grpc.RoutingAdminStub, ...]]:
    """Admin stubs on two connections that reach different workers (told by the worker
    trailer of a ModelInfer on the same connection)."""
    found: dict[str, grpc.Channel] = {}
    opened = []
    try:
        for _ in range(64):
            channel = grpc.insecure_channel(address, [("grpc.use_local_subchannel_pool", 1)])
            opened.append(channel)
            x = np.zeros((1, 64), np.float32)
            _, call = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer.with_call(
                codec.encode_request("equal", {"input": x}), timeout=10
            )
            found.setdefault(dict(call.trailing_metadata())[WORKER_METADATA_KEY], channel)
            if len(found) == 2:
                yield tuple(apb_grpc.RoutingAdminStub(found[w]) for w in ("0", "1"))
                return
        raise AssertionError("64 connections all reached one worker")
    finally:
        for channel in opened:
            channel.close()
