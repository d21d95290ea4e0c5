"""Differential test of the precision pass on random models (hypothesis).

Random stacks of Linear / activation / LayerNorm / softmax / residual blocks,
optimized with each precision under an error budget: the result must hold
the budget on inputs the search never saw, and never produce NaN/inf, in torch
and exported to ONNX in onnxruntime; and
int8 on the shared random-model generator (tests/strategies.py), whose
fp32 tolerance is replaced by the budget.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import torch
import torch.nn as nn
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import graphopt
from tests.support.onnx_support import rel_l2, run_onnx

LAYERS = ("linear", "gelu", "relu", "layernorm", "softmax", "residual")


class RandomModel(nn.Module):
    def __init__(self, d: int, plan: list[str], seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.plan = plan
        self.mods = nn.ModuleList()
        for kind in plan:
            if kind in ("linear", "residual"):
                self.mods.append(nn.Linear(d, d))
            elif kind == "layernorm":
                self.mods.append(nn.LayerNorm(d))
            else:
                self.mods.append(nn.Identity())
        self.head = nn.Linear(d, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for kind, m in zip(self.plan, self.mods):
            if kind == "linear" or kind == "layernorm":
                x = m(x)
            elif kind == "residual":
                x = x + m(x)
            elif kind == "gelu":
                x = torch.nn.functional.gelu(x)
            elif kind == "relu":
                x = torch.relu(x)
            elif kind == "softmax":
                x = torch.softmax(x, dim=-1) * x.shape[-1]
        return self.head(x)


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck),
          phases=[Phase.explicit, Phase.reuse, Phase.generate])  # optimize() is slow to shrink over
@given(plan=st.lists(st.sampled_from(LAYERS), min_size=1, max_size=6),
       d=st.sampled_from([16, 32]), seed=st.integers(0, 1000),
       precision=st.sampled_from(["int8", "bf16", "fp16"]))
def test_precision_holds_the_budget_on_random_models(plan, d, seed, precision):
    model = RandomModel(d, plan, seed).eval()
    x = torch.randn(4, 8, d, generator=torch.Generator().manual_seed(seed))
    budget = 0.05
    result = graphopt.optimize(model, (x,), precision=precision, error_budget=budget, n_random_inputs=1)
    rec = result.report.record("precision")
    assert rec.status in ("applied", "unchanged"), (rec.status, rec.error, rec.numerics)
    fresh = torch.randn(4, 8, d, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        ref, out = model(fresh), result.module(fresh)
    assert torch.isfinite(out).all()
    rel = float((out.double() - ref.double()).norm() / ref.double().norm())
    # the search aims at 0.8 x budget on its inputs; fresh inputs get the full budget plus a little slack
    assert rel <= budget * 1.25, (plan, precision, rel)
    # the same graph in ONNX (bf16 computed in float32 for onnxruntime's CPU provider), on the fresh inputs
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.onnx")
        graphopt.export_onnx(result, path, n_random_inputs=0)
        (got,) = run_onnx(path, [fresh])
    assert np.isfinite(got).all()
    assert rel_l2(ref.numpy(), got) <= budget * 1.25, (plan, precision)


def test_int8_holds_the_budget_on_the_shared_random_models():
    """The shared generator (tests/strategies.py: attention, masks, token inputs, residual blocks),
    graphopt's verification off: int8 with input shifts and pair-safe weights stays in budget on
    the example and on fresh inputs."""
    from tests.support.strategies import run_differential

    from graphopt.passes.precision import ReducedPrecision

    budget = 0.05
    run_differential(lambda: [ReducedPrecision()], max_examples=12, shrink=False, tol=budget * 1.25,
                     options={"precision": "int8", "error_budget": budget, "n_random_inputs": 1})
