"""The two walks from a softmax: back through the scores to Q @ K^T, forward through the weights to V.

Backward from the softmax's input: casts (softmax in float32), clones,
eval-mode dropout, reshapes of the leading (batch/head) dims, scalar
``mul``/``div`` (the scale, also as a 0-dim constant such as ``sqrt(d)``),
additive terms (``add``/``sub``, also ``scores += bias`` in place: masks and
biases, learned or not), boolean
masks (``masked_fill``, ``where``), down to the product of two activations:
``matmul``, ``bmm`` (flattened batch*heads), ``baddbmm`` (its ``alpha`` is a
scale, its ``beta * input`` an additive term) or a two-operand ``einsum``.
Forward from the softmax: casts, eval-mode dropout and leading-dim reshapes to
the product with V. Each walk declines (:class:`graphopt.pattern.Decline`)
what no consumer can take, naming it: an elementwise op of the scores
(``UNARY_SCORE_OPS``) is walked through only to say what it is, e.g.
``tanh soft-cap (cap 50.0)`` for Gemma 2's ``cap * tanh(scores / cap)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from graphopt import ir
from graphopt.passes.analysis.sites.attention_masks import MaskTerm, unnegated
from graphopt.passes.analysis.sites.attention_ops import (
    ADD_OPS, INPLACE_ADD_OPS, MASKED_FILL_OPS, MATMUL_OPS, PRODUCT_OPS, SCALE_OPS, WHERE_OPS, Constants, dtype_of,
    is_active_dropout, is_identity, is_leading_reshape, static_shape,
)
from graphopt.opsets import value_users
from graphopt.pattern import Decline

aten = torch.ops.aten

#: what a node between Q @ K^T and the softmax does to the scores
PASS, RESHAPE, SCALE, ADDITIVE, FILL = "pass", "reshape", "scale", "additive", "fill"
#: the nodes of a tanh soft-cap ``c * tanh(scores / c)`` (Gemma 2): the outer ``* c``, the ``tanh``, the ``/ c``
SOFTCAP = "softcap"


@dataclass
class ScoreStep:
    """One node between Q @ K^T and the softmax, and its role: pass, reshape, scale, additive or fill."""

    node: fx.Node
    role: str


@dataclass
class Scores:
    """What the backward walk from the softmax found (steps nearest the softmax first)."""

    product: fx.Node
    steps: list[ScoreStep]
    scale: float
    terms: list[MaskTerm]
    #: the cap ``c`` of a tanh soft-cap applied after the scale (None: no soft-cap)
    softcap: float | None = None


@dataclass
class Weights:
    """What the forward walk from the softmax found.

    ``end``: the node the weights feed after ``chain`` (pass-through ops);
    ``product``: that node when it is the product with V, else None.
    """

    end: fx.Node
    product: fx.Node | None
    chain: list[fx.Node] = field(default_factory=list)


def _product_of_activations(node: fx.Node, consts: Constants) -> bool:
    if node.op != "call_function" or node.target not in PRODUCT_OPS:
        return False
    if node.target == aten.einsum.default:
        ops = node.args[1]
        return len(ops) == 2 and not any(consts.is_constant(o) for o in ops)
    a, b = (node.args[1], node.args[2]) if node.target == aten.baddbmm.default else (node.args[0], node.args[1])
    return not consts.is_constant(a) and not consts.is_constant(b)


def leads_to_product(node: Any, consts: Constants, depth: int = 0) -> bool:
    """Does ``node`` come from a product of two activations through score-chain ops?"""
    if not isinstance(node, fx.Node) or node.op != "call_function" or depth > 32 or consts.is_constant(node):
        return False
    if _product_of_activations(node, consts):
        return True
    t = node.target
    if is_identity(node) or is_leading_reshape(node) or t in SCALE_OPS | MASKED_FILL_OPS:
        return leads_to_product(node.args[0], consts, depth + 1)
    if t in UNARY_SCORE_OPS:  # not a step the fusion takes, but it names the construct (a soft-cap)
        return leads_to_product(node.args[0], consts, depth + 1)
    if t in ADD_OPS | {aten.mul.Tensor}:
        return any(leads_to_product(a, consts, depth + 1) for a in node.args[:2])
    if t in WHERE_OPS:
        return any(leads_to_product(a, consts, depth + 1) for a in node.args[1:3])
    return False


#: elementwise ops of the scores alone: no fused op takes them, the walk names them (``tanh``: a soft-cap)
UNARY_SCORE_OPS = frozenset({aten.tanh.default, aten.sigmoid.default, aten.relu.default, aten.abs.default,
                             aten.exp.default, aten.clamp.default, aten.neg.default})


def soft_cap(tanh: fx.Node, consts: Constants) -> float | None:
    """The cap ``c`` of ``c * tanh(scores / c)`` (Gemma 2) at this ``tanh``, None if it is not one.

    The outer ``* c`` is the step the walk met before: it reads as a scale, so
    only the ``/ c`` (or ``* (1 / c)``) inside is checked here.
    """
    inner = tanh.args[0]
    if not isinstance(inner, fx.Node) or inner.op != "call_function" or inner.target not in SCALE_OPS:
        return None
    c = consts.scalar(inner.args[1])
    if not c:
        return None
    return float(c) if inner.target == aten.div.Tensor else 1.0 / float(c)


def _unary_decline(cur: fx.Node, consts: Constants) -> Decline:
    """The reason for an elementwise op of the scores: a soft-cap by name, any other op by its name."""
    cap = soft_cap(cur, consts) if cur.target == aten.tanh.default else None
    if cap is not None:
        return Decline(f"tanh soft-cap (cap {cap}): SDPA cannot apply it")
    return Decline(f"{ir.op_name(cur)} ({cur.name}) between Q @ K^T and the softmax is not a scale or a mask")


class _ScoreWalk:
    """State of the backward walk: scale so far, the terms and steps met."""

    def __init__(self, consts: Constants) -> None:
        self.consts = consts
        self.steps: list[ScoreStep] = []
        self.terms: list[MaskTerm] = []
        self.scale = 1.0
        self.outer = 1.0  # product of the scales met so far: they apply to the terms met next
        self.softcap: float | None = None
        self.cap_inner: fx.Node | None = None  # the soft-cap's ``/ c``, once its tanh is met

    def product(self, cur: fx.Node) -> Scores:
        if cur.target == aten.baddbmm.default:
            beta = float(cur.kwargs.get("beta", 1))
            alpha = float(cur.kwargs.get("alpha", 1))
            if beta != 0:
                self.terms.append(MaskTerm(cur.args[0], "additive", static_shape(cur), coefficient=self.outer * beta,
                                           applied_by=cur, written=cur.args[0],
                                           learned=self.consts.learned(cur.args[0])))
            self.scale *= alpha
        return Scores(cur, self.steps, self.scale, self.terms, self.softcap)

    def scale_step(self, cur: fx.Node) -> Any:
        a, b = cur.args[0], cur.args[1]
        data, factor = (a, b) if leads_to_product(a, self.consts) else (b, a)
        if cur.target == aten.div.Tensor and data is not a:
            raise Decline(f"{cur.name} divides by the scores")
        c = self.consts.scalar(factor)
        if c is None:
            raise Decline(f"the scores are multiplied by a tensor ({getattr(factor, 'name', factor)}), "
                          "not a constant scale")
        if cur.target == aten.div.Tensor:
            if c == 0:
                raise Decline(f"{cur.name} divides the scores by zero")
            c = 1.0 / c
        self.scale *= c
        self.outer *= c
        return data

    def softcap_step(self, tanh: fx.Node) -> Any:
        """``c * tanh(x / c)``: the ``* c`` met already (the only scale so far) becomes part of it; returns ``x / c``."""
        cap = soft_cap(tanh, self.consts)
        scales = [s for s in self.steps if s.role == SCALE]
        if cap is None or self.softcap is not None or len(scales) != 1 or not math.isclose(self.scale, cap):
            raise _unary_decline(tanh, self.consts)
        inner = tanh.args[0]
        if not leads_to_product(inner.args[0], self.consts) or len(value_users(inner)) != 1:
            raise _unary_decline(tanh, self.consts)
        after_cap = self.steps[self.steps.index(scales[0]) + 1:]  # between tanh and its `* c`, walking back
        if any(step.role in (ADDITIVE, FILL) for step in after_cap):
            raise Decline(f"{after_cap[0].node.name}: a bias or mask between the tanh and its cap")
        scales[0].role = SOFTCAP
        self.steps.append(ScoreStep(tanh, SOFTCAP))
        self.softcap, self.scale, self.outer, self.cap_inner = cap, 1.0, 1.0, inner
        return inner  # the ``/ c``: the next step, recorded as part of the soft-cap

    def additive_step(self, cur: fx.Node) -> Any:
        t, (a, b) = cur.target, cur.args[:2]
        if self.softcap is not None:
            raise Decline(f"{cur.name} adds to the scores inside the tanh soft-cap")
        alpha = float(cur.kwargs.get("alpha", 1))
        a_scores, b_scores = leads_to_product(a, self.consts), leads_to_product(b, self.consts)
        if a_scores and b_scores:
            raise Decline(f"{cur.name} adds two score matrices")
        data, other = (a, b) if a_scores else (b, a)
        if t in INPLACE_ADD_OPS and data is not a:
            raise Decline(f"{cur.name} adds the scores into {getattr(a, 'name', a)} in place")
        sub = t in (aten.sub.Tensor, aten.sub_.Tensor)
        if data is b and (alpha != 1 or sub):
            raise Decline(f"{cur.name} scales the scores by {'-' if sub else ''}{alpha}")
        coef = self.outer * (alpha if other is b else 1.0) * (-1.0 if sub else 1.0)
        if not isinstance(other, fx.Node):
            raise Decline(f"{cur.name} adds a number to the scores")  # softmax-invariant, but unusual
        self.terms.append(MaskTerm(other, "additive", static_shape(cur), coefficient=coef, applied_by=cur,
                                   written=other, learned=self.consts.learned(other)))
        return data

    def fill_step(self, cur: fx.Node) -> Any:
        if self.softcap is not None:
            raise Decline(f"{cur.name} masks the scores inside the tanh soft-cap")
        if cur.target in MASKED_FILL_OPS:
            data, cond, fill_arg, fill_where = cur.args[0], cur.args[1], cur.args[2], True
        else:
            cond, a, b = cur.args[0], cur.args[1], cur.args[2]
            a_scores = leads_to_product(a, self.consts)
            # where(c, scores, v): v where c is False; where(c, v, scores): v where c is True
            data, fill_arg, fill_where = (a, b, False) if a_scores else (b, a, True)
        fill = self.consts.scalar(fill_arg)
        if fill is None:
            what = "fills the scores with a non-constant value" if cur.target in MASKED_FILL_OPS else \
                "selects between the scores and a tensor that is not a constant"
            raise Decline(f"{cur.name} {what}")
        if dtype_of(cond) != torch.bool:
            name = getattr(cond, "name", cond)
            raise Decline(f"mask {name} is not boolean" if cur.target in MASKED_FILL_OPS
                          else f"{cur.name}'s condition is not boolean")
        self.terms.append(unnegated(MaskTerm(cond, "fill", static_shape(cur), fill=fill * self.outer,
                                             fill_where=fill_where, applied_by=cur, written=cond)))
        return data

    def step(self, cur: fx.Node) -> Any:
        """Record ``cur`` (a node between the product and the softmax); return the node before it."""
        t = cur.target
        if cur is self.cap_inner:
            self.steps.append(ScoreStep(cur, SOFTCAP))
            return cur.args[0]
        if is_active_dropout(cur):
            raise Decline("dropout on the scores is active (training mode)")
        if is_identity(cur) or is_leading_reshape(cur):
            self.steps.append(ScoreStep(cur, PASS if is_identity(cur) else RESHAPE))
            return cur.args[0]
        if t == aten.tanh.default:
            return self.softcap_step(cur)
        if t in UNARY_SCORE_OPS:
            raise _unary_decline(cur, self.consts)
        roles = ((SCALE_OPS, SCALE, self.scale_step), (ADD_OPS, ADDITIVE, self.additive_step),
                 (MASKED_FILL_OPS | WHERE_OPS, FILL, self.fill_step))
        for ops, role, handle in roles:
            if t in ops:
                self.steps.append(ScoreStep(cur, role))
                return handle(cur)
        raise Decline(f"{ir.op_name(cur)} ({cur.name}) between Q @ K^T and the softmax is not a scale or a mask")


def walk_scores(softmax: fx.Node, consts: Constants) -> Scores:
    """Walk back from the softmax input to Q @ K^T, collecting steps, scale and mask terms."""
    walk = _ScoreWalk(consts)
    cur, prev = softmax.args[0], softmax
    while True:
        if not isinstance(cur, fx.Node) or cur.op != "call_function":
            raise Decline("the softmax input is not computed from a product of two activations (no Q @ K^T)")
        others = [u for u in value_users(cur) if u is not prev]
        if others:
            raise Decline(f"the scores {cur.name} are also used by {others[0].name}: they must be materialised")
        if _product_of_activations(cur, consts):
            return walk.product(cur)
        if cur.target in PRODUCT_OPS or cur.target in (aten.linear.default, aten.addmm.default):
            raise Decline(f"the scores come from {ir.op_name(cur)} with a constant operand "
                          "(a learned projection, not Q @ K^T)")
        prev, cur = cur, walk.step(cur)


def walk_weights(softmax: fx.Node) -> Weights:
    """Walk forward from the softmax to the product with V (or to the op that is not one)."""
    cur, chain = softmax, []
    while True:
        found = value_users(cur)
        if len(found) != 1:
            names = ", ".join(u.name for u in found[:3]) or "nothing"
            raise Decline(f"the attention probabilities are used elsewhere: {cur.name} is used by {len(found)} "
                          f"nodes ({names}), e.g. returned with output_attentions: they must be materialised")
        u = found[0]
        if is_active_dropout(u):
            raise Decline("dropout on the attention weights is active (training mode)")
        if u.op == "call_function" and u.target in MATMUL_OPS and u.args[0] is cur:
            return Weights(u, u, chain)
        if u.op == "call_function" and u.target == aten.einsum.default and len(u.args[1]) == 2 \
                and u.args[1][0] is cur:
            return Weights(u, u, chain)
        if is_identity(u) or is_leading_reshape(u):
            chain.append(u)
            cur = u
            continue
        return Weights(u, None, chain)
