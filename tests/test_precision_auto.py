"""precision='auto': the decision follows measured speed (injected timings and real ones)."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt import ir
from graphopt.pass_infra import OptimizeContext
from graphopt.passes.precision import ReducedPrecision
from graphopt.precision.speed import choose_precision, time_interleaved
from graphopt.precision.target import PrecisionTarget, cpu_flags, native_float_formats
from graphopt.verify import ErrorBudget, Verifier
from tests.support.precision_models import FakeTimer

CPU = torch.device("cpu")
#: an x86 CPU with AMX: bf16 is a candidate there
WITH_BF16 = PrecisionTarget(CPU, "per_token_u7", False, frozenset({"bf16"}))
#: the AVX2 development CPU: no native bf16
NO_BF16 = PrecisionTarget(CPU, "per_token_u7", False, frozenset())


def test_choose_precision_picks_the_fastest_faster_than_fp32():
    assert choose_precision({"fp32": 1.0, "int8": 0.4, "bf16": 4.0})[0] == "int8"
    assert choose_precision({"fp32": 1.0, "int8": 0.9, "bf16": 0.5})[0] == "bf16"


def test_choose_precision_never_picks_a_slower_conversion():
    choice, reason = choose_precision({"fp32": 1.0, "bf16": 4.0})
    assert choice == "fp32" and reason.startswith("slower on this target")
    choice, _ = choose_precision({"fp32": 1.0, "int8": 0.98}, min_speedup=1.05)
    assert choice == "fp32"


def test_time_interleaved_measures_each_callable():
    t = time_interleaved({"fast": lambda: None, "slow": lambda: sum(range(20000))}, rounds=3)
    assert set(t) == {"fast", "slow"} and t["fast"] < t["slow"]


def test_time_interleaved_with_repeat_times_each_callable_warm():
    # a callable is slow right after the other one ran (its data evicted), fast when it runs again
    last = {"who": None}

    def step(who: str):
        def run():
            time.sleep(0.02 if last["who"] != who else 0.001)
            last["who"] = who
        return run

    fns = {"a": step("a"), "b": step("b")}
    cold = time_interleaved(fns, rounds=2)
    warm = time_interleaved(fns, rounds=2, repeat=2)
    assert min(cold.values()) > 0.015 and max(warm.values()) < 0.015


def _mlp(d: int, hidden: int, batch: int):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d)).eval()
    return model, (torch.randn(batch, d),)


def _ctx(model, args, **options):
    cap = graphopt.capture(model, args)
    ctx = OptimizeContext(args=cap.args, kwargs=cap.kwargs, flat_inputs=ir.flat_inputs(cap.args, cap.kwargs, cap.module),
                          error_budget=ErrorBudget(0.03), options=options)
    ctx.verifier = Verifier(model, cap.args, cap.kwargs, cap.module, n_random=1)
    return cap.module, ctx


def test_auto_follows_injected_timings_bf16_slower():
    model, args = _mlp(64, 128, 16)
    gm, ctx = _ctx(model, args)
    timer = FakeTimer({"fp32": 1.0, "int8": 0.5, "bf16": 4.0})
    res = ReducedPrecision("auto", target=WITH_BF16, timer=timer)(ir.copy_graph_module(gm), ctx)
    assert res.modified
    plan = {e["precision"] for e in ctx.report.extra["precision"]}
    assert plan == {"int8"}
    assert any({"fp32", "int8", "bf16"} == c for c in timer.calls)  # bf16 was measured, then rejected


def test_auto_follows_injected_timings_bf16_faster():
    model, args = _mlp(64, 128, 16)
    gm, ctx = _ctx(model, args)
    res = ReducedPrecision("auto", target=WITH_BF16, timer=FakeTimer({"fp32": 1.0, "int8": 0.8, "bf16": 0.3}))(
        ir.copy_graph_module(gm), ctx)
    assert res.modified
    assert {e["precision"] for e in ctx.report.extra["precision"]} == {"bf16"}


def test_auto_never_considers_bf16_without_native_units():
    """Capability first: even if bf16 would win the (injected) microbenchmark, a target without
    native bf16 never measures or picks it, and the report says why."""
    model, args = _mlp(64, 128, 16)
    gm, ctx = _ctx(model, args)
    timer = FakeTimer({"fp32": 1.0, "int8": 0.8, "bf16": 0.3})
    res = ReducedPrecision("auto", target=NO_BF16, timer=timer)(ir.copy_graph_module(gm), ctx)
    assert all("bf16" not in c for c in timer.calls), timer.calls
    assert {e["precision"] for e in ctx.report.extra["precision"]} == {"int8"}
    assert any("bf16 not considered: no native bf16" in n for n in res.notes), res.notes


def test_native_float_formats_come_from_cpu_flags():
    avx2 = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma f16c\n"
    spr = "flags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile avx512_fp16\n"
    arm = "Features\t: fp asimd asimdhp bf16 i8mm\n"
    assert cpu_flags(avx2) >= {"avx2", "f16c"}
    assert native_float_formats("cpu", cpu_flags(avx2)) == frozenset()  # f16c converts, it does not compute
    assert native_float_formats("cpu", cpu_flags(spr)) == {"bf16", "fp16"}
    assert native_float_formats("cpu", cpu_flags(arm)) == {"bf16", "fp16"}
    assert native_float_formats("cpu", []) == frozenset()  # unknown CPU: no float candidates
    assert PrecisionTarget.detect("cpu", cpu_flags=["avx2"]).auto_candidates() in (["int8"], [])
    assert "bf16" in PrecisionTarget.detect("cpu", cpu_flags=["amx_bf16"]).auto_candidates()


def test_auto_keeps_fp32_when_the_whole_plan_is_not_faster():
    model, args = _mlp(64, 128, 16)
    gm, ctx = _ctx(model, args)
    timer = FakeTimer({"fp32": 1.0, "int8": 0.5, "bf16": 4.0, "int8wo": 4.0}, graph={"fp32": 1.0, "plan": 1.2})
    res = ReducedPrecision("auto", timer=timer)(ir.copy_graph_module(gm), ctx)
    assert not res.modified
    assert any("slower on this target" in d.reason for d in res.declined)


class _WholeGraphSlowOnce(FakeTimer):
    """The whole plan times slower the first time, faster the second (a disturbed timing)."""

    def __init__(self, cost: dict[str, float], graphs: list[dict[str, float]]) -> None:
        super().__init__(cost)
        self.graphs = graphs

    def __call__(self, fns, **kw):
        if set(fns) == {"fp32", "plan"}:
            self.calls.append(set(fns))
            return dict(self.graphs.pop(0))
        return super().__call__(fns, **kw)


def test_a_plan_timed_slower_once_is_timed_again_before_it_is_dropped():
    model, args = _mlp(64, 128, 16)
    cost = {"fp32": 1.0, "int8": 0.5, "bf16": 4.0, "int8wo": 4.0}
    gm, ctx = _ctx(model, args)
    timer = _WholeGraphSlowOnce(cost, [{"fp32": 1.0, "plan": 1.2}, {"fp32": 1.1, "plan": 0.6}])
    res = ReducedPrecision("auto", timer=timer)(ir.copy_graph_module(gm), ctx)
    assert res.modified and not timer.graphs, "the second timing (the faster of each) decides"
    assert any("whole model: 600.0 ms with the plan vs 1000.0 ms in fp32" in n for n in res.notes)
    gm, ctx = _ctx(model, args)
    timer = _WholeGraphSlowOnce(cost, [{"fp32": 1.0, "plan": 1.2}, {"fp32": 1.1, "plan": 1.3}])
    res = ReducedPrecision("auto", timer=timer)(ir.copy_graph_module(gm), ctx)
    assert not res.modified and any("slower on this target" in d.reason for d in res.declined)


def test_auto_on_this_cpu_never_picks_bf16_measured():
    """This machine's own capabilities and real timings: on a CPU without native bf16 it is never
    picked (on one with native bf16 it may be, when measured faster)."""
    model, args = _mlp(512, 1024, 64)
    result = graphopt.optimize(model, args, precision="auto", error_budget=0.03, n_random_inputs=1)
    rec = result.report.record("precision")
    plan = result.report.extra.get("precision", [])
    assert plan  # the decision is reported whether or not anything was converted
    for e in plan:  # every decision carries its measured timings
        assert "ms" in e["reason"], e
    has_bf16_values = any(n.meta["val"].dtype == torch.bfloat16 for n in result.module.graph.nodes
                          if isinstance(n.meta.get("val"), torch.Tensor))
    picked_bf16 = any(e["precision"] == "bf16" for e in plan)
    assert has_bf16_values == picked_bf16, plan  # the graph holds bf16 exactly when the plan says so
    if "bf16" not in PrecisionTarget.detect("cpu").native_floats:
        assert not picked_bf16, plan
    assert rec.status in ("applied", "unchanged")


class TwoPaths(nn.Module):
    """Two linears in a row, each about 1.3-1.5 % off in 7-bit int8 alone and 0.3 % in bf16."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(64, 128), nn.Linear(128, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def _two_paths_auto(cost: dict[str, float]):
    """TwoPaths through auto on a bf16 target with injected op timings, budget rel L2 2e-2."""
    model = TwoPaths().eval()
    gm, ctx = _ctx(model, (torch.randn(32, 64),))
    ctx.error_budget = ErrorBudget(0.02)
    res = ReducedPrecision("auto", target=WITH_BF16, timer=FakeTimer(cost))(ir.copy_graph_module(gm), ctx)
    return model, res, ctx


def test_auto_falls_back_to_bf16_where_int8_breaks_the_budget():
    """int8 is fastest for both linears, but both in int8 break the budget (2e-2, searched at 1.6e-2):
    the search keeps one out of int8, and auto gives it the next fastest precision measured faster
    than fp32 (bf16), which holds the budget, instead of fp32. The report says which node and why; the
    budget holds on fresh inputs."""
    model, res, ctx = _two_paths_auto({"fp32": 1.0, "int8": 0.3, "bf16": 0.6})
    assert res.modified
    plan = {e["node"]: e for e in ctx.report.extra["precision"]}
    assert sorted(e["precision"] for e in plan.values()) == ["bf16", "int8"], plan
    fell_back = next(e for e in plan.values() if e["precision"] == "bf16")
    assert "int8 was over budget" in fell_back["reason"], fell_back
    assert any(n.startswith("fallback: 1 of 1 nodes") for n in res.notes), res.notes
    with torch.no_grad():
        x = torch.randn(32, 64, generator=torch.Generator().manual_seed(5))
        ref = model(x)
        assert float((res.module(x) - ref).norm() / ref.norm()) <= 0.02


def test_auto_does_not_fall_back_to_a_precision_slower_than_fp32():
    _model, res, ctx = _two_paths_auto({"fp32": 1.0, "int8": 0.3, "bf16": 1.5})
    precisions = sorted(e["precision"] for e in ctx.report.extra["precision"])
    assert precisions == ["fp32", "int8"], precisions
    assert not any(n.startswith("fallback") for n in res.notes)


#: an H100's capabilities (int8 through torch._int_mm, fp8, native bf16 and fp16); on the CPU every
#: kernel runs as its reference, which computes the same numbers
GPU_LIKE = PrecisionTarget(CPU, "per_token_s8", True, frozenset({"bf16", "fp16"}))


def test_auto_on_a_gpu_like_target_mixes_fp8_int8_bf16_and_exports(tmp_path):
    """The decisions a GPU run makes, on the CPU: fp8 timed fastest, int8 next, bf16 after. A Llama
    in fp8 everywhere breaks a tight budget (e4m3 keeps 3 mantissa bits), so the search keeps nodes
    out of fp8 and the fallback gives them a faster-than-fp32 precision with a smaller own error.
    The mixed plan holds the budget on fresh inputs, the report names every node's precision, and
    the graph exports to ONNX and matches in onnxruntime."""
    transformers = __import__("pytest").importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=128, vocab_size=256, attn_implementation="eager",
                                   use_cache=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 256, (2, 16))
    cap = graphopt.capture(model, (ids,))
    budget = ErrorBudget(0.02)
    ctx = OptimizeContext(args=cap.args, kwargs=cap.kwargs, flat_inputs=ir.flat_inputs(cap.args, cap.kwargs, cap.module),
                          error_budget=budget, options={})
    ctx.verifier = Verifier(model, cap.args, cap.kwargs, cap.module, n_random=1)
    timer = FakeTimer({"fp32": 1.0, "fp8": 0.25, "int8": 0.4, "bf16": 0.6})
    res = ReducedPrecision("auto", target=GPU_LIKE, timer=timer)(ir.copy_graph_module(cap.module), ctx)
    assert res.modified
    assert any({"fp32", "fp8", "int8", "bf16"} <= c for c in timer.calls)  # every candidate was timed
    plan = {e["node"]: e for e in ctx.report.extra["precision"]}
    used = {e["precision"] for e in plan.values()}
    assert "fp8" in used and used & {"int8", "bf16"}, plan  # fastest where it fits, the fallback elsewhere
    assert any(n.startswith("fallback:") for n in res.notes), res.notes
    targets = {str(n.target) for n in res.module.graph.nodes if n.op == "call_function"}
    assert "graphopt.fp8_linear.default" in targets
    with torch.no_grad():
        fresh = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(7))
        ref = model(fresh).logits
        got = res.module(fresh)
        got = got.logits if hasattr(got, "logits") else got[0]
        assert float((got.float() - ref).norm() / ref.norm()) <= 0.02
    exported = graphopt.export_onnx(res.module, tmp_path / "mixed.onnx", (ids,), n_random_inputs=1)
    assert exported.numerics is not None and exported.numerics.ok, exported.numerics
    if "bf16" in used:  # onnxruntime's CPU provider has no bf16 MatMul: computed in float32 between casts
        assert exported.rewrites.get("bf16_in_float32", 0) >= 1, exported.rewrites


class _ModelTimer:
    """Injected timings, routed as the pass asks: the whole plan against fp32, the groups left in fp32 converted
    together, the per-node plan against its rivals, a graph timed in the model (``rounds`` given), an op alone. Subclasses set what each returns."""

    plan = {"fp32": 1.0, "plan": 0.9}
    alone = {"fp32": 1.0, "int8": 0.5, "bf16": 0.9}

    def together(self) -> dict[str, float]:
        return {"fp32": 1.0, "together": 1.0}  # not faster: nothing more converted

    def group(self, fns) -> dict[str, float]:
        raise NotImplementedError

    def __call__(self, fns, **kw):
        if set(fns) == {"fp32", "plan"}:
            return dict(self.plan)
        if set(fns) == {"fp32", "together"}:
            return self.together()
        if "auto" in fns:  # the per-node plan against precisions run alone: the per-node plan is kept
            return {k: 0.5 if k == "auto" else 1.0 for k in fns}
        if kw.get("rounds") is not None:  # a graph timed in the model (ops alone are timed at the default rounds)
            timings = self.group(fns)
            return {k: timings[k] for k in fns}
        return {k: self.alone[k] for k in fns}


class _InModelTimer(_ModelTimer):
    """Alone, int8 times fastest; inside the whole graph (the in-model rounds) bf16 does and int8 is slower."""

    plan = {"fp32": 1.0, "plan": 0.5}

    def __init__(self) -> None:
        self.whole_graph_calls = 0

    def group(self, fns):
        self.whole_graph_calls += 1
        for fn in fns.values():
            fn()  # the graphs built for the group run
        return {"fp32": 1.0, "int8": 1.2, "bf16": 0.8}


def test_auto_timed_in_the_model_follows_the_whole_graph_not_the_op_alone():
    model, args = _mlp(64, 128, 16)
    other = ((torch.randn(16, 64),), {})  # what the graph is timed on (this capture is static: same shape)
    gm, ctx = _ctx(model, args, precision_timing="model", precision_timing_inputs=other)
    timer = _InModelTimer()
    res = ReducedPrecision("auto", target=WITH_BF16, timer=timer)(ir.copy_graph_module(gm), ctx)
    assert res.modified
    assert timer.whole_graph_calls == 2  # two groups: the 64 -> 128 and the 128 -> 64 linear
    entries = ctx.report.extra["precision"]
    assert {e["precision"] for e in entries if "linear" in e["node"]} == {"bf16"}, entries
    assert all("the whole graph" in e["reason"] for e in entries if "linear" in e["node"])
    assert any("speed timed in the model" in n for n in res.notes)
    # timed alone, the same timings pick int8
    gm, ctx = _ctx(model, args)
    ReducedPrecision("auto", target=WITH_BF16, timer=_InModelTimer())(ir.copy_graph_module(gm), ctx)
    assert {e["precision"] for e in ctx.report.extra["precision"] if "linear" in e["node"]} == {"int8"}


def test_the_same_graph_on_the_same_machine_record_is_timed_in_the_model_once():
    """A re-plan (the same graph, another budget) reuses the in-model timings kept on the machine record its
    context shares; a fresh record times again."""
    from graphopt.target import TargetInfo

    model, args = _mlp(64, 128, 16)
    gm, _ = _ctx(model, args)
    machine, timer = TargetInfo(), _InModelTimer()
    plans, notes = [], []
    for budget, record in ((0.03, machine), (0.02, machine), (0.03, TargetInfo())):
        _, ctx = _ctx(model, args, precision_timing="model")
        ctx.target, ctx.error_budget = record, ErrorBudget(budget)
        res = ReducedPrecision("auto", target=WITH_BF16, timer=timer)(ir.copy_graph_module(gm), ctx)
        plans.append({e["node"]: e["precision"] for e in ctx.report.extra["precision"]})
        notes.append(res.notes)
    assert timer.whole_graph_calls == 4, timer.whole_graph_calls  # two groups, timed for the 1st and the 3rd run
    assert plans[0] == plans[1] == plans[2] and set(plans[0].values()) == {"bf16"}, plans
    assert any("reused this graph's timings" in n for n in notes[1]), notes[1]
    assert not any("reused" in n for n in notes[0] + notes[2])
    assert any("speed timed in the model: 2 groups" in n for n in notes[1])  # the first run's notes, kept


class _CloseCallTimer(_ModelTimer):
    """In the model, bf16 first times 0.5% faster (under MODEL_MIN_SPEEDUP), then ``second`` of fp32's time."""

    def __init__(self, second: float) -> None:
        self.second, self.whole_graph_calls = second, 0

    def group(self, fns):
        self.whole_graph_calls += 1
        return {"fp32": 1.0, "int8": 1.2, "bf16": 0.995 if self.whole_graph_calls % 2 else self.second}


class _TogetherTimer(_ModelTimer):
    """In the model no group alone is faster; the groups left in fp32 converted together take ``together``."""

    def __init__(self, together: float) -> None:
        self.together_s, self.together_calls = together, 0

    def together(self):
        self.together_calls += 1
        return {"fp32": 1.0, "together": self.together_s}

    def group(self, fns):  # 0.5% faster at best, under the threshold
        return {"fp32": 1.0, "int8": 1.0, "bf16": 0.995}


@pytest.mark.parametrize("together, converted", [(0.9, True), (0.995, False)])
def test_groups_left_in_fp32_are_converted_together_where_that_is_faster(together, converted):
    model, args = _mlp(64, 128, 16)
    gm, ctx = _ctx(model, args, precision_timing="model")
    timer = _TogetherTimer(together)
    res = ReducedPrecision("auto", target=WITH_BF16, timer=timer)(ir.copy_graph_module(gm), ctx)
    linears = {e["precision"] for e in ctx.report.extra["precision"] if "linear" in e["node"]}
    # taken: each node in the precision fastest alone (int8); a close call is timed twice, then left
    assert linears == ({"int8"} if converted else {"fp32"}), ctx.report.extra["precision"]
    assert timer.together_calls == (1 if converted else 2)
    notes = res.notes + [d.reason for d in res.declined]
    assert any("converted together" in n and ("taken" if converted else "left in fp32") in n for n in notes), notes
    assert res.modified is converted


@pytest.mark.parametrize("second, converted", [(0.98, True), (0.996, False)])
def test_a_group_faster_by_less_than_the_threshold_is_timed_again(second, converted):
    model, args = _mlp(64, 128, 16)
    gm, ctx = _ctx(model, args, precision_timing="model")
    timer = _CloseCallTimer(second)
    res = ReducedPrecision("auto", target=WITH_BF16, timer=timer)(ir.copy_graph_module(gm), ctx)
    assert timer.whole_graph_calls == 4  # each of the two groups timed twice
    linears = {e["precision"] for e in ctx.report.extra["precision"] if "linear" in e["node"]}
    assert linears == ({"bf16"} if converted else {"fp32"}), ctx.report.extra["precision"]
    assert res.modified is converted


def test_precision_timing_inputs_must_be_args_and_kwargs():
    from graphopt.errors import OptionError

    model, args = _mlp(16, 32, 4)
    with pytest.raises(OptionError, match="precision_timing_inputs"):
        graphopt.optimize(model, args, precision="auto", precision_timing_inputs=(args,))


#: a CPU with native bf16 and int8 weight-only kernels: auto's candidates are int8, int8wo and bf16
WITH_INT8WO = PrecisionTarget(CPU, "per_token_u7", False, frozenset({"bf16"}), weight_only=frozenset({"int8wo"}))


class _RivalTimer(FakeTimer):
    """Per node int8 is the fastest (int8wo 2% behind it, a tie; bf16 slower than fp32); the per-node plan against the
    rival plans: ``rounds``."""

    def __init__(self, rounds: list[dict[str, float]]) -> None:
        super().__init__({"fp32": 1.0, "int8": 0.5, "int8wo": 0.51, "bf16": 4.0})
        self.rounds, self.rival_calls = rounds, 0

    def __call__(self, fns, **kw):
        if "auto" in fns:
            self.rival_calls += 1
            return dict(self.rounds.pop(0))
        return super().__call__(fns, **kw)


def _auto_with_rival(rounds: list[dict[str, float]], monkeypatch):
    """auto on an MLP whose per-node plan is int8 at both linears, int8 weight-only tied with it: the rival runs
    whatever its ceiling says (here it has nothing left to gain; the ceiling is tested apart, below)."""
    from graphopt.passes.precision.run import PrecisionRun

    monkeypatch.setattr(PrecisionRun, "_could_win", lambda self, precision, plan, total: True)
    model, args = _mlp(64, 128, 16)
    gm, ctx = _ctx(model, args)
    timer = _RivalTimer(rounds)
    res = ReducedPrecision("auto", target=WITH_INT8WO, timer=timer)(ir.copy_graph_module(gm), ctx)
    return res, ctx, timer


def test_auto_takes_a_more_accurate_precision_alone_when_it_is_faster_end_to_end(monkeypatch):
    res, ctx, timer = _auto_with_rival([{"auto": 1.0, "int8wo": 0.8}], monkeypatch)
    assert res.modified and timer.rival_calls == 1 and not timer.rounds
    entries = ctx.report.extra["precision"]
    assert {e["precision"] for e in entries if "linear" in e["node"]} == {"int8wo"}, entries
    assert all("auto took precision='int8wo' alone: 1.25x faster end to end than its per-node plan (int8: 2;"
               in e["reason"] for e in entries), entries
    assert res.notes[0].startswith("auto took precision='int8wo' alone"), res.notes
    assert any("rival precision='int8wo' alone: more accurate than the per-node choice and timed within 1.05x of it "
               "at 2 node(s) (linear, linear_1)" in n for n in res.notes), res.notes


def test_auto_keeps_its_per_node_plan_when_the_rival_is_not_faster(monkeypatch):
    res, ctx, timer = _auto_with_rival([{"auto": 0.8, "int8wo": 1.0}], monkeypatch)
    assert res.modified and timer.rival_calls == 1
    assert {e["precision"] for e in ctx.report.extra["precision"] if "linear" in e["node"]} == {"int8"}
    assert any("rivals alone, end to end: auto 800.000 ms, int8wo 1000.000 ms" in n and "kept" in n
               for n in res.notes), res.notes


@pytest.mark.parametrize("second, taken", [(0.9, True), (0.998, False)])
def test_a_rival_faster_by_less_than_the_threshold_is_timed_again(second, taken, monkeypatch):
    res, ctx, timer = _auto_with_rival([{"auto": 1.0, "int8wo": 0.995}, {"auto": 1.0, "int8wo": second}],
                                       monkeypatch)
    assert timer.rival_calls == 2 and not timer.rounds
    linears = {e["precision"] for e in ctx.report.extra["precision"] if "linear" in e["node"]}
    assert linears == ({"int8wo"} if taken else {"int8"})


@pytest.mark.parametrize("int8wo", [1.5, 0.6])  # slower than fp32; faster, but 20% behind int8: no tie
def test_no_rival_runs_where_no_more_accurate_precision_timed_as_fast(int8wo):
    model, args = _mlp(64, 128, 16)
    gm, ctx = _ctx(model, args)
    timer = FakeTimer({"fp32": 1.0, "int8": 0.5, "int8wo": int8wo, "bf16": 4.0})
    res = ReducedPrecision("auto", target=WITH_INT8WO, timer=timer)(ir.copy_graph_module(gm), ctx)
    assert res.modified and not any("auto" in c for c in timer.calls)
    assert {e["precision"] for e in ctx.report.extra["precision"] if "linear" in e["node"]} == {"int8"}
    assert not any("rival" in n for n in res.notes), res.notes


def _bare_run():
    """An auto PrecisionRun on the MLP whose timings and errors a test sets by hand."""
    from graphopt.passes.precision.run import PrecisionRun

    model, args = _mlp(64, 128, 16)
    gm, ctx = _ctx(model, args)
    return PrecisionRun(FakeTimer({}), gm, ctx, WITH_INT8WO, "auto", True)


def test_a_tie_at_nodes_that_save_little_of_the_plan_is_no_rival():
    """rivals(): a more accurate precision tied with the chosen one only where the plan saves 5% is not worth a
    second search; the same tie where it saves half the plan is (a node the plan left fp32 gives it something to
    gain: its ceiling, tested below)."""
    run = _bare_run()
    plan = {"big": "int8wo", "small": "int8"}
    for share, expected in ((0.05, {}), (0.5, {"int8wo": ["small"]})):
        run.timings = {"big": {"fp32": 1.0, "int8wo": 1.0 - (1 - share)},
                       "small": {"fp32": 1.0, "int8": 1.0 - share, "int8wo": 1.0 - share * 0.98},
                       "left_fp32": {"fp32": 1.0, "int8wo": 0.5}}
        run.errors = {("big", "int8wo"): 1e-3, ("small", "int8"): 2e-2, ("small", "int8wo"): 1e-3}
        assert run.rivals(plan) == expected, share


def _tied_run(plan_seconds: float | None, left_fp32: float | None):
    """A run whose plan took int8 at two nodes where int8 weight-only timed 2% behind (a tie) and is more accurate;
    ``left_fp32``: int8 weight-only's timing at a third node the plan left fp32 (None: no such node)."""
    run = _bare_run()
    run.timings = {n: {"fp32": 1.0, "int8": 0.5, "int8wo": 0.51} for n in ("a", "b")}
    run.errors = {(n, p): e for n in ("a", "b") for p, e in (("int8", 2e-2), ("int8wo", 1e-3))}
    if left_fp32 is not None:
        run.timings["c"] = {"fp32": 1.0, "int8": 0.5, "int8wo": left_fp32}
    run.plan_seconds = plan_seconds
    return run, {"a": "int8", "b": "int8"}


def test_a_rival_with_only_its_ties_to_gain_by_is_not_run_and_the_notes_say_why():
    run, plan = _tied_run(plan_seconds=2.0, left_fp32=None)
    assert run.rival_ceiling("int8wo", plan) == pytest.approx(1.0)  # the ties at the plan's speed: its saving
    assert run.rivals(plan) == {}
    assert len(run.rivals_skipped) == 1 and run.rivals_skipped[0].startswith(
        "rival precision='int8wo' not run: at best") and "+0.000 ms" in run.rivals_skipped[0], run.rivals_skipped


@pytest.mark.parametrize("plan_seconds, left_fp32, runs", [
    (2.0, 0.9, True),     # 0.1 s more at a node left fp32: over the 1% of 2 s it needs
    (20.0, 0.9, False),   # the same 0.1 s is under 1% of a 20 s plan
    (None, 0.999, True),  # the plan's time unknown: any gain runs it
    (2.0, 1.2, False),    # slower than fp32 where the plan left fp32: nothing to gain there
])
def test_a_rival_runs_only_where_its_ceiling_beats_the_plan_by_the_threshold(plan_seconds, left_fp32, runs):
    run, plan = _tied_run(plan_seconds, left_fp32)
    assert (run.rivals(plan) == {"int8wo": ["a", "b"]}) is runs, run.rivals_skipped
    assert bool(run.rivals_skipped) is not runs