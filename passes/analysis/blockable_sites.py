"""Find the sites the blocked-operator planner can rewrite, and say why others are left.

Each finder is a semantic search from an anchor node (DESIGN.md "Patterns"):

* **attention** -- anchored at a softmax over the last axis, walking back
  through casts, additive biases (any number: T5's relative-position bias,
  ALiBi, additive masks), one ``masked_fill``/``where`` mask and a scalar
  scale to ``matmul(q, k^T)``, and forward through casts / eval dropout to
  ``matmul(p, v)``:
  ``matmul(q, k^T) * s + bias (+ ...) [masked] -> softmax -> matmul v``.
* **ffn** -- :func:`graphopt.passes.analysis.sites.ffn.ffn_site`, anchored at
  each linear site.
* **lm_head** -- :func:`graphopt.passes.analysis.sites.lm_head.lm_head_site`,
  anchored at ``gather`` / ``argmax`` / ``topk`` over the vocabulary.
* **matmul** -- any ``linear`` / activation x activation ``matmul``: the
  planner only blocks these when asked to (``block_matmul``) or when
  ``autotune`` measures it faster.

Every intermediate a rewrite removes must have no user outside the site;
otherwise the site is declined with the reason (e.g. attention weights that
are also returned).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.fx as fx

from graphopt import ir
from graphopt.opsets import ACTIVATION_MATMULS, SOFTMAX_FORMS, is_float_cast, is_parameter_view, is_passthrough
from graphopt.passes.analysis.sites.ffn import FFNSite, ffn_site
from graphopt.passes.analysis.sites.linear import LinearSite, linear_site
from graphopt.passes.analysis.sites.lm_head import LM_HEAD_REDUCTIONS, LMHeadSite, lm_head_site
from graphopt.passes.analysis.sites.walk import dtype_of, is_last_axis, real_users, single_user
from graphopt.pattern import attempt, declined_from
from graphopt.report import Declined

aten = torch.ops.aten

__all__ = ["AttentionSite", "FFNSite", "LMHeadSite", "MatmulSite", "BlockableSite", "find_blockable_sites"]

# the attention walk below reads the shared helpers under its own short names
_SOFTMAX = SOFTMAX_FORMS
_MATMULS = ACTIVATION_MATMULS
_users, _single_user, _last_axis, _dtype = real_users, single_user, is_last_axis, dtype_of
_is_float_cast, _is_passthrough, _is_weight = is_float_cast, is_passthrough, is_parameter_view


# ---------------------------------------------------------------- small helpers

def _scalar_value(gm: fx.GraphModule, arg: Any) -> float | None:
    """A Python number, or a one-element constant tensor's value."""
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



def _rank(node: Any) -> int:
    shape = ir.shape_of(node)
    return len(shape) if shape is not None else -1


# ---------------------------------------------------------------- sites


@dataclass
class AttentionSite:
    """``softmax(matmul(q, k^T) * scale + biases [masked]) @ v`` found in the graph."""

    kind: ClassVar[str] = "attention"
    softmax: fx.Node
    scores: fx.Node  # matmul(q, k^T)
    output: fx.Node  # matmul(p, v)
    q: fx.Node
    k_t: fx.Node  # the second operand of the scores matmul: (..., D, Tk)
    k: fx.Node | None  # (..., Tk, D) when k_t is a transpose of it
    v: fx.Node
    scale: float = 1.0
    biases: list[fx.Node] = field(default_factory=list)
    mask: fx.Node | None = None
    mask_invert: bool = False  # True: fill where the mask is False (torch.where(mask, s, fill))
    mask_value: float = -math.inf
    nodes: list[fx.Node] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.softmax.name

    @property
    def tq(self) -> int:
        return ir.shape_of(self.scores)[-2]

    @property
    def tk(self) -> int:
        return ir.shape_of(self.scores)[-1]

    @property
    def scores_bytes(self) -> int:
        val = ir.tensor_meta(self.scores)
        return int(val.numel() * max(val.element_size(), 4))

    def describe(self) -> str:
        extras = [f"{len(self.biases)} bias"] if self.biases else []
        if self.mask is not None:
            extras.append("mask")
        return f"attention at {self.softmax.name} ({self.tq}x{self.tk}{', ' + ', '.join(extras) if extras else ''})"


@dataclass
class MatmulSite:
    """A ``linear`` or activation x activation ``matmul`` (blocked only on request or when measured faster)."""

    kind: ClassVar[str] = "matmul"
    output: fx.Node
    linear: LinearSite | None  # None: a plain matmul of output.args[0] @ output.args[1]

    @property
    def name(self) -> str:
        return self.output.name

    def describe(self) -> str:
        return f"{ir.op_name(self.output)} at {self.output.name} {ir.shape_of(self.output)}"


BlockableSite = AttentionSite | FFNSite | LMHeadSite | MatmulSite


# ---------------------------------------------------------------- attention

def _leads_to_scores(node: Any, depth: int = 0) -> fx.Node | None:
    """The ``matmul(q, k^T)`` reached from ``node`` through the score chain (None if none)."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or depth > 16:
        return None
    t = node.target
    if t in _MATMULS:
        a, b = node.args[0], node.args[1]
        if isinstance(a, fx.Node) and isinstance(b, fx.Node) and not _is_weight(a) and not _is_weight(b):
            return node
        return None
    if _is_float_cast(node) or t in (aten.mul.Tensor, aten.div.Tensor, aten.masked_fill.Scalar,
                                     aten.masked_fill.Tensor):
        return _leads_to_scores(node.args[0], depth + 1)
    if t in (aten.where.ScalarOther, aten.where.self):
        return _leads_to_scores(node.args[1], depth + 1)
    if t is aten.add.Tensor:
        return _leads_to_scores(node.args[0], depth + 1) or _leads_to_scores(node.args[1], depth + 1)
    return None


def _attention_site(gm: fx.GraphModule, softmax: fx.Node) -> AttentionSite | str:
    if not _last_axis(softmax.args[1], softmax):
        return "softmax is not over the last axis"
    # forward: softmax -> casts / eval dropout -> matmul(p, v)
    nodes = [softmax]
    cur = softmax
    while True:
        user = _single_user(cur)
        if user is None:
            return "the attention probabilities are used elsewhere (returned or reused)"
        if user.op == "call_function" and user.target in _MATMULS and user.args[0] is cur:
            output = user
            break
        if user.op == "call_function" and _is_passthrough(user):
            nodes.append(user)
            cur = user
            continue
        if user.op == "call_function" and user.target is aten.dropout.default:
            return "dropout in training mode after the softmax"
        return f"the softmax feeds {ir.op_name(user)}, not a matmul with V"
    # backward: softmax input -> ... -> matmul(q, k^T)
    scale, biases, mask, mask_invert, mask_value = 1.0, [], None, False, -math.inf
    forward_ops: list[str] = []
    cur = softmax.args[0]
    while True:
        if not isinstance(cur, fx.Node) or cur.op != "call_function":
            return "the scores do not come from a matmul of two activations"
        if len(_users(cur)) != 1:
            return f"the scores ({cur.name}) are used elsewhere"
        t = cur.target
        if t in _MATMULS:
            scores = cur
            break
        nodes.append(cur)
        if _is_float_cast(cur):
            cur = cur.args[0]
        elif t is aten.add.Tensor:
            a, b = cur.args[0], cur.args[1]
            if cur.kwargs.get("alpha", 1) != 1 or not isinstance(a, fx.Node) or not isinstance(b, fx.Node):
                return f"{cur.name}: add with a scalar or alpha"
            on_a, on_b = _leads_to_scores(a), _leads_to_scores(b)
            if bool(on_a) == bool(on_b):
                return f"{cur.name}: cannot tell the scores from the bias"
            biases.append(b if on_a else a)
            forward_ops.append("bias")
            cur = a if on_a else b
        elif t in (aten.mul.Tensor, aten.div.Tensor):
            value = _scalar_value(gm, cur.args[1])
            if value is None or value == 0:
                return f"{cur.name}: scores scaled by a tensor, not a constant"
            scale *= value if t is aten.mul.Tensor else 1.0 / value
            forward_ops.append("scale")
            cur = cur.args[0]
        elif t in (aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.where.ScalarOther, aten.where.self):
            if mask is not None:
                return "more than one mask"
            if t in (aten.masked_fill.Scalar, aten.masked_fill.Tensor):
                scores_arg, mask, mask_invert, fill = cur.args[0], cur.args[1], False, cur.args[2]
            else:
                scores_arg, mask, mask_invert, fill = cur.args[1], cur.args[0], True, cur.args[2]
            value = _scalar_value(gm, fill)
            if value is None:
                return f"{cur.name}: mask filled with a tensor, not a constant"
            if _dtype(mask) is not torch.bool:
                return f"{cur.name}: the mask is not boolean"
            mask_value = value
            forward_ops.append("mask")
            cur = scores_arg
        else:
            return f"{cur.name}: {ir.op_name(cur)} between the scores and the softmax"
    forward_ops.reverse()
    seen_other = False
    for op in forward_ops:
        if op == "scale" and seen_other:
            return "the scale is applied after a bias or mask"
        seen_other |= op != "scale"
    if "mask" in forward_ops and "bias" in forward_ops[forward_ops.index("mask"):] and mask_value != -math.inf:
        return "a bias is added after a mask with a finite fill value"
    q, k_t = scores.args[0], scores.args[1]
    v = output.args[1]
    if _rank(q) < 2 or _rank(k_t) < 2 or _rank(v) < 2:
        return "q, k or v has fewer than 2 dims"
    k = None
    if k_t.op == "call_function":
        r = _rank(k_t)
        if k_t.target is aten.transpose.int and sorted(d % r for d in k_t.args[1:3]) == [r - 2, r - 1]:
            k = k_t.args[0]
        elif k_t.target is aten.permute.default and [d % r for d in k_t.args[1]] == list(range(r - 2)) + [r - 1, r - 2]:
            k = k_t.args[0]
    return AttentionSite(softmax, scores, output, q, k_t, k, v, scale, biases, mask, mask_invert, mask_value, nodes)



# ---------------------------------------------------------------- entry point

def find_blockable_sites(gm: fx.GraphModule, kinds: tuple[str, ...] = ("attention", "ffn", "lm_head", "matmul")) \
        -> tuple[list[BlockableSite], list[Declined]]:
    """Every site of ``kinds`` the planner can block, in graph order, and the candidates it cannot, with reasons.

    Kinds are searched in the order lm_head, attention, ffn, matmul; a node
    claimed by one site is not part of another.
    """
    sites: list[BlockableSite] = []
    declined: list[Declined] = []
    taken: set[fx.Node] = set()

    def add(site: BlockableSite) -> None:
        sites.append(site)
        taken.update(getattr(site, "nodes", []))
        taken.add(site.output)

    for node in gm.graph.nodes if "lm_head" in kinds else ():
        if node.op != "call_function":
            continue
        if node.target in LM_HEAD_REDUCTIONS:
            found = attempt(lm_head_site, node)
            if (decline := declined_from(node.name, found)) is not None:
                declined.append(decline)
            elif found is not None:
                add(found)
    for node in gm.graph.nodes if "attention" in kinds else ():
        if node.op == "call_function" and node.target in _SOFTMAX and node not in taken:
            found = _attention_site(gm, node)
            if isinstance(found, str):
                if "softmax feeds" in found or "not a matmul" in found:
                    continue  # a softmax that is not attention (e.g. a classifier head): not a candidate
                declined.append(Declined(node.name, found))
            else:
                add(found)
    for node in gm.graph.nodes if "ffn" in kinds else ():
        lin = linear_site(node)
        if lin is None or node in taken:
            continue
        found = attempt(ffn_site, gm, lin)
        if (decline := declined_from(node.name, found)) is not None:
            declined.append(decline)
        elif found is not None and not (set(found.nodes) & taken):
            add(found)
    for node in gm.graph.nodes if "matmul" in kinds else ():
        if node in taken or node.op != "call_function":
            continue
        lin = linear_site(node)
        if lin is not None and node.target in (aten.linear.default, aten.addmm.default, aten.mm.default,
                                               aten.matmul.default):
            sites.append(MatmulSite(node, lin))
        elif node.target in _MATMULS and _rank(node.args[0]) >= 2 and _rank(node.args[1]) >= 2:
            sites.append(MatmulSite(node, None))
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    sites.sort(key=lambda s: order[s.output])
    return sites, declined
