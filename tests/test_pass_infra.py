"""Pass machinery: verification catches wrong passes, rollback, user passes, options, ensures."""

from __future__ import annotations

import json

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import graphopt
from graphopt import ir
from graphopt.pass_infra import DumpInstrument
from graphopt.passes import cleanup_pipeline, default_pipeline
from graphopt.passes.cleanup.dead_code import DeadCodeElimination
from graphopt.passes.cleanup.remove_noops import RemoveNoOps
from tests.support.helpers import assert_outputs_close, call, op_targets
from tests.support.wrong_passes import SwapMatmulOperands

aten = torch.ops.aten
MATMULS = {aten.matmul.default, aten.mm.default, aten.bmm.default}


class Raises(graphopt.Pass):
    name = "raises"
    summary = "a pass with a bug that raises half-way through its rewrite"

    def call(self, gm, ctx):
        for node in list(gm.graph.nodes):  # damage the graph first: rollback must undo it
            if node.op == "call_function" and node.target == aten.relu.default:
                node.replace_all_uses_with(node.args[0])
        raise RuntimeError("bug in the pass")


class ReluToClamp(graphopt.Pass):
    """A user's pass: relu(x) -> clamp_min(x, 0) (same values)."""

    name = "relu_to_clamp"
    summary = "relu -> clamp_min"

    def call(self, gm, ctx):
        changed = []
        for node in list(gm.graph.nodes):
            if node.op == "call_function" and node.target == aten.relu.default:
                with gm.graph.inserting_before(node):
                    new = gm.graph.call_function(aten.clamp_min.default, (node.args[0], 0.0))
                node.replace_all_uses_with(new)
                gm.graph.erase_node(node)
                changed.append(new.name)
        return graphopt.PassResult(gm, bool(changed), nodes_involved=changed)

    def ensures(self, result, ctx):
        # runs on the *result*: no relu may be left (on the input this would fail)
        assert aten.relu.default not in {n.target for n in result.module.graph.nodes}


class SquareMatmul(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.drop(torch.matmul(x, self.w)))


def _model():
    torch.manual_seed(0)
    return SquareMatmul().eval(), (torch.randn(2, 4, 4),)


def test_wrong_pass_is_caught_rolled_back_and_reported_and_the_pipeline_goes_on():
    model, args = _model()
    result = graphopt.optimize(model, args, passes=[SwapMatmulOperands(), RemoveNoOps(), DeadCodeElimination()])
    report = result.report
    rec = report.record("swap_matmul_operands")
    assert rec.status == "rolled back"
    assert rec.numerics is not None and not rec.numerics.ok
    assert rec.numerics.rel_l2 > 1e-2 and rec.numerics.max_abs > 0  # the error figures
    assert rec.numerics.inputs_checked >= 1 and "relative L2" in rec.numerics.reason
    assert rec.nodes_involved and all(n.startswith("matmul") for n in rec.nodes_involved)
    assert report.rolled_back == [rec]
    # the pipeline went on: the next pass ran on the graph from before the wrong one
    assert report.record("remove_noops").status == "applied"
    assert "aten.dropout" not in op_targets(result.module)
    matmul = next(n for n in result.module.graph.nodes if n.target == aten.matmul.default)
    assert matmul.args[0].op == "placeholder"  # operands in their original order
    assert_outputs_close(call(model, args), call(result.module, args))
    assert report.final_numerics.ok
    # readable and machine-readable reports both say so
    text = str(report)
    assert "swap_matmul_operands" in text and "rolled back" in text and "relative L2" in text
    d = json.loads(report.to_json())
    entry = next(p for p in d["passes"] if p["name"] == "swap_matmul_operands")
    assert entry["status"] == "rolled back" and entry["numerics"]["rel_l2"] > 1e-2
    assert entry["nodes_involved"] == rec.nodes_involved


def test_wrong_pass_whose_graph_does_not_run_is_rolled_back():
    class Rectangular(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3))

        def forward(self, x):
            return x @ self.w

    model, x = Rectangular().eval(), torch.randn(5, 4)
    result = graphopt.optimize(model, (x,), passes=[SwapMatmulOperands()])
    rec = result.report.record("swap_matmul_operands")
    # the swapped graph fails already when its shapes are re-propagated, or when run
    assert rec.status in ("rolled back", "error"), rec.to_dict()
    assert_outputs_close(call(model, (x,)), call(result.module, (x,)))


def test_pass_that_raises_is_rolled_back_and_the_pipeline_goes_on():
    model, args = _model()
    result = graphopt.optimize(model, args, passes=[Raises(), RemoveNoOps()])
    rec = result.report.record("raises")
    assert rec.status == "error" and "RuntimeError: bug in the pass" in rec.error
    assert rec in result.report.rolled_back
    assert "aten.relu" in op_targets(result.module)  # its half-done damage is gone
    assert result.report.record("remove_noops").status == "applied"
    assert_outputs_close(call(model, args), call(result.module, args))


def test_user_pass_objects_and_function_passes_run():
    model, args = _model()
    seen = []

    def count_nodes(gm: fx.GraphModule, ctx: graphopt.OptimizeContext) -> bool:
        """Count nodes (an analysis written as a plain function)."""
        seen.append(len(gm.graph.nodes))
        return False

    result = graphopt.optimize(model, args, passes=[ReluToClamp(), graphopt.FunctionPass(count_nodes)])
    assert result.report.record("relu_to_clamp").status == "applied"
    assert result.report.record("count_nodes").status == "unchanged"
    assert graphopt.FunctionPass(count_nodes).summary == "Count nodes (an analysis written as a plain function)."
    assert seen and "aten.clamp_min" in op_targets(result.module) and "aten.relu" not in op_targets(result.module)
    assert_outputs_close(call(model, args), call(result.module, args))


def test_function_pass_returning_a_pass_result():
    def drop_dead(gm, ctx):
        gm.graph.eliminate_dead_code()
        return graphopt.PassResult(gm, False, notes=["nothing to do"])

    model, args = _model()
    result = graphopt.optimize(model, args, passes=[graphopt.FunctionPass(drop_dead, name="drop_dead")])
    assert result.report.record("drop_dead").notes == ["nothing to do"]


def test_ensures_runs_on_the_result_and_its_failure_rolls_back():
    model, args = _model()
    result = graphopt.optimize(model, args, passes=[ReluToClamp()])
    assert result.report.record("relu_to_clamp").status == "applied"  # ensures passed on the result

    class BadEnsures(ReluToClamp):
        name = "bad_ensures"

        def ensures(self, result, ctx):
            raise AssertionError("invariant broken")

    result = graphopt.optimize(model, args, passes=[BadEnsures()])
    rec = result.report.record("bad_ensures")
    assert rec.status == "error" and "invariant broken" in rec.error
    assert "aten.relu" in op_targets(result.module)


def test_requires_failure_skips_the_pass():
    class NeedsConv(RemoveNoOps):
        name = "needs_conv"

        def requires(self, gm, ctx):
            if not any(n.target == aten.conv2d.default for n in gm.graph.nodes):
                raise ValueError("no convolution in this graph")

    model, args = _model()
    rec = graphopt.optimize(model, args, passes=[NeedsConv()]).report.record("needs_conv")
    assert rec.status == "error" and "no convolution" in rec.error


def test_unknown_option_is_a_type_error_listing_the_known_ones():
    model, args = _model()
    with pytest.raises(TypeError) as info:
        graphopt.optimize(model, args, constant_fold_max_byte=10)
    msg = str(info.value)
    assert "constant_fold_max_byte" in msg and "constant_fold_max_bytes" in msg
    # a known option is accepted and reaches the pass
    result = graphopt.optimize(model, args, constant_fold_max_bytes=0)
    assert result.context.option("constant_fold_max_bytes") == 0


def test_pass_manager_rejects_things_that_are_not_passes():
    with pytest.raises(TypeError, match="FunctionPass"):
        graphopt.PassManager([lambda gm, ctx: False])


def test_unmodified_pass_keeps_the_module_and_analysis_gets_the_live_graph():
    model, args = _model()
    cap = graphopt.capture(model, args)
    ctx = graphopt.OptimizeContext(flat_inputs=ir.flat_inputs(cap.args, cap.kwargs, cap.module))

    class Analysis(graphopt.Pass):
        name, kind = "tag_nodes", "analysis"

        def call(self, gm, ctx):
            for n in gm.graph.nodes:
                n.meta["tagged"] = True
            return graphopt.PassResult(gm, False)

    out = graphopt.PassManager([Analysis(), DeadCodeElimination()]).run(cap.module, ctx)
    assert out is cap.module  # nothing modified: the same module object
    assert all(n.meta.get("tagged") for n in out.graph.nodes)
    assert [r.status for r in ctx.report.passes] == ["analysis", "unchanged"]


def test_verify_off_keeps_a_wrong_pass():
    """verify=False is the user's choice: nothing is checked, nothing rolled back."""
    model, args = _model()
    result = graphopt.optimize(model, args, passes=[SwapMatmulOperands()], verify=False)
    assert result.report.record("swap_matmul_operands").status == "applied"
    assert result.report.final_numerics is None
    assert not torch.allclose(call(model, args), call(result.module, args))


def test_dump_instrument_writes_each_modifying_pass(tmp_path):
    model, args = _model()
    graphopt.optimize(model, args, passes=cleanup_pipeline(), instruments=[DumpInstrument(str(tmp_path))])
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files and files[0].startswith("01_") and "remove_noops" in files[0]
    assert "def forward" in (tmp_path / files[0]).read_text()


def test_pipelines_and_available_list_every_shipped_pass():
    names = [name for name, _ in graphopt.passes.available()]
    assert len(names) == len(set(names))
    assert {"dead_code", "cse", "constant_folding", "remove_noops", "fold_conv_bn"} <= set(names)
    assert all(summary for _, summary in graphopt.passes.available())
    assert {p.name for p in default_pipeline()} <= set(names)


def _count_checks(monkeypatch) -> list:
    from graphopt.verify import Verifier

    calls, check = [], Verifier.check
    monkeypatch.setattr(Verifier, "check", lambda self, gm, budget=None: calls.append(gm) or check(self, gm, budget))
    return calls


def test_exact_passes_are_verified_once_as_a_group(monkeypatch):
    calls = _count_checks(monkeypatch)
    model, args = _model()
    result = graphopt.optimize(model, args, passes=[ReluToClamp(), RemoveNoOps(), DeadCodeElimination()])
    applied = [r for r in result.report.passes if r.status == "applied"]
    assert [r.name for r in applied] == ["relu_to_clamp", "remove_noops"]
    # one check of the group's result; the final check reuses it
    assert len(calls) == 1 and calls[0] is result.module
    for rec in applied:
        assert rec.numerics is result.report.final_numerics and rec.numerics.ok
        assert rec.verified_with == ["relu_to_clamp", "remove_noops"]
    assert json.loads(result.report.to_json())["passes"][0]["verified_with"] == ["relu_to_clamp", "remove_noops"]


def test_a_failing_group_is_rerun_pass_by_pass_and_only_the_wrong_pass_is_rolled_back(monkeypatch):
    calls = _count_checks(monkeypatch)
    model, args = _model()
    result = graphopt.optimize(model, args, passes=[ReluToClamp(), SwapMatmulOperands(), RemoveNoOps()])
    report = result.report
    assert [(r.name, r.status) for r in report.passes] == [
        ("relu_to_clamp", "applied"), ("swap_matmul_operands", "rolled back"), ("remove_noops", "applied")]
    assert all(r.numerics is not None and not r.verified_with for r in report.passes)  # each checked on its own
    assert len(calls) == 1 + 3  # the group, then each pass (the final check reuses the last)
    assert "aten.clamp_min" in op_targets(result.module) and "aten.dropout" not in op_targets(result.module)
    assert_outputs_close(call(model, args), call(result.module, args))


def test_group_verification_can_be_switched_off(monkeypatch):
    from graphopt.pass_infra import OptimizeContext, PassManager, VerifyInstrument
    from graphopt.verify import Verifier

    calls = _count_checks(monkeypatch)
    model, args = _model()
    gm = graphopt.capture(model, args).module
    ctx = OptimizeContext(args=args, flat_inputs=list(args), verifier=Verifier(model, args, {}, gm))
    PassManager([ReluToClamp(), RemoveNoOps()], [VerifyInstrument()], group_verification=False).run(gm, ctx)
    assert len(calls) == 2 and all(r.numerics.ok and not r.verified_with for r in ctx.report.passes)


def test_long_passes_report_their_steps_to_the_progress_callback():
    """optimize(progress=...) hears each pass by name, and the steps a long pass reports with
    ctx.step as 'pass: step' (the CLI shows them on its progress line)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32)).eval()
    heard: list[str] = []
    graphopt.optimize(model, (torch.randn(8, 32),), precision="int8", error_budget=1e-4, progress=heard.append)
    assert "precision" in heard
    steps = [m for m in heard if m.startswith("precision: ")]
    assert any("calibrating" in m for m in steps), heard
    assert any("error search: checking the plan" in m for m in steps), heard  # the tight budget makes it search
    assert not any(m.startswith("dead_code: ") for m in heard)  # short passes report nothing more


def test_copying_an_exported_graph_repeats_no_torch_deprecation_warning():
    """Every pass copies the graph; torch 2.13 warns about its own LeafSpec on each copy of an exported one."""
    import warnings

    class TwoOutputs(nn.Module):
        def forward(self, x, y):
            return x + y, x * 2

    gm = torch.export.export(TwoOutputs(), (torch.ones(2), torch.ones(2))).module()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        copy = ir.copy_graph_module(gm)
    assert not [w for w in caught if "LeafSpec" in str(w.message)], [str(w.message) for w in caught]
    x, y = torch.randn(2), torch.randn(2)
    assert all(torch.equal(a, b) for a, b in zip(copy(x, y), gm(x, y)))
