"""The ``blocked`` pass: golden ops, numerics, idempotence, declines, budgets and their errors."""

from __future__ import annotations

import math

import pytest
import torch

import graphopt
from graphopt import ir
from graphopt.examples_models import nanogpt
from graphopt.pass_infra import OptimizeContext
from graphopt.passes.analysis.blocked_liveness import memory_profile
from graphopt.passes.analysis.blockable_sites import find_blockable_sites
from graphopt.errors import OptionError
from graphopt.passes.blocked import BlockedOperators, BudgetError, plan_blocking
from graphopt.row_slicing import RowSlicer, functionalize_inplace

from tests.support._blocked_models import BiasedAttention, FFNStack, LMHeadReductions, gpt2, llama, rel_l2, t5_encoder

aten, gops = torch.ops.aten, torch.ops.graphopt


def targets(gm: torch.fx.GraphModule) -> set:
    return {n.target for n in gm.graph.nodes if n.op == "call_function"}


def run_pass(model, args, **options):
    """Capture, then run only the blocked pass (with the pass manager's contract) on a context."""
    cap = graphopt.capture(model, args)
    gm = cap.module
    flat = ir.flat_inputs(cap.args, cap.kwargs, gm)
    ir.refresh_meta(gm, flat)
    ctx = OptimizeContext(args=cap.args, kwargs=cap.kwargs, flat_inputs=flat,
                          memory_budget=options.pop("memory_budget", None), options=options)
    work = ir.copy_graph_module(gm)
    return gm, BlockedOperators()(work, ctx), ctx


def check_outputs(model, module, args, tol=1e-5):
    with torch.no_grad():
        ref, out = model(*args), module(*args)
    ref_leaves, out_leaves = torch.utils._pytree.tree_leaves(ref), torch.utils._pytree.tree_leaves(out)
    assert len(ref_leaves) == len(out_leaves)
    for r, o in zip(ref_leaves, out_leaves):
        if isinstance(r, torch.Tensor) and r.dtype.is_floating_point:
            assert rel_l2(o, r) <= tol
        elif isinstance(r, torch.Tensor):
            assert torch.equal(o, r)


# ---------------------------------------------------------------- golden ops and numerics per site kind

def test_nanogpt_forced_blocks_golden_ops_and_numerics():
    model, args = nanogpt(n_layer=2, seq=37)
    _, result, _ = run_pass(model, args, block_q=8, block_kv=5, block_ffn=7)
    assert result.modified
    ops = targets(result.module)
    assert gops.blocked_attention.default in ops and gops.chunked_ffn.default in ops
    assert aten.softmax.int not in ops and aten.gelu.default not in ops
    check_outputs(model, result.module, args)
    assert sum(n.target is gops.blocked_attention.default for n in result.module.graph.nodes) == 2


@pytest.mark.parametrize("q_block,kv_block", [(1, 1), (5, 3), (64, 64), (0, 7)])
@pytest.mark.parametrize("bias", ["alibi", "learned"])
def test_biased_attention_block_sizes(q_block, kv_block, bias):
    torch.manual_seed(0)
    model = BiasedAttention(bias=bias, causal=True).eval()
    args = (torch.randn(2, 23, 32),)
    _, result, _ = run_pass(model, args, block_q=q_block, block_kv=kv_block)
    assert gops.blocked_attention.default in targets(result.module)
    check_outputs(model, result.module, args)


def test_t5_relative_bias_recomputed_per_query_block():
    model, args = t5_encoder(seq=48)
    gm, result, _ = run_pass(model, args, block_q=16, block_kv=20, blocked_leaf_bytes=0)
    out = result.module
    # the (1, H, T, T) bias is never built whole: its buckets depend on key - query position only, so the
    # bucket table is looked up once per layer for the 2T - 1 distances, and each query block gathers its rows
    lookups = [ir.shape_of(n) for n in out.graph.nodes if n.target is aten.embedding.default
               and ir.shape_of(n)[0] != 1]
    assert lookups == [(2 * 48 - 1, 1, 4)] * 2
    gathers = [ir.shape_of(n) for n in out.graph.nodes if n.target is aten.index.Tensor]
    assert gathers == [(16, 48, 4)] * 6
    assert not any(ir.shape_of(n) == (48, 48) for n in out.graph.nodes if n.op == "call_function")
    assert sum(n.target is gops.blocked_attention.default for n in out.graph.nodes) == 2 * 3
    check_outputs(model, out, args)


@pytest.mark.parametrize("builder", [gpt2, llama, lambda: t5_encoder(seq=24, gated=True)])
def test_transformers_ffns_and_attention(builder):
    model, args = builder()
    _, result, _ = run_pass(model, args, block_q=4, block_kv=6, block_ffn=5)
    ops = targets(result.module)
    assert gops.chunked_ffn.default in ops and gops.blocked_attention.default in ops
    check_outputs(model, result.module, args)


@pytest.mark.parametrize("reduction,op", [("gather", gops.chunked_lm_head_gather.default),
                                          ("argmax", gops.chunked_lm_head_argmax.default),
                                          ("topk", gops.chunked_lm_head_topk.default)])
def test_lm_head_reductions(reduction, op):
    torch.manual_seed(0)
    model = LMHeadReductions(reduction=reduction).eval()
    args = (torch.randn(2, 9, 16), torch.randint(0, 100, (2, 9)))
    _, result, _ = run_pass(model, args, block_lm_head=4)
    ops = targets(result.module)
    assert op in ops and aten.linear.default not in ops
    check_outputs(model, result.module, args)


def test_blocked_matmul_on_request():
    model, args = nanogpt(n_layer=1, seq=12)
    _, result, _ = run_pass(model, args, block_matmul=5, blocked_kinds="matmul")
    ops = targets(result.module)
    assert gops.blocked_linear.default in ops and aten.linear.default not in ops
    check_outputs(model, result.module, args)


# ---------------------------------------------------------------- idempotence and declines

def test_idempotent():
    model, args = nanogpt(n_layer=1, seq=20)
    result = graphopt.optimize(model, args, block_q=8, block_ffn=8)
    assert result.report.record("blocked").status == "applied"
    ctx = result.context
    again = BlockedOperators()(ir.copy_graph_module(result.module), ctx)
    assert not again.modified


def test_declines_attention_whose_weights_are_returned():
    torch.manual_seed(0)
    model = BiasedAttention(return_weights=True).eval()
    _, result, _ = run_pass(model, (torch.randn(1, 8, 32),), block_q=4)
    assert not result.modified
    reasons = [d.reason for d in result.declined]
    assert any("probabilities are used elsewhere" in r for r in reasons), reasons


def test_declines_blocking_small_sites_without_budget():
    model, args = nanogpt(n_layer=1, seq=64)
    _, result, _ = run_pass(model, args)
    assert not result.modified
    assert any("not predicted faster" in d.reason for d in result.declined)
    _, tiny, _ = run_pass(*nanogpt(n_layer=1, seq=1))
    assert any("too small to block" in d.reason for d in tiny.declined)


def test_unknown_kind_is_an_error():
    model, args = nanogpt(n_layer=1, seq=8)
    with pytest.raises(OptionError, match="blocked_kinds"):
        graphopt.optimize(model, args, blocked_kinds="attention,conv", verify=False)


# ---------------------------------------------------------------- budgets

def test_budget_met_predicted_and_measured_in_process():
    torch.manual_seed(0)
    model = FFNStack(d=32, hidden=4096, layers=2).eval()
    args = (torch.randn(1, 4096, 32),)  # 64 MiB intermediates: well above the RSS noise
    cap = graphopt.capture(model, args)
    ir.refresh_meta(cap.module, list(args))
    eager_peak = memory_profile(cap.module).peak_bytes
    budget = eager_peak // 3
    result = graphopt.optimize(model, args, memory_budget=budget)
    rec = result.report.record("blocked")
    assert rec.status == "applied", rec
    summary = result.report.extra["blocked"]
    assert summary["predicted_peak_after"] <= budget
    assert summary["measured_peak_after"] <= budget, summary
    assert summary["measured_peak_after"] < summary["measured_peak_before"]
    assert result.report.final_numerics.ok


def test_autotune_keeps_the_measured_fastest():
    torch.manual_seed(0)
    model = FFNStack(d=16, hidden=256, layers=1).eval()
    args = (torch.randn(1, 512, 16),)
    result = graphopt.optimize(model, args, autotune=True, blocked_kinds="ffn,matmul")
    rec = result.report.record("blocked")
    assert any(n.startswith("autotune:") and "(measured)" in n for n in rec.notes), rec.notes
    assert result.report.final_numerics.ok


def test_unreachable_budget_reports_the_reachable_minimum():
    model, args = t5_encoder(seq=64)
    with pytest.raises(BudgetError) as info:
        graphopt.optimize(model, args, memory_budget=1024, verify=False)
    err = info.value
    assert err.budget == 1024 and err.reachable > 1024
    from graphopt.tensor_sizes import readable_bytes

    assert "smallest peak reachable" in str(err) and readable_bytes(err.reachable) in str(err)


def test_budget_already_met_changes_nothing():
    model, args = nanogpt(n_layer=1, seq=16)
    result = graphopt.optimize(model, args, memory_budget="1GiB")
    rec = result.report.record("blocked")
    assert rec.status == "unchanged" and any("already under the budget" in n for n in rec.notes)


def test_plan_blocks_all_layers_sharing_a_bias():
    """T5's bias is built once and read by every layer: only blocking all of them frees it."""
    model, args = t5_encoder(seq=256)
    gm = graphopt.capture(model, args).module
    ir.refresh_meta(gm, list(args))
    eager = memory_profile(gm).peak_bytes
    plan, _ = plan_blocking(gm, eager // 4)
    assert plan.profile.peak_bytes <= eager // 4
    assert {n for n, c in plan.configs.items() if c.kind == "attention"} == {"softmax", "softmax_1"}


# ---------------------------------------------------------------- analyses the planner relies on

def test_planner_profile_adds_blocked_operators_working_memory():
    from graphopt.memory import peak_memory
    from graphopt.ops import workspace_bytes

    class M(torch.nn.Module):
        def forward(self, q, k, v):
            return gops.blocked_attention(q, k, v, None, None, -math.inf, 1.0, 32, 32) * 2

    q = torch.randn(1, 2, 64, 8)
    gm = graphopt.capture(M(), (q, q, q)).module
    ir.refresh_meta(gm, [q, q, q])
    node = next(n for n in gm.graph.nodes if n.target is gops.blocked_attention.default)
    work = workspace_bytes(node)
    assert work >= 2 * 2 * 32 * 32 * 4  # scores and probabilities of one 32 x 32 tile per head
    shared, ours = peak_memory(gm), memory_profile(gm)
    assert ours.peak_bytes == max(t + (work if n is node else 0)
                                  for n, t in zip(gm.graph.nodes, shared.timeline))
    assert ours.peak_bytes > shared.peak_bytes


def test_row_slicer_recomputes_t5_bias_rows():
    model, args = t5_encoder(seq=40)
    gm = graphopt.capture(model, args).module
    ir.refresh_meta(gm, list(args))
    functionalize_inplace(gm)
    site = next(s for s in find_blockable_sites(gm)[0] if s.kind == "attention")
    bias = max(site.biases, key=lambda b: ir.tensor_meta(b).numel())
    slicer = RowSlicer(gm, leaf_bytes=0)
    assert slicer.why_not(bias, 2) == ""
    from graphopt.node_builder import NodeBuilder

    builder = NodeBuilder(gm, site.output)
    rows = slicer.slice(bias, 2, 8, 19, builder)
    gm.recompile()
    values = {}

    class Record(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n is rows or n is bias:
                values[n] = out.clone()
            return out

    with torch.no_grad():
        Record(gm).run(*args)
    assert torch.equal(values[rows], values[bias][:, :, 8:19])
    # gathered from the bucket table of the 2T - 1 key - query distances
    assert any(n.target is aten.embedding.default and ir.shape_of(n)[0] == 2 * 40 - 1 for n in builder.created)
    assert any(n.target is aten.index.Tensor and ir.shape_of(n)[:2] == (11, 40) for n in builder.created)


def test_budget_error_propagates_through_pass_manager():
    assert BudgetError.abort_pipeline
    err = BudgetError(100, 200, "softmax", [("matmul", 150)])
    assert "smallest peak reachable" in str(err) and math.isclose(err.reachable, 200)


def test_gated_ffn_after_horizontal_fusion_reads_slices_of_the_merged_weight():
    """merge_matmuls turns gate/up into one linear + split; the chunked FFN reads weight slices (views)."""
    model, args = llama(seq=24)
    result = graphopt.optimize(model, args, merge_matmuls_policy="always", block_ffn=5, block_q=8)
    assert result.report.record("merge_matmuls").status == "applied"
    assert result.report.record("blocked").status == "applied"
    ffns = [n for n in result.module.graph.nodes if n.target is gops.chunked_ffn.default]
    assert len(ffns) == 2 and all(n.args[3] is not None for n in ffns)  # gated: w_gate given
    assert result.report.final_numerics.ok
    check_outputs(model, result.module, args)


def test_example_script_runs(monkeypatch, capsys):
    import os
    import runpy

    path = os.path.join(os.path.dirname(__file__), "..", "examples", "memory_budget.py")
    monkeypatch.setattr("sys.argv", [path, "--seq", "512", "--fraction", "0.3"])
    runpy.run_path(path, run_name="__main__")
    out = capsys.readouterr().out
    assert "blocked softmax: q_block=" in out and "predicted peak after" in out
    assert "max |blocked - eager| = " in out
