"""Find attention sites: a search from each softmax over the graph.

A site is ``softmax(scale * (Q @ K^T) + mask) @ V`` in any of the forms people
write. The search is anchored on each softmax (``aten.softmax.int``,
``aten._softmax``, ``aten._safe_softmax``) and walks

* **backwards** from the softmax's input through the score computation:
  casts (softmax in float32), clones, eval-mode dropout, reshapes of the
  leading (batch/head) dims, scalar ``mul``/``div`` (the scale, also as a
  0-dim constant such as ``sqrt(d)``), additive masks (``add``), boolean masks
  (``masked_fill``, ``where``), down to the product of two activations:
  ``matmul``, ``bmm`` (flattened batch*heads), ``baddbmm`` (its ``alpha`` is a
  scale, its ``beta * input`` an additive mask) or a two-operand ``einsum``;
* **forwards** from the softmax through casts (float32 softmax cast back),
  eval-mode dropout and leading-dim reshapes to the matmul with V.

The operands are then normalised: transposes of K are undone, reshapes that
only flatten batch*heads are looked through (so the rewrite works on
(batch, heads, seq, head_dim)), a scalar pre-scale of q or k moves into the
scale, and a key/value repeated for grouped-query attention (``repeat_kv``:
``unsqueeze -> expand -> reshape``, or ``repeat_interleave`` over the heads)
is recognised. A mask that depends on no input is evaluated once (with
:func:`graphopt.ir.evaluate`) and recognised as
causal (so the rewrite can pass ``is_causal=True`` and drop it) or as no mask
at all.

Every softmax appears in the result; ``declined`` says why a candidate cannot
be rewritten ("softmax over dim 1, not the key dim", "scores biased by a
learned tensor: left for blocked attention", ...).

The search is a walk written for this graph shape rather than a set of
``torch.fx.subgraph_rewriter`` patterns (what inductor's ``fuse_attention``
does): the forms multiply (scale x mask x cast x dropout x layout x GQA) and
a pattern list misses the combinations nobody enumerated.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from graphopt import ir
from graphopt.ir import constant_nodes, evaluate

log = logging.getLogger(__name__)
aten = torch.ops.aten


def _overloads(*names: str) -> frozenset:
    """The named aten overloads this torch has (``"_safe_softmax.default"``, ...)."""
    found = []
    for name in names:
        packet, _, overload = name.partition(".")
        op = getattr(getattr(aten, packet, None), overload, None)
        if op is not None:
            found.append(op)
    return frozenset(found)


SOFTMAX_OPS = _overloads("softmax.int", "_softmax.default", "_safe_softmax.default")
_MATMUL_OPS = frozenset({aten.matmul.default, aten.bmm.default, aten.mm.default})
_PRODUCT_OPS = _MATMUL_OPS | {aten.baddbmm.default, aten.einsum.default}
_CAST_OPS = frozenset({aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device,
                       aten.type_as.default})
_IDENTITY_OPS = frozenset({aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default})
_RESHAPE_OPS = frozenset({aten.view.default, aten.reshape.default, aten._unsafe_view.default})
#: dtype/device asserts export inserts: they check a value, they do not use it
ASSERT_OPS = _overloads("_assert_tensor_metadata.default")
_IGNORED_USERS = ASSERT_OPS

#: an additive mask value at or below this is "minus infinity" for a softmax
#: (exp(-1e4) underflows to 0 in every floating dtype)
MASKED_BELOW = -1e4
#: largest mask the analysis evaluates to recognise a causal one
MASK_EVAL_MAX_BYTES = 1 << 30


@dataclass
class MaskTerm:
    """One mask applied to the scores on the way from Q @ K^T to the softmax.

    ``kind``: ``"additive"`` (scores + coefficient * node), ``"fill"``
    (positions where ``node`` is ``fill_where`` are replaced by ``fill``:
    ``masked_fill`` / ``where``). ``shape``: shape of the scores where the term
    was applied (it may differ from the site's score shape when batch*heads
    were flattened).
    """

    node: fx.Node
    kind: str
    shape: tuple[int, ...]
    coefficient: float = 1.0
    fill: float = 0.0
    fill_where: bool = True

    def to_dict(self) -> dict[str, Any]:
        fill = self.fill if math.isfinite(self.fill) else str(self.fill)  # JSON has no infinities
        return {"node": self.node.name, "kind": self.kind, "shape": list(self.shape),
                "coefficient": self.coefficient, "fill": fill, "fill_where": self.fill_where}


@dataclass
class AttentionSite:
    """One attention computation found in the graph.

    ``q``, ``k``, ``v``: the nodes holding query, key and value as
    (batch, heads, seq, head_dim) -- or the closest node before a layout change.
    ``scale``: the softmax scale as a float (None when it is not a constant).
    ``mask``: the node of the additive/boolean mask, or None. ``is_causal``:
    the mask is (or folds to) a causal mask. ``num_heads`` / ``num_kv_heads``:
    GQA grouping. ``nodes``: every node of the site (for rewrites and viewer).
    ``declined``: why the site cannot be rewritten ('' when it can).

    Layout fields the rewrite uses: ``q_perm`` / ``k_perm`` / ``v_perm`` (a
    permutation to apply first, for einsum layouts), ``k_transposed`` (``k``
    holds K^T: (..., head_dim, seq)), ``k_expanded`` / ``v_expanded`` (the
    repeat_kv output, used when ``enable_gqa`` is not), ``mask_terms`` (every
    mask with how it was applied), ``mask_kind`` (``None``, ``"causal"``,
    ``"none"`` when a constant mask masks nothing, ``"constant"`` or
    ``"input"``), ``score_shape`` (scores as the fused op sees them),
    ``out_perm`` (einsum output layout), ``form`` (``matmul``, ``bmm``,
    ``baddbmm``, ``einsum``), ``module`` (the nn.Module path).
    """

    softmax: fx.Node
    q: fx.Node | None = None
    k: fx.Node | None = None
    v: fx.Node | None = None
    output: fx.Node | None = None
    scale: float | None = None
    mask: fx.Node | None = None
    is_causal: bool = False
    num_heads: int | None = None
    num_kv_heads: int | None = None
    nodes: list[fx.Node] = field(default_factory=list)
    declined: str = ""
    # layout and mask details for the rewrite
    form: str = ""
    module: str = ""
    q_perm: tuple[int, ...] | None = None
    k_perm: tuple[int, ...] | None = None
    v_perm: tuple[int, ...] | None = None
    k_transposed: bool = False
    k_expanded: fx.Node | None = None
    v_expanded: fx.Node | None = None
    mask_terms: list[MaskTerm] = field(default_factory=list)
    mask_kind: str | None = None
    score_shape: tuple[int, ...] | None = None
    out_perm: tuple[int, ...] | None = None

    @property
    def ok(self) -> bool:
        """True when the site can be rewritten."""
        return not self.declined

    @property
    def gqa(self) -> bool:
        """Key/value are shared by groups of query heads (repeat_kv found)."""
        return self.k_expanded is not None

    def describe(self) -> str:
        """One line: where the site is and what was recognised."""
        where = f"{self.softmax.name}" + (f" ({self.module})" if self.module else "")
        if self.declined:
            return f"{where}: declined: {self.declined}"
        mask = "causal" if self.is_causal else (self.mask_kind or "no mask")
        heads = f", heads {self.num_heads}" if self.num_heads else ""
        if self.gqa:
            heads += f", kv heads {self.num_kv_heads}"
        scale = f"{self.scale:.6g}" if self.scale is not None else "?"
        return f"{where}: {self.form}, scale {scale}, mask {mask}{heads}"

    def to_dict(self) -> dict:
        name = lambda n: n.name if isinstance(n, fx.Node) else None  # noqa: E731
        return {
            "softmax": self.softmax.name, "q": name(self.q), "k": name(self.k), "v": name(self.v),
            "output": name(self.output), "scale": self.scale, "mask": name(self.mask),
            "is_causal": self.is_causal, "num_heads": self.num_heads, "num_kv_heads": self.num_kv_heads,
            "nodes": [n.name for n in self.nodes], "declined": self.declined,
            "form": self.form, "module": self.module, "mask_kind": self.mask_kind,
            "mask_terms": [t.to_dict() for t in self.mask_terms],
        }


class _Decline(Exception):
    """Raised inside the search with the reason a candidate is not rewritable."""


# ---------------------------------------------------------------------------------------------
# small graph helpers


def _users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if not (u.op == "call_function" and u.target in _IGNORED_USERS)]


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _shape(node: Any) -> tuple[int, ...]:
    s = ir.shape_of(node)
    if s is None:
        raise _Decline(f"{getattr(node, 'name', node)} has no static shape (attention fusion needs static "
                       "shapes: capture without dynamic_shapes)")
    return s


def _dtype(node: Any) -> torch.dtype | None:
    val = ir.tensor_meta(node)
    return val.dtype if val is not None else None


def _is_float_cast(node: fx.Node) -> bool:
    """A cast between floating dtypes on the same device."""
    if node.op != "call_function" or node.target not in _CAST_OPS or not isinstance(node.args[0], fx.Node):
        return False
    a, b = ir.tensor_meta(node.args[0]), ir.tensor_meta(node)
    return (a is not None and b is not None and a.dtype.is_floating_point and b.dtype.is_floating_point
            and a.device == b.device)


def _is_identity(node: fx.Node) -> bool:
    """Ops that pass a value through unchanged (in eval mode)."""
    if node.op != "call_function":
        return False
    if node.target in _IDENTITY_OPS:
        return True
    if node.target == aten.dropout.default:
        return _arg(node, 2, "train", True) is False or _arg(node, 1, "p", 0.0) == 0
    return _is_float_cast(node)


def _is_active_dropout(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in (aten.dropout.default, aten.native_dropout.default)
            and not _is_identity(node))


def _is_leading_reshape(node: fx.Node) -> bool:
    """A reshape that keeps the last two dims (it only splits or merges batch/head dims)."""
    if node.op != "call_function" or node.target not in _RESHAPE_OPS or not isinstance(node.args[0], fx.Node):
        return False
    a, b = ir.shape_of(node.args[0]), ir.shape_of(node)
    return a is not None and b is not None and len(a) >= 2 and len(b) >= 2 and a[-2:] == b[-2:]


def _swaps_last_two(node: fx.Node) -> bool:
    """transpose(x, -2, -1) / t(x) / permute swapping only the last two dims."""
    if node.op != "call_function":
        return False
    shape = ir.shape_of(node)
    if shape is None:
        return False
    n = len(shape)
    if node.target == aten.t.default:
        return n == 2
    if node.target == aten.transpose.int:
        dims = {d % n for d in node.args[1:3]}
        return dims == {n - 2, n - 1}
    if node.target == aten.permute.default:
        perm = [d % n for d in node.args[1]]
        return perm == list(range(n - 2)) + [n - 1, n - 2]
    return False


class _Constants:
    """Which nodes depend on no input, and their values (evaluated at most once)."""

    def __init__(self, gm: fx.GraphModule) -> None:

        self.gm = gm
        self.nodes = constant_nodes(gm)
        self._values: dict[fx.Node, Any] = {}
        self.params = {id(p) for p in gm.parameters()}

    def is_constant(self, node: Any) -> bool:
        return not isinstance(node, fx.Node) or node in self.nodes

    def value(self, node: fx.Node) -> torch.Tensor | None:

        if node not in self._values:
            val = ir.tensor_meta(node)
            if node not in self.nodes or val is None or val.numel() * val.element_size() > MASK_EVAL_MAX_BYTES:
                self._values[node] = None
            else:
                try:
                    self._values[node] = evaluate(self.gm, [node], self.nodes)[node]
                except Exception as exc:  # an op that does not run eagerly on real tensors
                    log.debug("could not evaluate %s: %s", node.name, exc)
                    self._values[node] = None
        return self._values[node]

    def scalar(self, x: Any) -> float | None:
        """A Python number, or a one-element constant tensor's value."""
        if isinstance(x, bool):
            return None
        if isinstance(x, (int, float)):
            return float(x)
        if isinstance(x, fx.Node):
            v = self._one_element(x, 0)
            return float(v.reshape(())) if v is not None else None
        return None

    def _one_element(self, node: fx.Node, depth: int) -> torch.Tensor | None:
        """Value of a one-element node computed from constants only.

        Wider than :func:`constant_nodes`: it runs the in-place ``detach_``
        that ``torch.tensor(d).sqrt()`` exports as (harmless on a fresh copy).
        """
        val = ir.tensor_meta(node)
        if val is None or val.numel() != 1 or depth > 16:
            return None
        if node in self.nodes:
            return self.value(node)
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload) \
                or torch.Tag.nondeterministic_seeded in node.target.tags:
            return None
        env = {}
        for inp in node.all_input_nodes:
            env[inp] = self._one_element(inp, depth + 1)
            if env[inp] is None:
                return None
        args = fx.node.map_arg(node.args, lambda a: env[a].clone())
        kwargs = fx.node.map_arg(node.kwargs, lambda a: env[a].clone())
        try:
            with torch.no_grad():
                out = node.target(*args, **kwargs)
        except Exception:
            return None
        return out if isinstance(out, torch.Tensor) and out.numel() == 1 else None

    def learned(self, node: fx.Node) -> bool:
        """True when ``node`` is computed from an nn.Parameter (not only buffers)."""
        seen, stack = set(), [node]
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if n.op == "get_attr":
                try:
                    if id(ir.get_attr_value(self.gm, n)) in self.params:
                        return True
                except AttributeError:
                    pass
            stack.extend(n.all_input_nodes)
        return False


# ---------------------------------------------------------------------------------------------
# einsum equations


def _einsum_labels(equation: str, ndims: list[int]) -> tuple[list[list[str]], list[str]]:
    """Split an einsum equation into per-operand label lists and the output labels.

    ``...`` becomes labels ``#0``, ``#1``, ... aligned from the right.
    """
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    ins = lhs.split(",")
    if len(ins) != len(ndims):
        raise _Decline(f"einsum '{equation}' does not have {len(ndims)} operands")
    max_ell = 0
    out_ins = []
    for spec, nd in zip(ins, ndims):
        if "..." in spec:
            pre, post = spec.split("...")
            n_ell = nd - len(pre) - len(post)
            max_ell = max(max_ell, n_ell)
            # right-aligned: the last ellipsis dim of every operand is #0
            labels = list(pre) + [f"#{n_ell - 1 - i}" for i in range(n_ell)] + list(post)
        else:
            labels = list(spec)
        if len(labels) != nd:
            raise _Decline(f"einsum '{equation}' does not match its operands' ranks")
        out_ins.append(labels)
    if arrow:
        if "..." in rhs:
            pre, post = rhs.split("...")
            out = list(pre) + [f"#{max_ell - 1 - i}" for i in range(max_ell)] + list(post)
        else:
            out = list(rhs)
    else:
        counts: dict[str, int] = {}
        for labels in out_ins:
            for lb in labels:
                counts[lb] = counts.get(lb, 0) + 1
        out = [f"#{max_ell - 1 - i}" for i in range(max_ell)]
        out += sorted(lb for lb, c in counts.items() if c == 1 and not lb.startswith("#"))
    return out_ins, out


def _perm_or_none(perm: list[int]) -> tuple[int, ...] | None:
    return None if perm == list(range(len(perm))) else tuple(perm)


# ---------------------------------------------------------------------------------------------
# the search


@dataclass
class _Scores:
    """What the backward walk from the softmax found."""

    product: fx.Node
    chain: list[fx.Node]
    scale: float
    terms: list[MaskTerm]


def _product_of_activations(node: fx.Node, consts: _Constants) -> bool:
    if node.op != "call_function" or node.target not in _PRODUCT_OPS:
        return False
    if node.target == aten.einsum.default:
        ops = node.args[1]
        return len(ops) == 2 and not any(consts.is_constant(o) for o in ops)
    a, b = (node.args[1], node.args[2]) if node.target == aten.baddbmm.default else (node.args[0], node.args[1])
    return not consts.is_constant(a) and not consts.is_constant(b)


def _leads_to_product(node: Any, consts: _Constants, depth: int = 0) -> bool:
    """Does ``node`` come from a product of two activations through score-chain ops?"""
    if not isinstance(node, fx.Node) or node.op != "call_function" or depth > 32 or consts.is_constant(node):
        return False
    if _product_of_activations(node, consts):
        return True
    t = node.target
    if _is_identity(node) or _is_leading_reshape(node) or t in (aten.mul.Tensor, aten.div.Tensor,
                                                                 aten.masked_fill.Scalar, aten.masked_fill.Tensor):
        return _leads_to_product(node.args[0], consts, depth + 1)
    if t in (aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor):
        return any(_leads_to_product(a, consts, depth + 1) for a in node.args[:2])
    if t in (aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf):
        return any(_leads_to_product(a, consts, depth + 1) for a in node.args[1:3])
    return False


def _unnegated(term: MaskTerm) -> MaskTerm:
    """masked_fill(s, ~keep, v) -> fill where keep is False (the mask node is ``keep`` itself)."""
    n = term.node
    while isinstance(n, fx.Node) and n.op == "call_function" and \
            n.target in (aten.bitwise_not.default, aten.logical_not.default) and _dtype(n.args[0]) == torch.bool:
        n = n.args[0]
        term = MaskTerm(n, term.kind, term.shape, term.coefficient, term.fill, not term.fill_where)
    return term


def _walk_scores(softmax: fx.Node, consts: _Constants) -> _Scores:
    """Walk back from the softmax input to Q @ K^T, collecting scale and masks."""
    cur = softmax.args[0]
    prev = softmax
    chain: list[fx.Node] = []
    scale, outer = 1.0, 1.0  # outer: product of scales met so far (applies to masks met next)
    terms: list[MaskTerm] = []
    while True:
        if not isinstance(cur, fx.Node) or cur.op != "call_function":
            raise _Decline("the softmax input is not computed from a product of two activations (no Q @ K^T)")
        others = [u for u in _users(cur) if u is not prev]
        if others:
            raise _Decline(f"the scores {cur.name} are also used by {others[0].name}: they must be materialised")
        t = cur.target
        if _product_of_activations(cur, consts):
            if t == aten.baddbmm.default:
                beta = float(cur.kwargs.get("beta", 1))
                alpha = float(cur.kwargs.get("alpha", 1))
                if beta != 0:
                    terms.append(MaskTerm(cur.args[0], "additive", _shape(cur), coefficient=outer * beta))
                scale *= alpha
            return _Scores(cur, chain, scale, terms)
        if t in _PRODUCT_OPS or t in (aten.linear.default, aten.addmm.default):
            raise _Decline(f"the scores come from {ir.op_name(cur)} with a constant operand "
                           "(a learned projection, not Q @ K^T)")
        chain.append(cur)
        if _is_active_dropout(cur):
            raise _Decline("dropout on the scores is active (training mode)")
        if _is_identity(cur) or _is_leading_reshape(cur):
            prev, cur = cur, cur.args[0]
            continue
        if t in (aten.mul.Tensor, aten.div.Tensor):
            a, b = cur.args[0], cur.args[1]
            data, factor = (a, b) if _leads_to_product(a, consts) else (b, a)
            if t == aten.div.Tensor and data is not a:
                raise _Decline(f"{cur.name} divides by the scores")
            c = consts.scalar(factor)
            if c is None:
                raise _Decline(f"the scores are multiplied by a tensor ({getattr(factor, 'name', factor)}), "
                               "not a constant scale")
            if t == aten.div.Tensor:
                if c == 0:
                    raise _Decline(f"{cur.name} divides the scores by zero")
                c = 1.0 / c
            scale *= c
            outer *= c
            prev, cur = cur, data
            continue
        if t in (aten.add.Tensor, aten.sub.Tensor):
            a, b = cur.args[0], cur.args[1]
            alpha = float(cur.kwargs.get("alpha", 1))
            a_scores, b_scores = _leads_to_product(a, consts), _leads_to_product(b, consts)
            if a_scores and b_scores:
                raise _Decline(f"{cur.name} adds two score matrices")
            data, other = (a, b) if a_scores else (b, a)
            if data is b and (alpha != 1 or t == aten.sub.Tensor):
                raise _Decline(f"{cur.name} scales the scores by {'-' if t == aten.sub.Tensor else ''}{alpha}")
            coef = outer * (alpha if other is b else 1.0) * (-1.0 if t == aten.sub.Tensor else 1.0)
            if not isinstance(other, fx.Node):
                raise _Decline(f"{cur.name} adds a number to the scores")  # softmax-invariant, but unusual
            if consts.learned(other):
                raise _Decline("scores biased by a learned tensor: left for blocked attention")
            if not (_dtype(other) or torch.float32).is_floating_point:
                raise _Decline(f"{cur.name} adds a non-floating tensor to the scores")
            terms.append(MaskTerm(other, "additive", _shape(cur), coefficient=coef))
            prev, cur = cur, data
            continue
        if t in (aten.masked_fill.Scalar, aten.masked_fill.Tensor):
            fill = consts.scalar(cur.args[2])
            if fill is None:
                raise _Decline(f"{cur.name} fills the scores with a non-constant value")
            terms.append(_unnegated(MaskTerm(cur.args[1], "fill", _shape(cur), fill=fill * outer, fill_where=True)))
            prev, cur = cur, cur.args[0]
            continue
        if t in (aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf):
            cond, a, b = cur.args[0], cur.args[1], cur.args[2]
            a_scores = _leads_to_product(a, consts)
            data, other = (a, b) if a_scores else (b, a)
            fill = consts.scalar(other)
            if fill is None:
                raise _Decline(f"{cur.name} selects between the scores and a tensor that is not a constant")
            if _dtype(cond) != torch.bool:
                raise _Decline(f"{cur.name}'s condition is not boolean")
            # where(c, scores, v): v where c is False; where(c, v, scores): v where c is True
            terms.append(_unnegated(MaskTerm(cond, "fill", _shape(cur), fill=fill * outer, fill_where=not a_scores)))
            prev, cur = cur, data
            continue
        raise _Decline(f"{ir.op_name(cur)} ({cur.name}) between Q @ K^T and the softmax is not a scale or a mask")


def _walk_weights(softmax: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """Walk forward from the softmax to the matmul with V; returns (product, chain)."""
    cur, chain = softmax, []
    while True:
        users = _users(cur)
        if len(users) != 1:
            names = ", ".join(u.name for u in users[:3]) or "nothing"
            raise _Decline(f"the attention weights {cur.name} are used by {len(users)} nodes ({names}), "
                           "e.g. returned with output_attentions: they must be materialised")
        u = users[0]
        if _is_active_dropout(u):
            raise _Decline("dropout on the attention weights is active (training mode)")
        if u.op == "call_function" and u.target in _MATMUL_OPS and u.args[0] is cur:
            return u, chain
        if u.op == "call_function" and u.target == aten.einsum.default and len(u.args[1]) == 2 \
                and u.args[1][0] is cur:
            return u, chain
        if _is_identity(u) or _is_leading_reshape(u):
            chain.append(u)
            cur = u
            continue
        raise _Decline(f"the attention weights feed {ir.op_name(u)} ({u.name}), not a matmul with V")


@dataclass
class _Operand:
    node: fx.Node
    transposed: bool = False  # node holds the operand with its last two dims swapped
    path: list[fx.Node] = field(default_factory=list)


def _lift(node: fx.Node, transposed: bool, stop_at: tuple[int, ...] | None = None) -> _Operand:
    """Look through transposes of the last two dims and reshapes of the leading dims.

    Stops at a node whose leading dims are ``stop_at`` (the query's), so a key
    repeated for GQA is not looked through.
    """
    op = _Operand(node, transposed)
    while True:
        n = op.node
        if stop_at is not None and op.path and (ir.shape_of(n) or ())[:-2] == stop_at:
            return op
        if n.op != "call_function" or not isinstance(n.args[0] if n.args else None, fx.Node):
            return op
        if _swaps_last_two(n):
            op = _Operand(n.args[0], not op.transposed, op.path + [n])
        elif _is_leading_reshape(n) or n.target in (aten.clone.default, aten.contiguous.default):
            op = _Operand(n.args[0], op.transposed, op.path + [n])
        else:
            return op


def _strip_transposes(node: fx.Node, transposed: bool) -> _Operand:
    op = _Operand(node, transposed)
    while _swaps_last_two(op.node):
        op = _Operand(op.node.args[0], not op.transposed, op.path + [op.node])
    return op


def _strip_prescale(op: _Operand, consts: _Constants) -> tuple[_Operand, float]:
    """q * c (or q / c) with a constant c: return q and c."""
    scale = 1.0
    while True:
        n = op.node
        if n.op != "call_function" or n.target not in (aten.mul.Tensor, aten.div.Tensor):
            return op, scale
        a, b = n.args[0], n.args[1]
        if n.target == aten.mul.Tensor and consts.scalar(a) is not None and isinstance(b, fx.Node):
            a, b = b, a
        c = consts.scalar(b)
        if c is None or not isinstance(a, fx.Node) or consts.is_constant(a) or c == 0:
            return op, scale
        if ir.shape_of(a) != ir.shape_of(n) or _dtype(a) != _dtype(n):
            return op, scale
        scale *= c if n.target == aten.mul.Tensor else 1.0 / c
        op = _Operand(a, op.transposed, op.path + [n])


def _repeat_kv_source(node: fx.Node) -> tuple[fx.Node, int, list[fx.Node]] | None:
    """If ``node`` is key/value repeated over the heads dim (-3), return (source, repeats, nodes)."""
    shape = ir.shape_of(node)
    if shape is None or len(shape) < 3 or node.op != "call_function":
        return None
    if node.target == aten.repeat_interleave.self_int:
        src, reps = node.args[0], node.args[1]
        dim = _arg(node, 2, "dim")
        if isinstance(src, fx.Node) and dim is not None and dim % len(shape) == len(shape) - 3:
            return src, int(reps), [node]
        return None
    path = []
    n = node
    if n.target in _RESHAPE_OPS:
        path.append(n)
        n = n.args[0]
        if isinstance(n, fx.Node) and n.op == "call_function" and n.target in (aten.clone.default,
                                                                               aten.contiguous.default):
            path.append(n)
            n = n.args[0]
        if not (isinstance(n, fx.Node) and n.op == "call_function" and n.target == aten.expand.default):
            return None
        path.append(n)
        exp_shape = ir.shape_of(n)
        u = n.args[0]
        if not (isinstance(u, fx.Node) and u.op == "call_function" and u.target == aten.unsqueeze.default):
            return None
        path.append(u)
        src = u.args[0]
        src_shape = ir.shape_of(src)
        if exp_shape is None or src_shape is None or len(src_shape) != len(shape) or len(exp_shape) != len(shape) + 1:
            return None
        d = len(shape) - 3
        if u.args[1] % (len(shape) + 1) != d + 1:
            return None
        reps = exp_shape[d + 1]
        if exp_shape[: d + 1] + exp_shape[d + 2:] != src_shape or src_shape[d] * reps != shape[d] \
                or src_shape[:d] + src_shape[d + 1:] != shape[:d] + shape[d + 1:]:
            return None
        return src, reps, path
    return None


def _evaluate_mask(terms: list[MaskTerm], score_shape: tuple[int, ...], consts: _Constants) -> torch.Tensor | None:
    """The additive bias all mask terms amount to (float32, broadcast to the score shape), if constant."""
    bias = None
    for term in terms:
        val = consts.value(term.node)
        if val is None:
            return None
        val = val.to("cpu") if val.device.type == "meta" else val
        if term.kind == "additive":
            part = val.float() * term.coefficient
        else:
            hit = val.bool() if term.fill_where else ~val.bool()
            part = torch.where(hit, torch.tensor(term.fill, dtype=torch.float32, device=val.device),
                               torch.tensor(0.0, dtype=torch.float32, device=val.device))
        if tuple(term.shape) != tuple(score_shape):
            part = part.expand(term.shape).reshape(score_shape)
        bias = part if bias is None else bias + part
    return bias


def _classify_constant_mask(bias: torch.Tensor) -> str:
    """'none' (masks nothing), 'causal' (lower-triangular, T == S) or 'constant'."""
    if bool((bias == 0).all()):
        return "none"
    t, s = bias.shape[-2], bias.shape[-1]
    if t == s:
        keep = torch.ones(t, s, dtype=torch.bool, device=bias.device).tril()
        if bool(((bias == 0) | ~keep).all()) and bool(((bias <= MASKED_BELOW) | keep).all()):
            return "causal"
    return "constant"


def _site_for(softmax: fx.Node, gm: fx.GraphModule, consts: _Constants) -> AttentionSite:
    site = AttentionSite(softmax=softmax, module=ir.module_path(softmax))
    in_shape = _shape(softmax.args[0])
    dim = softmax.args[1] if len(softmax.args) > 1 else softmax.kwargs.get("dim")
    if not isinstance(dim, int):
        raise _Decline("softmax dim is not a constant")
    if dim % len(in_shape) != len(in_shape) - 1:
        raise _Decline(f"softmax over dim {dim}, not the key dim")
    if len(in_shape) < 2:
        raise _Decline("softmax over a vector, not a score matrix")
    scores = _walk_scores(softmax, consts)
    pv, fwd_chain = _walk_weights(softmax)
    prod = scores.product
    site.nodes = [prod, *reversed(scores.chain), softmax, *fwd_chain, pv]
    site.output = pv
    scale = scores.scale

    if prod.target == aten.einsum.default or pv.target == aten.einsum.default:
        if prod.target != aten.einsum.default or pv.target != aten.einsum.default:
            raise _Decline("Q @ K^T and the product with V mix einsum with matmul")
        if any(n.target in _RESHAPE_OPS for n in scores.chain + fwd_chain):
            raise _Decline("einsum attention with reshapes between the products")
        site.form = "einsum"
        qa, ka = prod.args[1]
        (ql, kl), sl = _einsum_labels(prod.args[0], [len(_shape(qa)), len(_shape(ka))])
        contracted = [lb for lb in ql if lb in kl and lb not in sl]
        t_lab = [lb for lb in ql if lb in sl and lb not in kl]
        s_lab = [lb for lb in kl if lb in sl and lb not in ql]
        batch = sl[:-2]
        if len(contracted) != 1 or len(t_lab) != 1 or len(s_lab) != 1 or sl[-2:] != t_lab + s_lab \
                or sorted(ql) != sorted(batch + t_lab + contracted) or sorted(kl) != sorted(batch + s_lab + contracted):
            raise _Decline(f"einsum '{prod.args[0]}' is not (..., q, d) x (..., k, d) -> (..., q, k)")
        pa, va = pv.args[1]
        (pl, vl), ol = _einsum_labels(pv.args[0], [len(_shape(pa)), len(_shape(va))])
        pv_contracted = [lb for lb in pl if lb in vl and lb not in ol]
        e_lab = [lb for lb in vl if lb in ol and lb not in pl]
        if len(pv_contracted) != 1 or pl[-1] != pv_contracted[0] or len(e_lab) != 1 or len(pl) != len(sl):
            raise _Decline(f"einsum '{pv.args[0]}' is not (..., q, k) x (..., k, e) -> (..., q, e)")
        pbatch, pt, ps = pl[:-2], pl[-2], pl[-1]
        if sorted(vl) != sorted(pbatch + [ps] + e_lab) or sorted(ol) != sorted(pbatch + [pt] + e_lab):
            raise _Decline(f"einsum '{pv.args[0]}' is not (..., q, k) x (..., k, e) -> (..., q, e)")
        q_op = _Operand(qa)
        k_op = _Operand(ka)
        site.q_perm = _perm_or_none([ql.index(lb) for lb in batch + t_lab + contracted])
        site.k_perm = _perm_or_none([kl.index(lb) for lb in batch + s_lab + contracted])
        site.v_perm = _perm_or_none([vl.index(lb) for lb in pbatch + [ps] + e_lab])
        sdpa_out = pbatch + [pt] + e_lab
        site.out_perm = _perm_or_none([sdpa_out.index(lb) for lb in ol])
        v_op = _Operand(va)
        prescale_ok = site.q_perm is None and site.k_perm is None
    else:
        site.form = {aten.matmul.default: "matmul", aten.bmm.default: "bmm", aten.mm.default: "matmul",
                     aten.baddbmm.default: "baddbmm"}[prod.target]
        qa, kta = (prod.args[1], prod.args[2]) if prod.target == aten.baddbmm.default else prod.args[:2]
        va = pv.args[1]
        if pv.args[0] is not (fwd_chain[-1] if fwd_chain else softmax):
            raise _Decline("the attention weights are the second operand of the product with V")
        # lift through transposes and batch*heads reshapes; fall back to the raw operands if inconsistent
        q_op = _lift(qa, False)
        q_lead = (ir.shape_of(q_op.node) or ())[:-2]
        k_op, v_op = _lift(kta, True, q_lead), _lift(va, False, q_lead)
        lifted = [ir.shape_of(o.node) for o in (q_op, k_op, v_op)]
        if any(s is None for s in lifted) or not (len(lifted[0]) == len(lifted[1]) == len(lifted[2])) \
                or lifted[0][:-2] != lifted[2][:-2] or lifted[0][:-3] != lifted[1][:-3] \
                or (len(lifted[0]) >= 3 and lifted[0][-3] != lifted[1][-3]):
            q_op, k_op, v_op = _Operand(qa), _strip_transposes(kta, True), _Operand(va)
        prescale_ok = True
        if k_op.transposed:
            site.k_transposed = True
    if prescale_ok:
        q_op, qs = _strip_prescale(q_op, consts)
        k_op, ks = _strip_prescale(k_op, consts)
        scale *= qs * ks

    # GQA: key and value repeated over the heads (repeat_kv)
    if not k_op.transposed and site.k_perm is None and site.v_perm is None:
        kr, vr = _repeat_kv_source(k_op.node), _repeat_kv_source(v_op.node)
        if kr is not None and vr is not None and kr[1] == vr[1]:
            site.k_expanded, site.v_expanded = k_op.node, v_op.node
            k_src, _, k_path = kr
            v_src, _, v_path = vr
            k_op = _Operand(k_src, False, k_op.path + k_path)
            v_op = _Operand(v_src, False, v_op.path + v_path)
            k_op, ks = _strip_prescale(k_op, consts)
            scale *= ks

    site.q, site.k, site.v = q_op.node, k_op.node, v_op.node
    site.nodes = list(dict.fromkeys(q_op.path + k_op.path + v_op.path + site.nodes))
    site.scale = scale

    # shapes the fused op will see
    q_shape = _permuted(_shape(site.q), site.q_perm)
    k_shape = _permuted(_shape(site.k_expanded if site.gqa else site.k), site.k_perm)
    if site.k_transposed:
        k_shape = k_shape[:-2] + (k_shape[-1], k_shape[-2])
    v_shape = _permuted(_shape(site.v_expanded if site.gqa else site.v), site.v_perm)
    if len(q_shape) < 2 or q_shape[:-2] != k_shape[:-2] or k_shape[:-2] != v_shape[:-2]:
        raise _Decline(f"query, key and value batch shapes differ ({q_shape[:-2]}, {k_shape[:-2]}, "
                       f"{v_shape[:-2]}): broadcast attention")
    if q_shape[-1] != k_shape[-1] or k_shape[-2] != v_shape[-2]:
        raise _Decline("query/key head dims or key/value lengths differ")
    site.score_shape = q_shape[:-1] + (k_shape[-2],)
    if math.prod(site.score_shape) != math.prod(_shape(softmax)):
        raise _Decline("the scores do not have the shape of Q @ K^T")
    dtypes = {_dtype(site.q), _dtype(site.k), _dtype(site.v), _dtype(pv)}
    if len(dtypes) != 1:
        raise _Decline(f"query, key, value and output dtypes differ ({', '.join(sorted(map(str, dtypes)))})")
    if not next(iter(dtypes)).is_floating_point:
        raise _Decline("attention on non-floating tensors")
    if len(q_shape) >= 3:
        site.num_heads = q_shape[-3]
        site.num_kv_heads = _permuted(_shape(site.k), site.k_perm)[-3]

    # masks
    site.mask_terms = scores.terms
    for term in site.mask_terms:
        if not _broadcastable(_shape(term.node), term.shape):
            raise _Decline(f"mask {term.node.name} does not broadcast to the scores")
        if term.kind == "fill" and _dtype(term.node) != torch.bool:
            raise _Decline(f"mask {term.node.name} is not boolean")
    if site.mask_terms:
        if all(consts.is_constant(t.node) for t in site.mask_terms):
            bias = _evaluate_mask(site.mask_terms, site.score_shape, consts)
            site.mask_kind = _classify_constant_mask(bias) if bias is not None else "constant"
        else:
            site.mask_kind = "input"
        site.is_causal = site.mask_kind == "causal"
        site.mask = site.mask_terms[0].node  # the one applied last, nearest the softmax

    # the rewrite writes static shapes into reshapes where the layouts differ: not with dynamic shapes
    reshapes = any(tuple(t.shape) != tuple(site.score_shape) for t in site.mask_terms if site.mask_kind != "causal")
    reshapes |= site.form != "einsum" and site.score_shape[:-1] + (_shape(pv)[-1],) != _shape(pv)
    if reshapes and any(_symbolic(n) for n in (site.q, site.k, site.v, pv, softmax)):
        raise _Decline("batch*heads are flattened and the shapes are dynamic: the rewrite needs static shapes")
    return site


def _symbolic(node: fx.Node) -> bool:
    val = ir.tensor_meta(node)
    return val is not None and any(not isinstance(d, int) for d in val.shape)


def _permuted(shape: tuple[int, ...], perm: tuple[int, ...] | None) -> tuple[int, ...]:
    return shape if perm is None else tuple(shape[p] for p in perm)


def _broadcastable(shape: tuple[int, ...], to: tuple[int, ...]) -> bool:
    if len(shape) > len(to):
        return False
    return all(a in (1, b) for a, b in zip(reversed(shape), reversed(to)))


def find_attention_sites(gm: fx.GraphModule) -> list[AttentionSite]:
    """Every softmax-anchored attention candidate in ``gm``, rewritable or not.

    Each softmax gives one :class:`AttentionSite`; ``site.declined`` is empty
    for a site the attention rewrite can fuse and says why otherwise.

    >>> import torch, graphopt
    >>> from graphopt import examples_models
    >>> from graphopt.passes.analysis.attention_sites import find_attention_sites
    >>> model, args = examples_models.nanogpt(n_layer=2, seq=16)
    >>> sites = find_attention_sites(graphopt.capture(model, args).module)
    >>> [(s.is_causal, s.num_heads) for s in sites]
    [(True, 4), (True, 4)]
    """
    consts: _Constants | None = None
    sites = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in SOFTMAX_OPS:
            continue
        if consts is None:
            consts = _Constants(gm)
        try:
            site = _site_for(node, gm, consts)
        except _Decline as exc:
            site = AttentionSite(softmax=node, module=ir.module_path(node), declined=str(exc))
        sites.append(site)
        log.debug("attention site %s", site.describe())
    return sites


__all__ = ["ASSERT_OPS", "AttentionSite", "MaskTerm", "SOFTMAX_OPS", "find_attention_sites"]
