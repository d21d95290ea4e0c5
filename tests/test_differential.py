"""The differential test: the default pipeline on hundreds of random models.

Every rewrite pass that joins :func:`graphopt.passes.default_pipeline` is
checked here automatically. graphopt's own verification is switched off
(``verify=False``) so a wrong rewrite is not quietly rolled back: this test
sees what the passes really produce. To run one pass of yours on the same
models, see :func:`strategies.run_differential`.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import event, given

import graphopt
from graphopt.passes.cleanup.dead_code import DeadCodeElimination
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
