"""Rewrite one blockable site into graphopt's blocked operators.

``apply_block_config(gm, site, cfg)`` replaces the site's output with the
blocked form and returns the new nodes; the replaced nodes become dead (the
caller runs dead-code elimination). New nodes get ``meta["val"]`` on the spot
(:class:`graphopt.node_builder.NodeBuilder`), so the result can be analysed
right away.

Attention biases are handled by kind (query axis = the bias' second-to-last):

* broadcast over queries (ALiBi ``(1, H, 1, Tk)``, padding mask) or small:
  passed whole, the operator reads tiles through views;
* large and recomputable from small inputs (T5's relative-position bias, a
  ``(T, T)`` mask built from ``arange``): the attention is unrolled over query
  blocks in the graph and each block recomputes its bias rows
  (:class:`graphopt.row_slicing.RowSlicer`), so the full bias need not exist;
* large and not recomputable: kept, read by views.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.fx as fx

from graphopt import ir
from graphopt.passes.analysis.blocked_cost import BlockConfig
from graphopt.node_builder import NodeBuilder
from graphopt.ops._blocking import n_blocks, spans
from graphopt.passes.analysis.blockable_sites import (
    BlockableSite,
    FFNChain,
    LMHeadSite,
    MatmulSite,
)
from graphopt.passes.analysis.sites import AttentionSite
from graphopt.passes.analysis.sites.linear import LinearSite
from graphopt.row_slicing import DEFAULT_LEAF_BYTES, RowSlicer

aten = torch.ops.aten
graphopt_ops = torch.ops.graphopt

__all__ = ["apply_block_config", "bias_plan", "kept_bias_notes", "remap_site"]


def remap_site(site: BlockableSite, nodes_by_name: dict[str, fx.Node]) -> BlockableSite:
    """The same site with every node replaced by the node of that name in another graph (a copy)."""

    def convert(value: Any) -> Any:
        if isinstance(value, fx.Node):
            return nodes_by_name[value.name]
        if dataclasses.is_dataclass(value) and not isinstance(value, type):  # LinearSite, MaskTerm, ScoreStep
            return type(value)(**{f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)
                                  if f.init})
        if isinstance(value, list):
            return [convert(v) for v in value]
        return value

    return type(site)(**{f.name: convert(getattr(site, f.name)) for f in dataclasses.fields(site)})


# ---------------------------------------------------------------- attention

def bias_plan(site: AttentionSite, slicer: RowSlicer) -> dict[fx.Node, str]:
    """How each bias / mask term is read: 'broadcast', 'view', 'recompute' or 'keep'."""
    plan = {}
    for term in list(site.biases) + ([site.fill_mask] if site.fill_mask is not None else []):
        axis = _query_axis(term)
        if axis is None:
            plan[term] = "broadcast"
        elif slicer.is_leaf(term, axis):
            plan[term] = "view"
        elif not slicer.why_not(term, axis):
            plan[term] = "recompute"
        else:
            plan[term] = "keep"
    return plan


def kept_bias_notes(sites: list[BlockableSite], slicer: RowSlicer) -> list[str]:
    """A note for each attention site whose large biases are kept whole, with why they are not recomputable."""
    notes = []
    for site in sites:
        if isinstance(site, AttentionSite):
            kept = [t for t, how in bias_plan(site, slicer).items() if how == "keep"]
            if kept:
                why = "; ".join(slicer.why_not(t, len(ir.shape_of(t)) - 2) for t in kept)
                notes.append(f"{site.name}: bias {', '.join(t.name for t in kept)} kept whole "
                             f"(not recomputable per query block: {why})")
    return notes


def _query_axis(term: fx.Node) -> int | None:
    shape = ir.shape_of(term)
    if shape is None or len(shape) < 2 or shape[-2] == 1:
        return None
    return len(shape) - 2


def _nbytes(node: fx.Node) -> int:
    val = ir.tensor_meta(node)
    return int(val.numel() * val.element_size()) if val is not None else 0


def _rewrite_attention(gm: fx.GraphModule, site: AttentionSite, cfg: BlockConfig, b: NodeBuilder,
                       slicer: RowSlicer) -> fx.Node:
    q_block, kv_block = cfg.sizes
    tq, softcap = site.tq, float(site.soft_cap or 0.0)
    q, v, mask_node = site.q_operand, site.v_operand, site.fill_mask
    k = site.k_source if site.k_source is not None else b.call(aten.transpose.int, site.k_t_operand, -2, -1)
    plan = bias_plan(site, slicer)
    summed_bytes = 0
    if len(site.biases) > 1:
        shapes = [ir.shape_of(t) for t in site.biases]
        summed_bytes = int(torch.Size(torch.broadcast_shapes(*shapes)).numel()) * 4
    large_invert = mask_node is not None and site.mask_invert and plan[mask_node] not in ("broadcast",) \
        and _nbytes(mask_node) > slicer.leaf_bytes
    unroll = n_blocks(tq, q_block) > 1 and (
        "recompute" in plan.values() or summed_bytes > slicer.leaf_bytes or large_invert)
    if not unroll:
        bias = None
        for term in site.biases:
            bias = term if bias is None else b.call(aten.add.Tensor, bias, term)
        mask = mask_node
        if mask is not None and site.mask_invert:
            mask = b.call(aten.logical_not.default, mask)
        return b.call(graphopt_ops.blocked_attention.default, q, k, v, bias, mask,
                      float(site.mask_value), float(site.score_scale), q_block, kv_block, softcap)
    q_axis = len(ir.shape_of(q)) - 2
    outs = []
    for i0, i1 in spans(tq, q_block):
        memo: dict[Any, fx.Node] = {}

        def rows(term: fx.Node) -> fx.Node:
            axis = _query_axis(term)
            if axis is None:
                return term
            if plan[term] == "recompute":
                return slicer.slice(term, axis, i0, i1, b, memo)
            return b.call(aten.slice.Tensor, term, axis, i0, i1)

        q_rows = b.call(aten.slice.Tensor, q, q_axis, i0, i1) if ir.shape_of(q)[-2] > 1 else q
        bias = None
        for term in site.biases:
            part = rows(term)
            bias = part if bias is None else b.call(aten.add.Tensor, bias, part)
        mask = rows(mask_node) if mask_node is not None else None
        if mask is not None and site.mask_invert:
            mask = b.call(aten.logical_not.default, mask)
        outs.append(b.call(graphopt_ops.blocked_attention.default, q_rows, k, v, bias, mask,
                           float(site.mask_value), float(site.score_scale), i1 - i0, kv_block, softcap))
    out_rank = len(ir.shape_of(site.output))
    return b.call(aten.cat.default, outs, out_rank - 2) if len(outs) > 1 else outs[0]


# ---------------------------------------------------------------- FFN / LM head / matmul

def _weight_out_in(lin: LinearSite | None, b: NodeBuilder) -> fx.Node | None:
    """The weight in ``(out, in)`` layout (views: a transpose, a slice of a merged weight)."""
    if lin is None:
        return None
    w = lin.weight
    if lin.out_slice is not None:
        w = b.call(aten.slice.Tensor, w, 1 if lin.weight_is_in_out else 0, *lin.out_slice)
    return b.call(aten.t.default, w) if lin.weight_is_in_out else w


def _bias(lin: LinearSite | None, b: NodeBuilder) -> fx.Node | None:
    if lin is None or lin.bias is None:
        return None
    return b.call(aten.slice.Tensor, lin.bias, 0, *lin.out_slice) if lin.out_slice is not None else lin.bias


def _rewrite_ffn(site: FFNChain, cfg: BlockConfig, b: NodeBuilder) -> fx.Node:
    gate = site.lin_gate
    return b.call(graphopt_ops.chunked_ffn.default, site.x, _weight_out_in(site.lin_in, b), _bias(site.lin_in, b),
                  _weight_out_in(gate, b), _bias(gate, b), _weight_out_in(site.lin_out, b), _bias(site.lin_out, b),
                  site.activation_name, cfg.sizes[0])


def _rewrite_lm_head(site: LMHeadSite, cfg: BlockConfig, b: NodeBuilder) -> fx.Node | None:
    hidden = site.head.input
    lead = list(ir.shape_of(site.logits_view)[:-1])
    if list(ir.shape_of(hidden)[:-1]) != lead:
        hidden = b.call(aten.reshape.default, hidden, lead + [ir.shape_of(hidden)[-1]])
    w = _weight_out_in(site.head, b)
    chunk = cfg.sizes[0]
    if site.reduction == "gather":
        return b.call(graphopt_ops.chunked_lm_head_gather.default, hidden, w, site.head.bias, site.index,
                      site.normalize, site.upcast, chunk)
    if site.reduction == "argmax":
        out = b.call(graphopt_ops.chunked_lm_head_argmax.default, hidden, w, site.head.bias, site.normalize,
                     site.upcast, chunk)
        return b.call(aten.unsqueeze.default, out, -1) if site.keepdim else out
    result = b.call(graphopt_ops.chunked_lm_head_topk.default, hidden, w, site.head.bias, site.k, site.largest,
                    site.normalize, site.upcast, chunk)
    for user in list(site.output.users):
        user.replace_all_uses_with(b.getitem(result, user.args[1]))
    return None


def _rewrite_matmul(site: MatmulSite, cfg: BlockConfig, b: NodeBuilder) -> fx.Node:
    rows, cols, k = cfg.sizes
    if site.linear is not None:
        return b.call(graphopt_ops.blocked_linear.default, site.linear.input, _weight_out_in(site.linear, b),
                      site.linear.bias, rows, cols, k)
    return b.call(graphopt_ops.blocked_matmul.default, site.output.args[0], site.output.args[1], rows, cols, k)


# ---------------------------------------------------------------- entry point

def apply_block_config(gm: fx.GraphModule, site: BlockableSite, cfg: BlockConfig, fake_mode: Any = None,
                       leaf_bytes: int = DEFAULT_LEAF_BYTES, val_cache: dict[Any, Any] | None = None) \
        -> list[fx.Node]:
    """Rewrite ``site`` in ``gm`` as ``cfg`` says; return the nodes created.

    The site's output is replaced (casting or reshaping the new value to the
    old dtype/shape where they differ); its other nodes are left dead.
    ``val_cache`` (shared between copies of one graph) skips recomputing the
    fake values when the same rewrite is applied again.
    """
    b = NodeBuilder(gm, site.output, fake_mode, val_cache, (site.name, cfg, leaf_bytes))
    if isinstance(site, AttentionSite):
        new = _rewrite_attention(gm, site, cfg, b, RowSlicer(gm, leaf_bytes))
    elif isinstance(site, FFNChain):
        new = _rewrite_ffn(site, cfg, b)
    elif isinstance(site, LMHeadSite):
        new = _rewrite_lm_head(site, cfg, b)
    elif isinstance(site, MatmulSite):
        new = _rewrite_matmul(site, cfg, b)
    else:  # pragma: no cover
        raise TypeError(f"not a blockable site: {site!r}")
    if new is not None:
        new = _conform(new, site.output, b)
        site.output.replace_all_uses_with(new)
    return b.created


def _conform(new: fx.Node, old: fx.Node, b: NodeBuilder) -> fx.Node:
    """``new`` with ``old``'s shape and dtype."""
    old_val, new_val = ir.tensor_meta(old), ir.tensor_meta(new)
    if old_val is None or new_val is None:
        return new
    if tuple(new_val.shape) != tuple(old_val.shape):
        new = b.call(aten.reshape.default, new, list(old_val.shape))
    if new_val.dtype != old_val.dtype:
        new = b.call(aten._to_copy.default, new, dtype=old_val.dtype)
    return new
