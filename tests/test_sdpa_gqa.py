"""sdpa_gqa: SDPA over repeat_kv'd keys/values reads the grouped heads in place (enable_gqa)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from graphopt.passes.sdpa_gqa import RegroupSdpaHeads
from tests.support.helpers import assert_outputs_close, call, capture_for_pass, op_targets, run_pass


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:  # transformers' form
    b, h, t, d = x.shape
    return x[:, :, None, :, :].expand(b, h, groups, t, d).reshape(b, h * groups, t, d)


class GroupedAttention(nn.Module):
    def __init__(self, groups: int = 4, with_mask: bool = True) -> None:
        super().__init__()
        self.groups, self.with_mask = groups, with_mask

    def forward(self, q, k, v, mask):
        k, v = repeat_kv(k, self.groups), repeat_kv(v, self.groups)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask if self.with_mask else None)


def _inputs(t: int = 6):
    torch.manual_seed(0)
    q = torch.randn(2, 8, 1, 16)
    k, v = torch.randn(2, 2, t, 16), torch.randn(2, 2, t, 16)
    mask = torch.rand(2, 1, 1, t) < 0.8
    mask[..., 0] = True
    return q, k, v, mask


def test_golden_ops_and_idempotence():
    gm, ctx = capture_for_pass(GroupedAttention(), _inputs())
    first = run_pass(RegroupSdpaHeads(), gm, ctx)
    assert first.modified
    assert op_targets(first.module) == ["aten.scaled_dot_product_attention"]
    sdpa = next(n for n in first.module.graph.nodes if n.op == "call_function")
    assert sdpa.kwargs.get("enable_gqa") is True
    assert not run_pass(RegroupSdpaHeads(), first.module, ctx).modified


def test_numerics_equal():
    args = _inputs()
    gm, ctx = capture_for_pass(GroupedAttention(), args)
    out = run_pass(RegroupSdpaHeads(), gm, ctx).module
    assert_outputs_close(call(GroupedAttention(), args), call(out, args))


def test_declined_when_asked_to_keep_the_repeated_heads():
    gm, ctx = capture_for_pass(GroupedAttention(), _inputs(), attention_gqa="expand")
    result = run_pass(RegroupSdpaHeads(), gm, ctx)
    assert not result.modified and [d.reason for d in result.declined] == ["attention_gqa='expand'"]


def test_declined_on_cuda_with_an_explicit_mask():
    gm, ctx = capture_for_pass(GroupedAttention(), _inputs())
    ctx.device = torch.device("cuda")  # the decision only; nothing runs
    result = run_pass(RegroupSdpaHeads(), gm, ctx)
    assert not result.modified
    assert "math kernel" in result.declined[0].reason
