"""Decode attention (one query per row) as two matmuls and a softmax, in the copy a CPU compiler is handed.

    aten.scaled_dot_product_attention(q [B, H, 1, D], k [B, Hkv, L, D], v [B, Hkv, L, Dv], mask, scale, enable_gqa)
        -> softmax(q as [B, Hkv, H/Hkv, D] @ k^T * scale + mask) @ v      (the H/Hkv query heads of a KV head
                                                                             as rows: GQA without repeating k/v)

Why: at one query per row the attention is a few thousand multiply-adds per
head, and torch's fused CPU kernel (flash attention) spends its time in
setup: 27 us per call at L=256, 8 heads on the development Xeon. Compiled by
AOTInductor, four attentions took 153 us as the fused op and 90 us in this
form (its softmax and mask fuse into one generated kernel around two batched
matmuls), about 4% of an int8 weight-only decode step of the benchmark
Llama. Uncompiled the math form is slower (34.5 against 27 us eager: five
ops instead of one), so only the copy handed to a compiler on a CPU is
rewritten (:meth:`~graphopt.generate.build.GenerationGraphs.decode_step`);
the graph that is saved, exported and run uncompiled keeps the fused op.
The scores are computed in the inputs' dtype and the softmax in fp32, as
the fused kernel accumulates.

Declined (the node is kept as it is): a query longer than one position (a
prompt: the math form would materialise its L x T scores), dropout, ``is_causal``
(decode reads the cache through its mask), query heads that are not a
multiple of the KV heads, or shapes the node's metadata does not record.
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx

from graphopt import ir

log = logging.getLogger(__name__)

__all__ = ["decode_attention", "math_decode_attention"]

_SDPA = torch.ops.aten.scaled_dot_product_attention.default


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                     dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                     enable_gqa: bool = False) -> torch.Tensor:
    """``scaled_dot_product_attention`` for a query of one position, as plain ops (see the module docstring)."""
    b, heads, _, dim = q.shape
    kv_heads, length = k.shape[1], k.shape[2]
    group = heads // kv_heads
    scale = dim ** -0.5 if scale is None else scale
    scores = torch.matmul(q.reshape(b, kv_heads, group, dim), k.transpose(-1, -2)).float() * scale
    if attn_mask is not None:
        mask = attn_mask.expand(b, heads, 1, length).reshape(b, kv_heads, group, length)
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    weights = scores.softmax(-1).to(v.dtype)
    return torch.matmul(weights, v).reshape(b, heads, 1, v.shape[-1])


def _decline(node: fx.Node) -> str | None:
    """Why ``node`` (an SDPA call) stays fused; None: it is a one-query decode attention."""
    args = dict(zip(("q", "k", "v", "attn_mask", "dropout_p", "is_causal"), node.args), **node.kwargs)
    vals = [getattr(args.get(name), "meta", {}).get("val") for name in ("q", "k")]
    if any(not isinstance(val, torch.Tensor) or val.dim() != 4 for val in vals):
        return "shapes not recorded"
    q, k = vals
    if not isinstance(q.shape[2], int) or q.shape[2] != 1:
        return "a query of more than one position"
    if args.get("dropout_p", 0.0) or args.get("is_causal", False):
        return "dropout or is_causal"
    heads, kv_heads = q.shape[1], k.shape[1]
    if heads != kv_heads and (not args.get("enable_gqa", False) or heads % kv_heads):
        return f"{heads} query heads over {kv_heads} KV heads"
    return None


def math_decode_attention(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` (a GraphModule; anything else is returned as it is) whose one-query attentions call
    :func:`decode_attention`; the copy shares every tensor with ``module``, which is left unchanged. Returns
    ``module`` itself where no attention qualifies."""
    if not isinstance(module, fx.GraphModule):
        return module
    reasons = {n.name: _decline(n) for n in module.graph.nodes if n.op == "call_function" and n.target is _SDPA}
    for name, why in reasons.items():
        if why is not None:
            log.debug("decode attention: %s kept fused: %s", name, why)
    sites = [name for name, why in reasons.items() if why is None]
    if not sites:
        return module
    out = ir.copy_graph_module(module)
    for node in out.graph.nodes:
        if node.name in sites:
            node.target = decode_attention
    out.recompile()
    log.debug("decode attention as matmuls: %d sites", len(sites))
    return out
