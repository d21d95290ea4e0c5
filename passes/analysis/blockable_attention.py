"""Which attention sites the blocked-attention operator can take, and why not the others.

The blocked planner reads the sites of :func:`graphopt.passes.analysis.sites.find_attention_sites`
as written: ``matmul(q, k^T) * scale + bias (+ ...) [masked] -> softmax ->
matmul v``, with casts between Q @ K^T and the softmax and casts / eval
dropout between the softmax and V. Any number of additive biases (T5's
relative-position bias, ALiBi, additive masks, learned or not), one
``masked_fill`` / ``where`` mask, the scale applied first, and a tanh
soft-cap ``c * tanh(s / c)`` after the scale and before the bias and mask (Gemma 2).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx

from graphopt import ir
from graphopt.opsets import SOFTMAX, is_float_cast, is_passthrough
from graphopt.passes.analysis.sites import AttentionSite
from graphopt.passes.analysis.sites.attention_walk import ADDITIVE, FILL, PASS, SCALE, SOFTCAP
from graphopt.pattern import Decline

aten = torch.ops.aten

__all__ = ["check_blockable_attention", "describe_blockable", "is_blockable_candidate"]

_MATMULS = {aten.matmul.default, aten.bmm.default}
_MASKED_FILL = {aten.masked_fill.Scalar, aten.masked_fill.Tensor}
_MASK_OPS = _MASKED_FILL | {aten.where.ScalarOther, aten.where.self}


def _scalar_value(gm: fx.GraphModule, arg: Any) -> float | None:
    """A Python number, or a one-element constant the operator can read without running the graph."""
    if isinstance(arg, (int, float)) and not isinstance(arg, bool):
        return float(arg)
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        val = ir.get_attr_value(gm, arg)
        if isinstance(val, torch.Tensor) and val.numel() == 1:
            return float(val.item())
    if isinstance(arg, fx.Node) and arg.op == "call_function" and arg.target in (
            aten.full.default, aten.scalar_tensor.default) and ir.tensor_meta(arg) is not None \
            and ir.tensor_meta(arg).numel() == 1:
        value = arg.args[1] if arg.target is aten.full.default else arg.args[0]
        return float(value) if isinstance(value, (int, float)) else None
    return None


def is_blockable_candidate(site: AttentionSite) -> bool:
    """A softmax the planner considers: its weights reach ``matmul``/``bmm`` through pass-through ops.

    A softmax feeding anything else (a classifier head) is not attention: no
    decline is reported for it.
    """
    if site.softmax.target not in SOFTMAX:
        return False
    end = site.weights_end
    if end is None:  # declined before the end: the softmax dim, or weights used elsewhere
        return True
    last = site.weights_chain[-1] if site.weights_chain else site.softmax
    return all(is_passthrough(n) for n in site.weights_chain) and end.op == "call_function" \
        and end.target in _MATMULS and end.args[0] is last


def _between(node: fx.Node) -> Decline:
    return Decline(f"{node.name}: {ir.op_name(node)} between the scores and the softmax")


def _check_step(gm: fx.GraphModule, node: fx.Node, role: str, data: fx.Node) -> float | None:
    """Decline a score step the operator cannot express; return the fill value of a mask step."""
    if role == SOFTCAP:  # the walk checked it: c * tanh(s / c) after the scale, nothing added inside
        return None
    if role == PASS and not is_float_cast(node) or role not in (PASS, ADDITIVE, SCALE, FILL):
        raise _between(node)
    if role == ADDITIVE:
        if node.target is not aten.add.Tensor:
            raise _between(node)
        if node.kwargs.get("alpha", 1) != 1 or not all(isinstance(a, fx.Node) for a in node.args[:2]):
            raise Decline(f"{node.name}: add with a scalar or alpha")
    if role == SCALE:
        value = _scalar_value(gm, node.args[1]) if node.args[0] is data else None
        if value is None or value == 0:
            raise Decline(f"{node.name}: scores scaled by a tensor, not a constant")
    if role == FILL:
        if node.target not in _MASK_OPS:
            raise _between(node)
        on_scores = node.args[0] if node.target in _MASKED_FILL else node.args[1]
        value = _scalar_value(gm, node.args[2]) if on_scores is data else None
        if value is None:
            raise Decline(f"{node.name}: mask filled with a tensor, not a constant")
        return value
    return None


def _check_order(roles: list[str], mask_value: float) -> None:
    """The scale comes first; a bias after a mask needs a -inf fill."""
    forward = [r for r in reversed(roles) if r in (SCALE, ADDITIVE, FILL)]
    seen_other = False
    for role in forward:
        if role == SCALE and seen_other:
            raise Decline("the scale is applied after a bias or mask")
        seen_other |= role != SCALE
    if FILL in forward and ADDITIVE in forward[forward.index(FILL):] and mask_value != -math.inf:
        raise Decline("a bias is added after a mask with a finite fill value")


def check_blockable_attention(site: AttentionSite) -> None:
    """Decline (:class:`graphopt.pattern.Decline`) a site the blocked-attention operator cannot express."""
    if site.weights_declined is not None:
        raise Decline(site.weights_declined)
    if site.declined is not None:
        raise Decline(site.declined)
    gm = site.softmax.graph.owning_module
    chain = site.score_chain + [site.scores]
    n_masks = 0
    for i, step in enumerate(site.score_steps):
        if step.role == FILL:
            n_masks += 1
            if n_masks > 1:
                raise Decline("more than one mask")
        _check_step(gm, step.node, step.role, chain[i + 1])
    if site.scores.target not in _MATMULS:
        raise _between(site.scores)
    _check_order([s.role for s in site.score_steps], site.mask_value)
    if any(len(ir.shape_of(n) or ()) < 2 for n in (site.q_operand, site.k_t_operand, site.v_operand)):
        raise Decline("q, k or v has fewer than 2 dims")


def describe_blockable(site: Any) -> str:
    """One line naming a blockable site (attention: its score shape, biases and mask)."""
    if not isinstance(site, AttentionSite):
        return site.describe()
    extras = [f"{len(site.biases)} bias"] if site.biases else []
    if site.fill_mask is not None:
        extras.append("mask")
    return f"attention at {site.softmax.name} ({site.tq}x{site.tk}{', ' + ', '.join(extras) if extras else ''})"
