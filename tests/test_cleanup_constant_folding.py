"""constant_folding: input-independent subgraphs become constants, size-capped; views and random ops stay."""

from __future__ import annotations

import torch
import torch.nn as nn

from graphopt import OptimizeContext
from graphopt.passes.cleanup.constant_folding import ConstantFolding
from tests.support.helpers import assert_outputs_close, call, capture_for_pass, op_targets, run_pass


class MaskAndScaledWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        t = x.shape[1]
        causal = torch.tril(torch.ones(t, t, dtype=torch.bool))  # built every call: foldable
        scores = (x @ (self.w * 2).t()).masked_fill(~causal, float("-inf"))
        return scores.softmax(-1) + torch.ones_like(x) + self.w.t()[0]


def _captured(**options):
    torch.manual_seed(0)
    model = MaskAndScaledWeight().eval()
    gm, ctx = capture_for_pass(model, (torch.randn(2, 4, 4),), **options)
    return model, gm, ctx


def test_golden_ops_and_idempotence():
    _, gm, ctx = _captured()
    assert op_targets(gm) == ["aten.ones", "aten.tril", "aten.mul", "aten.t", "aten.matmul", "aten.bitwise_not",
                              "aten.masked_fill", "aten.softmax", "aten.ones_like", "aten.add", "aten.t",
                              "aten.select", "aten.add"]
    first = run_pass(ConstantFolding(), gm, ctx)
    assert first.modified and first.notes == ["folded 3 constant subgraphs"]
    # mask (ones, tril, bitwise_not), w * 2 and ones_like(x) are constants now; t(.) of them stays a view
    assert op_targets(first.module) == ["aten.t", "aten.matmul", "aten.masked_fill", "aten.softmax", "aten.add",
                                        "aten.t", "aten.select", "aten.add"]
    assert len(first.nodes_involved) == 3
    second = run_pass(ConstantFolding(), first.module, ctx)
    assert not second.modified


def test_numerics_unchanged_and_weights_untouched():
    model, gm, ctx = _captured()
    w_before = model.w.detach().clone()
    out = run_pass(ConstantFolding(), gm, ctx).module
    for seed in range(3):
        x = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(seed))
        assert_outputs_close(call(model, (x,)), call(out, (x,)))
    assert torch.equal(model.w, w_before)


def test_declines_results_over_the_size_cap():
    _, gm, ctx = _captured(constant_fold_max_bytes=16)
    result = run_pass(ConstantFolding(), gm, ctx)
    reasons = {d.site: d.reason for d in result.declined}
    assert reasons["mul"] == "result is 64 B > cap 16 B (constant_fold_max_bytes)"
    assert reasons["ones_like"] == "result is 128 B > cap 16 B (constant_fold_max_bytes)"
    assert "aten.mul" in op_targets(result.module) and "aten.ones_like" in op_targets(result.module)
    assert result.modified  # the 16-byte mask still fits


def test_default_cap_keeps_large_weights_from_being_duplicated():
    class ScaledBigWeight(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(2048, 2049))  # just over 16 MiB in fp32 (values never read)

        def forward(self, x):
            return x @ (self.w * 0.5)

    gm, ctx = capture_for_pass(ScaledBigWeight().eval(), (torch.randn(1, 2048),))
    result = run_pass(ConstantFolding(), gm, OptimizeContext(flat_inputs=ctx.flat_inputs))
    assert not result.modified and "cap 16.0 MiB" in result.declined[0].reason


def test_views_of_weights_and_random_ops_are_not_folded():
    class ViewAndNoise(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 3))

        def forward(self, x):
            return x @ self.w.t() + torch.rand(3)  # rand has no inputs but is not a constant

    gm, ctx = capture_for_pass(ViewAndNoise().eval(), (torch.randn(2, 3),))
    result = run_pass(ConstantFolding(), gm, ctx)
    assert not result.modified
    assert op_targets(result.module) == op_targets(gm)


def test_declines_a_constant_the_model_returns():
    """Folded, every call would return the same tensor object: a caller writing into it changes later calls."""
    class ReturnsAConstant(nn.Module):
        def forward(self, x):
            return x + 1, torch.arange(4.0) * 2

    gm, ctx = capture_for_pass(ReturnsAConstant(), (torch.zeros(4),))
    result = run_pass(ConstantFolding(), gm, ctx)
    assert not result.modified
    assert [d.reason for d in result.declined] == [
        "returned as an output: folded, every call would return the same tensor object"]
    first = call(result.module, (torch.zeros(4),))[1]
    first.add_(100)
    assert torch.equal(call(result.module, (torch.zeros(4),))[1], torch.arange(4.0) * 2)


def test_declines_a_constant_that_is_written_in_place_later():
    """T5 builds its position bias from no input and then adds the mask into it in place:
    folded, that add_ would accumulate into the stored constant on every call."""
    class AddsIntoAConstant(nn.Module):
        def forward(self, x):
            bias = torch.arange(4.0) * 2
            bias.add_(x)
            return bias * 1.5

    x = torch.ones(4)
    gm, ctx = capture_for_pass(AddsIntoAConstant(), (x,))
    result = run_pass(ConstantFolding(), gm, ctx)
    assert any(d.reason.startswith("written in place by aten.add_") for d in result.declined), result.declined
    for _ in range(3):  # the same answer every call
        torch.testing.assert_close(call(result.module, (x,)), (torch.arange(4.0) * 2 + 1) * 1.5)
