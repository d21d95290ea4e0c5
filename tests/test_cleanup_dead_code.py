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


class CastNobodyUses(nn.Module):
    """export checks ``sin(x)``'s dtype before the cast; the cast is unused, so only the check reads sin(x)."""

    def forward(self, x):
        unused = torch.sin(x).to(torch.float64)  # noqa: F841 - dead, but asserted
        return torch.relu(x)


def test_a_value_only_a_metadata_assert_reads_is_removed_with_the_assert():
    gm, ctx = capture_for_pass(CastNobodyUses().eval(), (torch.randn(2, 3),))
    assert "aten.sin" in op_targets(gm) and "aten._assert_tensor_metadata" in op_targets(gm)
    out = run_pass(DeadCodeElimination(), gm, ctx)
    assert out.modified
    assert op_targets(out.module) == ["aten.relu"]


def test_a_transformers_causal_mask_is_not_computed_after_fusion():
    """Llama builds a T x T mask; after fusion (is_causal) no node may compute or hold it.

    Under the fold cap the mask becomes a stored constant whose only reader is a metadata assert:
    it stayed in the module (64 MiB at 8192 tokens) until dead_code dropped such asserts.
    """
    transformers = __import__("pytest").importorskip("transformers")
    import graphopt

    cfg = transformers.LlamaConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=128, vocab_size=100, attn_implementation="eager",
                                   use_cache=False)
    torch.manual_seed(0)
    model = transformers.LlamaModel(cfg).eval()
    seq = 96
    ids = torch.randint(0, 100, (1, seq))
    for cap in (None, 1024):  # folded into a constant (default cap), or left a computation (tiny cap)
        options = {} if cap is None else {"constant_fold_max_bytes": cap}
        result = graphopt.optimize(model, (ids,), **options)
        _assert_no_square_values(result.module, seq)


def _assert_no_square_values(gm, seq):
    square = [n.name for n in gm.graph.nodes
              if isinstance(v := n.meta.get("val"), torch.Tensor) and v.dim() >= 2 and v.shape[-2:] == (seq, seq)]
    assert square == [], square
    assert any("scaled_dot_product_attention" in str(n.target) for n in gm.graph.nodes)
