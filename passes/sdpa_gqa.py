"""Grouped-query attention without repeated keys and values, for attention that is already SDPA.

Rewrites:

    sdpa(q, repeat_kv(k), repeat_kv(v), mask)  -> sdpa(q, k, v, mask, enable_gqa=True)

``repeat_kv`` is transformers' ``k[:, :, None].expand(...).reshape(...)`` (or
``repeat_interleave`` over the heads dim): it copies every key and value once
per query group, every step. In a decode step that reads a whole KV cache the
copies cost more than the attention itself; SDPA's ``enable_gqa`` reads the
grouped heads in place. (Attention written out by hand is fused with
``enable_gqa`` by ``fuse_attention``; this pass serves models whose attention
already calls SDPA, which is what transformers' default ``sdpa``
implementation produces.)

Declines (with the reason in the report):
    * the installed torch's SDPA has no ``enable_gqa``;
    * CUDA with an explicit mask: there SDPA would fall back to its math
      kernel, slower than keeping the repeated k/v (CPU's flash kernel takes
      grouped heads with or without a mask); other devices: kept;
    * keys and values repeated by different factors, or not repeated at all
      (nothing to do: not reported).
Option ``attention_gqa`` (shared with ``fuse_attention``): ``'expand'`` switches it off.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from graphopt.opsets import erase_dead
from graphopt.pass_infra import OptimizeContext, Pass, PassResult
from graphopt.passes.analysis.sites.attention_layout import repeat_kv_source
from graphopt.passes.attention import FuseAttention, sdpa_supports_enable_gqa
from graphopt.report import Declined

SDPA = torch.ops.aten.scaled_dot_product_attention.default


def _mask_of(node: fx.Node) -> object:
    return node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")


def _decline(node: fx.Node, ctx: OptimizeContext) -> str | None:
    if not sdpa_supports_enable_gqa():
        return "this torch's scaled_dot_product_attention has no enable_gqa"
    if FuseAttention().option(ctx, "attention_gqa") == "expand":
        return "attention_gqa='expand'"
    if ctx.device.type == "cuda" and _mask_of(node) is not None:
        return "CUDA with an explicit mask: SDPA would fall back to its math kernel; repeated k/v kept"
    if ctx.device.type not in ("cpu", "cuda"):
        return f"no measured gain on {ctx.device.type}; repeated k/v kept"
    return None


class RegroupSdpaHeads(Pass):
    name = "sdpa_gqa"
    summary = "SDPA over repeated keys/values (GQA) -> SDPA with enable_gqa, reading the grouped heads in place"

    def call(self, gm: fx.GraphModule, ctx: OptimizeContext) -> PassResult:
        declined: list[Declined] = []
        involved: list[str] = []
        for node in gm.graph.nodes:
            if node.op != "call_function" or node.target != SDPA or node.kwargs.get("enable_gqa"):
                continue
            k, v = node.args[1], node.args[2]
            k_src = repeat_kv_source(k) if isinstance(k, fx.Node) else None
            v_src = repeat_kv_source(v) if isinstance(v, fx.Node) else None
            if k_src is None or v_src is None or k_src[1] != v_src[1]:
                continue
            reason = _decline(node, ctx)
            if reason:
                declined.append(Declined(node.name, reason))
                continue
            node.args = (node.args[0], k_src[0], v_src[0], *node.args[3:])
            node.kwargs = {**node.kwargs, "enable_gqa": True}
            involved.append(node.name)
        if involved:
            erase_dead(gm)
        notes = [f"{len(involved)} SDPA calls read grouped k/v heads in place (enable_gqa)"] if involved else []
        return PassResult(gm, bool(involved), notes, declined, involved)
