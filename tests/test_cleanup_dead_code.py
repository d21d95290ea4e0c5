"""dead_code: unused pure nodes and stale graphopt constants go; side effects and inputs stay."""

from __future__ import annotations

import torch
import torch.nn as nn

from graphopt.passes.cleanup.dead_code import DeadCodeElimination
from tests.support.helpers import assert_outputs_close, call, capture_for_pass, op_targets, run_pass


class UnusedBranch(nn.Module):
    def forward(self, x, unused_input):
        unused = torch.sin(x) * 3  # computed, never used
        return torch.relu(x).to(torch.float64)


def _captured():
    return capture_for_pass(UnusedBranch().eval(), (torch.randn(2, 3), torch.randn(2)))


def test_golden_ops_and_idempotence():
    gm, ctx = _captured()
    assert op_targets(gm) == ["aten.sin", "aten.mul", "aten.relu", "aten._assert_tensor_metadata", "aten.to"]
    first = run_pass(DeadCodeElimination(), gm, ctx)
    assert first.modified and first.notes == ["removed 2 dead nodes"]
    assert op_targets(first.module) == ["aten.relu", "aten._assert_tensor_metadata", "aten.to"]
    second = run_pass(DeadCodeElimination(), first.module, ctx)
    assert not second.modified and op_targets(second.module) == op_targets(first.module)


def test_numerics_unchanged():
    model = UnusedBranch().eval()
    gm, ctx = _captured()
    out = run_pass(DeadCodeElimination(), gm, ctx).module
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        args = (torch.randn(2, 3, generator=g), torch.randn(2, generator=g))
        assert_outputs_close(call(model, args), call(out, args))


def test_declines_side_effects_and_inputs():
    """The dtype assert from .to() has no users but checks the input: it is kept; so is the unused input."""
    gm, ctx = _captured()
    out = run_pass(DeadCodeElimination(), gm, ctx).module
    assert "aten._assert_tensor_metadata" in op_targets(out)
    assert [n.name for n in out.graph.nodes if n.op == "placeholder"] == ["x", "unused_input"]


def test_stale_graphopt_constants_are_deleted_and_user_buffers_kept():
    gm, ctx = _captured()
    gm.register_buffer("_graphopt_leftover", torch.ones(4), persistent=False)
    gm.register_buffer("user_buffer", torch.ones(4))
    # called on the module itself: the PassManager's copy (fx.GraphModule(gm, graph)) carries
    # over only the attributes the graph references, so a leftover never reaches a later pass
    result = DeadCodeElimination()(gm, ctx)
    assert "deleted 1 unused constants" in result.notes
    assert not hasattr(result.module, "_graphopt_leftover")
    assert hasattr(result.module, "user_buffer")
