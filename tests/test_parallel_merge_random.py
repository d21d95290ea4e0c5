"""merge_matmuls on random models (hypothesis): merged graphs must compute what the model computes.

Stands in for the project's random-model differential test until
tests/test_differential.py lands on main; then merge_matmuls joins it there.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import graphopt
from graphopt.passes.merge_matmuls import MergeDecision, MergeMatmuls

aten = torch.ops.aten


class RandomBranches(nn.Module):
    """Stages of linears that share one input; their outputs are combined by a random elementwise op."""

    def __init__(self, d: int, stages: list[list[tuple[int, bool, str]]], combine: list[str]) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            nn.ModuleList(nn.Linear(d, n, bias=bias) for n, bias, _ in stage) for stage in stages)
        self.acts = [[act for _, _, act in stage] for stage in stages]
        self.back = nn.ModuleList(nn.Linear(sum(n for n, _, _ in stage), d) for stage in stages)
        self.combine = combine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for linears, acts, back, how in zip(self.stages, self.acts, self.back, self.combine):
            outs = [getattr(torch, act)(lin(x)) if act != "none" else lin(x) for lin, act in zip(linears, acts)]
            h = torch.cat(outs, -1)
            x = x + back(h) if how == "residual" else back(h) * torch.sigmoid(x)
        return x


branch = st.tuples(st.sampled_from([4, 8, 12, 16]), st.booleans(), st.sampled_from(["none", "tanh", "relu"]))
stage = st.lists(branch, min_size=1, max_size=4)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(d=st.sampled_from([8, 16]), stages=st.lists(stage, min_size=1, max_size=3),
       combine=st.lists(st.sampled_from(["residual", "gate"]), min_size=3, max_size=3),
       rows=st.sampled_from([(1, 3), (2, 5)]), seed=st.integers(0, 2**16))
def test_merge_matmuls_keeps_random_models_equal(d, stages, combine, rows, seed):
    torch.manual_seed(seed)
    model = RandomBranches(d, stages, combine[: len(stages)]).eval()
    x = torch.randn(*rows, d)
    result = graphopt.optimize(model, (x,), passes=[MergeMatmuls(decide=lambda c: MergeDecision(True, "test"))])
    record = result.report.record("merge_matmuls")
    shared = sum(1 for s in stages if len(s) >= 2)
    assert record.status == ("applied" if shared else "unchanged"), record
    assert len(record.nodes_involved) == shared
    fresh = torch.randn(*rows, d)
    with torch.no_grad():
        assert torch.allclose(model(fresh), result.module(fresh), rtol=1e-5, atol=1e-5)
    assert result.report.final_numerics.ok
