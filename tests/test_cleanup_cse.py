"""cse: identical pure computations merge; random ops, different constants and -0.0 vs 0.0 do not."""

from __future__ import annotations

import torch
import torch.nn as nn

from graphopt.passes.cleanup.cse import CommonSubexpressionElimination
from tests.support.helpers import assert_outputs_close, call, capture_for_pass, op_targets, run_pass


class Duplicated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        a = torch.relu(self.proj(x)) * 2.0
        b = torch.relu(self.proj(x)) * 2.0  # the same computation again
        c = torch.relu(self.proj(x)) * 3.0  # a different constant: not the same value
        return a + b + c


def test_golden_ops_and_idempotence():
    gm, ctx = capture_for_pass(Duplicated().eval(), (torch.randn(2, 4),))
    assert op_targets(gm).count("aten.linear") == 3
    first = run_pass(CommonSubexpressionElimination(), gm, ctx)
    assert first.modified
    assert op_targets(first.module) == ["aten.linear", "aten.relu", "aten.mul", "aten.mul", "aten.add", "aten.add"]
    # the three reads of proj.weight / proj.bias became one each
    assert len([n for n in first.module.graph.nodes if n.op == "get_attr"]) == 2
    second = run_pass(CommonSubexpressionElimination(), first.module, ctx)
    assert not second.modified


def test_numerics_unchanged():
    model = Duplicated().eval()
    gm, ctx = capture_for_pass(model, (torch.randn(2, 4),))
    out = run_pass(CommonSubexpressionElimination(), gm, ctx).module
    for seed in range(3):
        x = torch.randn(2, 4, generator=torch.Generator().manual_seed(seed))
        assert_outputs_close(call(model, (x,)), call(out, (x,)))


def test_declines_random_ops():
    class TwoDraws(nn.Module):
        def forward(self, x):
            return torch.rand_like(x) + torch.rand_like(x)  # two independent draws

    gm, ctx = capture_for_pass(TwoDraws(), (torch.randn(10000),))
    result = run_pass(CommonSubexpressionElimination(), gm, ctx)
    assert not result.modified and op_targets(result.module).count("aten.rand_like") == 2
    torch.manual_seed(0)
    out = call(result.module, (torch.zeros(10000),))
    # two independent U(0,1) draws: variance 1/6; one draw doubled would give 1/3
    assert 0.14 < float(out.var()) < 0.19


def test_negative_zero_is_not_zero():
    """x * 0.0 and x * -0.0 compare equal as Python floats, yet 1 / them is +inf / -inf."""
    class SignedZeros(nn.Module):
        def forward(self, x):
            return 1 / (x.abs() * 0.0), 1 / (x.abs() * -0.0)

    model = SignedZeros()
    gm, ctx = capture_for_pass(model, (torch.randn(3),))
    out = run_pass(CommonSubexpressionElimination(), gm, ctx).module
    pos, neg = call(out, (torch.randn(3),))
    assert torch.equal(pos, torch.full((3,), float("inf"))) and torch.equal(neg, torch.full((3,), float("-inf")))


def test_declines_merging_two_returned_values():
    """`return x + 1, x + 1` must give two tensors: merged, writing into one would change the other."""
    class TwinOutputs(nn.Module):
        def forward(self, x):
            a, b, c = x + 1, x + 1, x + 1
            return a, b.t(), c * 2   # c is internal: it may merge with a

    gm, ctx = capture_for_pass(TwinOutputs(), (torch.zeros(2, 2),))
    result = run_pass(CommonSubexpressionElimination(), gm, ctx)
    assert result.modified and op_targets(result.module).count("aten.add") == 2
    assert [d.reason for d in result.declined] == [
        "same value as add, but both are returned: merged, the two outputs would be one tensor"]
    a, bt, _ = call(result.module, (torch.zeros(2, 2),))
    a.add_(5)
    assert torch.equal(bt, torch.ones(2, 2))


def test_values_written_in_place_are_not_merged():
    """Two copies of a counter, each advanced in place (a KV cache layer's position): merged, it advances twice."""
    class TwoCounters(nn.Module):
        def forward(self, x, position):
            first = position.clone()
            first.add_(1)
            second = position.clone()
            second.add_(1)
            return x + first + second

    args = (torch.zeros(3), torch.tensor(4))
    gm, ctx = capture_for_pass(TwoCounters(), args)
    assert op_targets(gm).count("aten.add_") == 2, "the in-place adds must survive capture for this test"
    out = run_pass(CommonSubexpressionElimination(), gm, ctx).module
    assert torch.equal(call(out, (torch.zeros(3), torch.tensor(4))), torch.full((3,), 10))
