"""The differential test: the default pipeline on hundreds of random models.

Every rewrite pass that joins :func:`graphopt.passes.default_pipeline` is
checked here automatically. graphopt's own verification is switched off
(``verify=False``) so a wrong rewrite is not quietly rolled back: this test
sees what the passes really produce. To run one pass of yours on the same
models, see :func:`strategies.run_differential`.

These are the same derandomized models on every run; fresh ones (a new seed
each day, 2,000 models) come from ``benchmarks/differential_fresh.py``. An
output may differ from the fp32 model by more than 1e-5 where the model itself
is that ill-conditioned, if it is as accurate as the model against an fp64 run
(:func:`tests.support.helpers.assert_as_accurate_as_model`).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from hypothesis import event, given

import graphopt
from tests.conftest import REPO_ROOT
from graphopt.passes.cleanup.dead_code import DeadCodeElimination
from tests.support.helpers import assert_as_accurate_as_model, assert_outputs_close, call
from tests.support.strategies import Recipe, build_model, check_recipe, differential_settings, model_recipes, run_differential
from tests.support.wrong_passes import SwapMatmulOperands


ALWAYS_REWRITE = {"merge_matmuls_policy": "always", "weight_layout_policy": "always"}


@differential_settings(max_examples=200)
@given(recipe=model_recipes())
def test_default_pipeline_keeps_random_models_equal(recipe: Recipe) -> None:
    # passes=None: graphopt.passes.default_pipeline, whatever it holds today. Passes that choose by
    # measured speed are told to rewrite every site they can, so the rewrites themselves are tested.
    result = check_recipe(recipe, options=ALWAYS_REWRITE)
    for record in result.report.passes:  # coverage: --hypothesis-show-statistics lists these
        event(f"{record.name}: {record.status}")


class NudgeOutputs(graphopt.Pass):
    """Wrong by a little: adds 1e-3 to every floating output (relative L2 ~1e-3 > 1e-5)."""

    name = "nudge_outputs"

    def call(self, gm, ctx):
        out = next(n for n in gm.graph.nodes if n.op == "output")

        def nudge(arg):
            val = arg.meta.get("val") if isinstance(arg, torch.fx.Node) else None
            if not isinstance(val, torch.Tensor) or not val.dtype.is_floating_point:
                return arg
            with gm.graph.inserting_before(out):
                return gm.graph.call_function(torch.ops.aten.add.Tensor, (arg, 1e-3))

        out.args = (torch.fx.node.map_aggregate(out.args[0], nudge),)
        return graphopt.PassResult(gm, True)


def test_the_differential_check_catches_a_small_numeric_error():
    with pytest.raises(AssertionError, match="relative L2"):
        run_differential(lambda: [NudgeOutputs()], max_examples=5, shrink=False)


def test_the_differential_check_catches_a_pass_that_breaks_graphs():
    """A wrong pass is caught on random models (it raises, or its numerics are off), not rolled
    back out of sight as graphopt.optimize's verification would."""
    with pytest.raises(AssertionError, match="relative L2|pass raised"):
        run_differential(lambda: [SwapMatmulOperands()], max_examples=60, shrink=False)


def test_run_differential_accepts_a_pass_list():
    run_differential([DeadCodeElimination()], max_examples=5)


@given(recipe=model_recipes())
@differential_settings(max_examples=60, shrink=False)
def test_random_models_are_valid(recipe: Recipe) -> None:
    """The generator itself: models run, outputs are finite, the mask matters when there is one."""
    model, args, kwargs = build_model(recipe)
    with torch.no_grad():
        out = model(*args, **kwargs)
    leaves = out if isinstance(out, tuple) else list(out.values()) if isinstance(out, dict) else [out]
    assert all(torch.isfinite(t).all() for t in leaves), recipe
    assert not model.training


class IllConditioned(torch.nn.Module):
    """Linear + BatchNorm1d (fold_conv_bn folds them) into a LayerNorm over two nearly equal features:
    the model itself turns fp32 rounding into ~4e-4 at its output."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.bn, self.ln = torch.nn.Linear(4, 2), torch.nn.BatchNorm1d(2), torch.nn.LayerNorm(2)
        with torch.no_grad():
            self.lin.weight[1] = self.lin.weight[0] + 1e-4
            self.lin.bias[1] = self.lin.bias[0]
            self.bn.running_mean.fill_(0.3)
            self.bn.running_var.fill_(0.7)

    def forward(self, x):
        return self.ln(self.bn(self.lin(x)))


def _ill_conditioned():
    torch.manual_seed(0)
    return IllConditioned().eval(), torch.randn(64, 4)


def test_a_correct_rewrite_of_an_ill_conditioned_model_passes_against_fp64():
    """The rel-L2 1.1e-4 case of issue 21 (LayerNorm over d=2): folding is right, the model is ill-conditioned.
    Both the differential check and graphopt's verification judge it against an fp64 run of the model."""
    model, x = _ill_conditioned()
    result = graphopt.optimize(model, (x,), verify=False)
    with pytest.raises(AssertionError, match="relative L2"):  # against the fp32 model alone it misses 1e-5
        assert_outputs_close(call(model, (x,)), call(result.module, (x,)))
    assert_as_accurate_as_model(model, result.module, (x,))
    verified = graphopt.optimize(model, (x,))
    assert verified.report.record("fold_conv_bn").status == "applied"
    assert "against fp64" in verified.report.final_numerics.summary() and verified.report.final_numerics.ok
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_a_wrong_rewrite_of_an_ill_conditioned_model_still_fails_against_fp64():
    model, x = _ill_conditioned()
    result = graphopt.optimize(model, (x,), passes=[NudgeOutputs()], verify=False)
    with pytest.raises(AssertionError, match="against fp64"):
        assert_as_accurate_as_model(model, result.module, (x,))
    verified = graphopt.optimize(model, (x,), passes=[NudgeOutputs()])
    assert verified.report.record("nudge_outputs").status == "rolled back"
    assert "against fp64" in verified.report.record("nudge_outputs").numerics.reason


def test_the_fresh_run_script_checks_models_of_its_seed(capsys):
    """benchmarks/differential_fresh.py: fresh models by seed (the CI-sized run here is 3 models)."""
    path = os.path.join(REPO_ROOT, "benchmarks", "differential_fresh.py")
    spec = importlib.util.spec_from_file_location("differential_fresh", path)
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    assert fresh.main(["--seed", "7", "--count", "3"]) == 0
    assert capsys.readouterr().out.startswith("seed 7: 3 models, 0 wrong, 0 aliasing, 0 raised")
    assert [fresh.classify(m) for m in ("outputs now alias [('out0', 'input0')] on R", "pass raised on R: x",
                                        "leaf 0: relative L2 1e-3 > 1e-5")] == ["aliasing", "raised", "wrong"]
