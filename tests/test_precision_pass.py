"""The precision pass: int8 / bf16 / fp16 / fp8 rewrites, error budget, report, idempotence, declines."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt import ir
from graphopt.pass_infra import OptimizeContext
from graphopt.passes.precision import ReducedPrecision
from graphopt.precision.lower_float import remove_redundant_casts
from graphopt.precision.target import PrecisionTarget
from graphopt.verify import ErrorBudget, Verifier
from tests.support.precision_models import Encoderish, encoderish_model as _model  # noqa: F401

aten = torch.ops.aten
INT8 = "graphopt.int8_linear"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def _targets(gm) -> list[str]:
    return [ir.op_name(n) for n in gm.graph.nodes if n.op == "call_function"]


def _unfused_pipeline() -> list:
    """Cleanup then precision, without attention fusion: these tests look at the softmax island
    and at the attention matmuls, which the default pipeline would fuse into one sdpa first."""
    from graphopt.passes import cleanup_pipeline

    return cleanup_pipeline() + [ReducedPrecision()]


def _fresh(seed: int = 99) -> torch.Tensor:
    return torch.randn(4, 16, 64, generator=torch.Generator().manual_seed(seed))


def test_golden_ops_int8_linears_and_numerics_hold_the_budget_on_fresh_inputs():
    model, args = _model()
    result = graphopt.optimize(model, args, passes=_unfused_pipeline(), precision="int8", error_budget=0.02)
    rec = result.report.record("precision")
    assert rec.status == "applied", rec
    targets = _targets(result.module)
    assert targets.count(INT8) >= 5 and "aten.linear" not in targets or targets.count(INT8) >= 5
    assert result.report.final_numerics.ok
    with torch.no_grad():
        for seed in (7, 8, 9):  # inputs neither the example nor the verifier's
            x = _fresh(seed)
            assert _rel(result.module(x), model(x)) <= 0.02
    plan = result.report.extra["precision"]
    assert {e["precision"] for e in plan} >= {"int8", "fp32"}
    kept = [e for e in plan if e["precision"] == "fp32"]
    assert all("no constant weight" in e["reason"] for e in kept)  # the attention matmuls


def test_tight_budget_keeps_the_most_costly_nodes_and_names_them():
    model, args = _model()
    budget = 4e-3
    result = graphopt.optimize(model, args, precision="int8", error_budget=budget)
    rec = result.report.record("precision")
    assert rec.status == "applied", rec
    over = [d for d in rec.declined if "over budget" in d.reason]
    assert over, [d.reason for d in rec.declined]
    assert all("rel_l2" in d.reason for d in over)
    kept_names = {d.site.split(" ")[0] for d in over}
    remaining = {n.name for n in result.module.graph.nodes if n.op == "call_function"}
    assert kept_names <= remaining  # the kept nodes are still there, in fp32
    assert any(INT8 == t for t in _targets(result.module))  # and the rest is converted
    with torch.no_grad():
        for seed in (7, 8):
            x = _fresh(seed)
            assert _rel(result.module(x), model(x)) <= budget


def test_bf16_islands_and_casts():
    model, args = _model()
    result = graphopt.optimize(model, args, passes=_unfused_pipeline(), precision="bf16", error_budget=0.05)
    rec = result.report.record("precision")
    assert rec.status == "applied", rec
    gm = result.module
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        val = ir.tensor_meta(node)
        if node.target in (aten.softmax.int, aten._softmax.default, aten.layer_norm.default):
            assert ir.tensor_meta(node.args[0]).dtype == torch.float32, node  # fp32 island input
        if node.target == aten.linear.default:
            assert val.dtype == torch.bfloat16, node
    casts = [n for n in gm.graph.nodes if n.target == aten._to_copy.default]
    assert casts
    reasons = " ".join(d.reason for d in rec.declined)
    assert "softmax island" in reasons and "norm island" in reasons
    with torch.no_grad():
        out = gm(*args)
    assert out.dtype == torch.float32
    assert _rel(out, model(*args)) < 0.05


class TwoBranch(nn.Module):
    """h = fc1(x) + fc2(fc1(x)) feeding a LayerNorm: a residual add of two low-precision values."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.ln = nn.Linear(32, 32), nn.Linear(32, 32), nn.LayerNorm(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc1(x)
        return self.ln(y + self.fc2(y))


def test_residual_stream_stays_fp32_by_default_and_can_be_lowered():
    torch.manual_seed(0)
    model, args = TwoBranch().eval(), (torch.randn(4, 32),)
    residual = lambda gm: next(n for n in gm.graph.nodes if n.target == aten.add.Tensor  # noqa: E731
                               and all(isinstance(a, torch.fx.Node) for a in n.args[:2]))
    kept = graphopt.optimize(model, args, precision="bf16", error_budget=0.05).module
    assert ir.tensor_meta(residual(kept)).dtype == torch.float32
    lowered = graphopt.optimize(model, args, precision="bf16", error_budget=0.05,
                                precision_keep_residual_fp32=False).module
    assert ir.tensor_meta(residual(lowered)).dtype == torch.bfloat16


class Overflowing(nn.Module):
    """Activations far above 65504 before a matmul (an un-normalised feature scale)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * 1.0e5
        return self.fc2(torch.relu(self.fc1(h))) * 1e-5


def test_fp16_overflow_scaling_gives_finite_in_budget_outputs():
    torch.manual_seed(0)
    model, x = Overflowing().eval(), torch.randn(8, 32)
    # without scaling fp16 overflows: the model is built to
    with torch.no_grad():
        naive = model.half()(x.half()).float()
        model.float()
    assert not torch.isfinite(naive).all()
    result = graphopt.optimize(model, (x,), precision="fp16", error_budget=0.01)
    rec = result.report.record("precision")
    assert rec.status == "applied", rec
    assert any("scaling" in n for n in rec.notes)
    lowered = [n for n in result.module.graph.nodes if n.target in (aten.linear.default, aten.mm.default)
               and ir.tensor_meta(n).dtype == torch.float16]
    assert lowered, result.module.code  # the matmuls do run in fp16
    with torch.no_grad():
        for seed in (1, 2, 3):
            xf = torch.randn(8, 32, generator=torch.Generator().manual_seed(seed))
            out = result.module(xf)
            assert torch.isfinite(out).all()
            assert _rel(out, model(xf)) <= 0.01


def _pass_ctx(model, args, budget=0.02, **options):
    cap = graphopt.capture(model, args)
    ctx = OptimizeContext(args=cap.args, kwargs=cap.kwargs, flat_inputs=ir.flat_inputs(cap.args, cap.kwargs, cap.module),
                          error_budget=ErrorBudget(budget), options=options)
    ctx.verifier = Verifier(model, cap.args, cap.kwargs, cap.module, n_random=1)
    return cap.module, ctx


def test_pass_is_idempotent():
    model, args = _model()
    gm, ctx = _pass_ctx(model, args, precision="int8")
    first = ReducedPrecision()(ir.copy_graph_module(gm), ctx)
    assert first.modified
    second = ReducedPrecision()(ir.copy_graph_module(first.module), ctx)
    assert not second.modified
    assert _targets(second.module) == _targets(first.module)


def test_fp8_is_declined_on_cpu_with_the_reason():
    model, args = _model()
    result = graphopt.optimize(model, args, precision="fp8", error_budget=0.05)
    rec = result.report.record("precision")
    assert rec.status == "unchanged"
    assert any("compute capability >= 8.9" in d.reason and "cpu" in d.reason for d in rec.declined)
    assert INT8 not in _targets(result.module)


def test_fp8_rewrite_with_reference_kernel_on_a_target_that_claims_fp8():
    """The fp8 rewrite itself, exercised on CPU through the op's reference kernel."""
    model, args = _model()
    gm, ctx = _pass_ctx(model, args, budget=0.08)
    target = PrecisionTarget(torch.device("cpu"), "per_token_u7", fp8=True)
    res = ReducedPrecision("fp8", target=target)(ir.copy_graph_module(gm), ctx)
    assert res.modified
    assert _targets(res.module).count("graphopt.fp8_linear") >= 5
    assert _rel(res.module(*args), model(*args)) <= 0.08


def test_unknown_precision_is_an_error():
    with pytest.raises(ValueError, match="choose one of"):
        ReducedPrecision("int2")


def test_remove_redundant_casts_only_removes_lossless_round_trips():
    g = torch.fx.Graph()
    x = g.placeholder("x")
    x.meta["val"] = torch.empty(2, dtype=torch.bfloat16)
    up = g.call_function(aten._to_copy.default, (x,), {"dtype": torch.float32})
    back = g.call_function(aten._to_copy.default, (up,), {"dtype": torch.bfloat16})
    y = g.placeholder("y")
    y.meta["val"] = torch.empty(2, dtype=torch.float32)
    down = g.call_function(aten._to_copy.default, (y,), {"dtype": torch.bfloat16})
    up2 = g.call_function(aten._to_copy.default, (down,), {"dtype": torch.float32})
    g.output((back, up2))
    gm = torch.fx.GraphModule(torch.nn.Module(), g)
    assert remove_redundant_casts(gm) == 1  # bf16 -> fp32 -> bf16 goes; fp32 -> bf16 -> fp32 rounds: stays
    out = gm(torch.ones(2, dtype=torch.bfloat16), torch.full((2,), 1.001))
    assert out[0].dtype == torch.bfloat16 and out[1][0].item() != pytest.approx(1.001, abs=1e-6)


def test_gpt2_int8_with_top1_budget_and_pt2_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=512, attn_implementation="eager",
                                  use_cache=False)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 512, (2, 32))
    budget = ErrorBudget(rel_l2=0.03, top1=0.9)
    result = graphopt.optimize(model, (ids,), precision="int8", error_budget=budget)
    rec = result.report.record("precision")
    assert rec.status == "applied", rec
    assert INT8 in _targets(result.module)
    fresh = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref, out = model(fresh).logits, result.module(fresh).logits
    assert _rel(out, ref) <= 0.03
    assert float((out.argmax(-1) == ref.argmax(-1)).float().mean()) >= 0.9
    paths = result.save(tmp_path)
    loaded = graphopt.load(tmp_path)
    torch.testing.assert_close(loaded(fresh).logits, out)


def test_cli_precision_and_error_budget(tmp_path, capsys):
    from graphopt.cli import main

    code = main(["optimize", "examples:mlp", "-o", str(tmp_path / "out"), "--precision", "int8",
                 "--error-budget", "0.03", "--json"])
    assert code == 0
    report = __import__("json").loads(capsys.readouterr().out)
    rec = next(p for p in report["passes"] if p["name"] == "precision")
    assert rec["status"] == "applied"
    assert any("rel_l2 <= 0.03" in n for n in rec["notes"])
    assert (tmp_path / "out" / "model.pt2").exists()


class SharedOffset(nn.Module):
    """Every token carries the same large vector (like position/segment embeddings in a residual stream)."""

    def __init__(self) -> None:
        super().__init__()
        self.offset = nn.Parameter(torch.randn(64) * 4)
        self.fc1, self.fc2 = nn.Linear(64, 128), nn.Linear(128, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x + self.offset)))


def test_int8_input_shift_takes_a_shared_component_out_of_the_quantization():
    torch.manual_seed(0)
    model, args = SharedOffset().eval(), (torch.randn(4, 16, 64),)
    shifted = graphopt.optimize(model, args, precision="int8", error_budget=0.05)
    plain = graphopt.optimize(model, args, precision="int8", error_budget=0.05, precision_int8_shift=False)
    rec = shifted.report.record("precision")
    assert rec.status == "applied" and plain.report.record("precision").status == "applied"
    assert any(n.startswith("int8 input shift") for n in rec.notes), rec.notes
    calls = [n for n in shifted.module.graph.nodes if ir.op_name(n) == INT8]
    assert any(len(n.args) == 6 and n.args[5] is not None for n in calls)  # fc1 got its input shift
    assert all(len(n.args) == 5 for n in plain.module.graph.nodes if ir.op_name(n) == INT8)
    fc1 = next(e for e in shifted.report.extra["precision"] if e["module"] == "fc1")
    assert "input shifted" in fc1["reason"]
    with torch.no_grad():
        x = _fresh(11)
        ref = model(x)
        err_shifted, err_plain = _rel(shifted.module(x), ref), _rel(plain.module(x), ref)
    assert err_shifted < 0.5 * err_plain, (err_shifted, err_plain)


class TwoPaths(nn.Module):
    """A main path, and a side path whose linear has a huge own error but barely reaches the output."""

    def __init__(self) -> None:
        super().__init__()
        self.a1, self.a2, self.side = nn.Linear(64, 256), nn.Linear(256, 64), nn.Linear(64, 64)
        scale = torch.ones(64)
        scale[0] = 1e3  # one outlier channel takes the per-token range ...
        self.register_buffer("scale", scale)
        with torch.no_grad():
            self.side.weight[:, 0] = 0  # ... and contributes nothing: the side linear's own error is ~80%

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a2(torch.nn.functional.gelu(self.a1(x))) + 1e-4 * self.side(x * self.scale)


@pytest.mark.parametrize("sensitivity", ["model", "local"])
def test_search_ranks_by_whole_model_error(sensitivity):
    """Own-error ranking keeps the side linear first (its own error is largest) and needs two kept
    nodes; whole-model ranking keeps one main-path linear and converts the side linear."""
    torch.manual_seed(0)
    model, args = TwoPaths().eval(), (torch.randn(8, 16, 64),)
    gm, ctx = _pass_ctx(model, args, budget=1.5e-2, precision="int8", precision_sensitivity=sensitivity)
    res = ReducedPrecision()(ir.copy_graph_module(gm), ctx)
    assert res.modified
    plan = {e["module"]: e for e in ctx.report.extra["precision"]}
    assert plan["side"]["local_rel_l2"] is None or plan["side"]["local_rel_l2"] > 0.3
    kept = {m for m, e in plan.items() if e["precision"] == "fp32"}
    if sensitivity == "model":
        assert kept in ({"a1"}, {"a2"}), plan
        assert any("single-node whole-model runs" in n for n in res.notes)
        reason = plan[kept.pop()]["reason"]
        assert "with it alone in int8" in reason and "over budget" in reason
    else:
        assert "side" in kept and len(kept) == 2, plan
    with torch.no_grad():
        x = torch.randn(8, 16, 64, generator=torch.Generator().manual_seed(4))
        assert _rel(res.module(x), model(x)) <= 1.5e-2


class SeparateQKV(nn.Module):
    """q, k, v as three linears of the same input (BERT's layout)."""

    def __init__(self, d: int = 64) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        att = torch.softmax(self.q(x) @ self.k(x).transpose(-2, -1) / 8.0, dim=-1)
        return att @ self.v(x)


def test_int8_merges_linears_that_share_an_input_so_it_is_quantized_once():
    torch.manual_seed(0)
    model, x = SeparateQKV().eval(), torch.randn(2, 16, 64)
    result = graphopt.optimize(model, (x,), precision="int8", error_budget=0.05)
    merge = result.report.record("merge_matmuls")
    assert merge.status == "applied" and "quantized once" in merge.notes[0]
    assert _targets(result.module).count(INT8) == 1  # one int8 linear 64 -> 192, one quantization of x
    assert _rel(result.module(x), model(x)) < 0.05
    # an explicit policy still wins: three int8 linears, each quantizing x
    separate = graphopt.optimize(model, (x,), precision="int8", error_budget=0.05, merge_matmuls_policy="off")
    assert separate.report.record("merge_matmuls").status == "unchanged"
    assert _targets(separate.module).count(INT8) == 3


def _int8_weights(gm) -> list[torch.Tensor]:
    import operator

    return [operator.attrgetter(n.args[1].target)(gm) for n in gm.graph.nodes
            if n.op == "call_function" and ir.op_name(n) == INT8]


@pytest.mark.parametrize("target_pair_safe,option,expect_pair_safe", [
    (True, None, True), (False, None, False), (False, True, True), (True, False, False)])
def test_int8_weights_are_pair_safe_only_where_the_kernel_needs_it(target_pair_safe, option, expect_pair_safe):
    """A target whose kernel saturates plain weights (x86 without VNNI) gets pair-safe weights; a
    VNNI target plain per-channel ones (a finer step); precision_int8_pair_safe overrides either way.
    The numerics hold whichever it is (the op runs its reference where the kernel would saturate)."""
    from graphopt.ops import int8_linear

    model, args = _model()
    opts = {} if option is None else {"precision_int8_pair_safe": option}
    gm, ctx = _pass_ctx(model, args, budget=0.03, precision="int8", **opts)
    target = PrecisionTarget(torch.device("cpu"), "per_token_sym_u8", False, frozenset(), target_pair_safe)
    res = ReducedPrecision("int8", target=target)(ir.copy_graph_module(gm), ctx)
    assert res.modified
    weights = _int8_weights(res.module)
    assert len(weights) >= 5
    # Gaussian weights of this size always hold some adjacent pair that plain quantization leaves unsafe
    assert all(int8_linear.is_pair_safe(w) for w in weights) == expect_pair_safe
    expected_note = "int8 weights: pair-safe" if expect_pair_safe else "int8 weights: plain per channel"
    assert any(n.startswith(expected_note) for n in res.notes), res.notes
    assert _rel(res.module(*args), model(*args)) <= 0.03


def test_plain_int8_weights_are_more_accurate_than_pair_safe():
    model, args = _model()
    errors = {}
    for pair_safe in (True, False):
        gm, ctx = _pass_ctx(model, args, budget=0.5, precision="int8", precision_int8_pair_safe=pair_safe)
        target = PrecisionTarget(torch.device("cpu"), "per_token_sym_u8", False, frozenset(), True)
        res = ReducedPrecision("int8", target=target)(ir.copy_graph_module(gm), ctx)
        with torch.no_grad():
            errors[pair_safe] = _rel(res.module(_fresh(5)), model(_fresh(5)))
    assert errors[False] < errors[True], errors


class NarrowAndWide(nn.Module):
    """Two linears of equal shape on parallel paths; ``wide`` runs on 16x the tokens (16x the FLOPs):
    ``narrow_weight * narrow(x) + wide_weight * mean(wide(x repeated 16 times))``."""

    def __init__(self, narrow_weight: float, wide_weight: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.narrow, self.wide = nn.Linear(64, 64), nn.Linear(64, 64)
        self.narrow_weight, self.wide_weight = narrow_weight, wide_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        many = x.unsqueeze(1).expand(-1, 16, -1)
        return self.narrow_weight * self.narrow(x) + self.wide_weight * self.wide(many).mean(1)


def _int8_plan_of(model: nn.Module, budget: float):
    args = (torch.randn(32, 64, generator=torch.Generator().manual_seed(1)),)
    gm, ctx = _pass_ctx(model.eval(), args, budget=budget, precision="int8")
    target = PrecisionTarget(torch.device("cpu"), "per_token_u7", False, frozenset(), False)
    res = ReducedPrecision("int8", target=target)(ir.copy_graph_module(gm), ctx)
    return res, {e["module"]: e for e in ctx.report.extra["precision"]}


def test_search_keeps_the_node_that_saves_least_per_unit_of_error():
    """Only one of the two fits the budget in int8; ``wide`` costs the model a little more error. Ranked
    by error alone the search would keep ``wide`` and convert ``narrow``; ranked by error per FLOP saved
    (int8 without timings) it keeps ``narrow`` and converts ``wide``, which saves 16x the work."""
    res, plan = _int8_plan_of(NarrowAndWide(1.0, 1.2), budget=0.014)
    assert res.modified
    assert plan["wide"]["precision"] == "int8" and plan["narrow"]["precision"] == "fp32", plan
    assert "over budget" in plan["narrow"]["reason"]


def test_pair_safe_option_must_be_a_bool():
    model, args = _model()
    gm, ctx = _pass_ctx(model, args, precision="int8", precision_int8_pair_safe="maybe")
    with pytest.raises(ValueError, match="give True or False"):
        ReducedPrecision("int8")(ir.copy_graph_module(gm), ctx)


def test_a_node_over_budget_alone_is_kept_first_so_the_others_are_tried():
    """Per FLOP, ``wide`` saves the most and ranks as the cheapest to convert, but alone it breaks the
    budget (``narrow`` is damped 5x): kept last, it would stay converted in every trial and the bisection
    would end with nothing converted. Ranked first because its whole-model error alone is over the
    target, it is kept and ``narrow``, which fits, is converted."""
    res, plan = _int8_plan_of(NarrowAndWide(0.2, 1.0), budget=0.01)
    assert res.modified, res.notes
    assert plan["narrow"]["precision"] == "int8" and plan["wide"]["precision"] == "fp32", plan
    assert "with it alone in int8" in plan["wide"]["reason"], plan["wide"]["reason"]


class _LastPositionHead(torch.nn.Module):
    """An LM head on the last position only (``h[:, -1:]``, as generation's prefill runs it), and a linear over
    a transposed value."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(32, 32)
        self.head = torch.nn.Linear(32, 64, bias=False)
        self.across = torch.nn.Linear(6, 8, bias=False)

    def forward(self, x):
        h = self.body(x)
        return self.head(h[:, -1:, :]), self.across(h.transpose(1, 2))


def test_bf16_casts_give_a_sliced_row_major_value_row_major_strides():
    """CPU bf16 ``linear`` on a slice's strides multiplies by a copied, expanded weight: the cast makes the
    strides row-major (``memory_format=torch.contiguous_format``); a transposed value keeps its layout."""
    from graphopt.precision.lower_float import lower_float

    torch.manual_seed(0)
    model = _LastPositionHead().eval()
    x = torch.randn(2, 6, 32)
    gm = torch.export.export(model, (x,)).module()
    body = next(n for n in gm.graph.nodes if n.target == aten.linear.default)
    compute = {n.name for n in gm.graph.nodes if n.target == aten.linear.default and n is not body}
    lower_float(gm, compute, torch.bfloat16)  # the body stays fp32: the heads' inputs are cast
    gm.recompile()
    casts = {n.args[0].target: n.kwargs for n in gm.graph.nodes
             if n.target == aten._to_copy.default and n.kwargs.get("dtype") == torch.bfloat16}
    assert casts[aten.slice.Tensor].get("memory_format") == torch.contiguous_format, casts
    assert "memory_format" not in casts[aten.transpose.int], casts
    got, ref = gm(x), model(x)
    assert all(_rel(g.float(), r) < 2e-2 for g, r in zip(got, ref))
