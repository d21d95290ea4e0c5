"""Bring an attention site's operands to the (batch, heads, seq, head_dim) layout a fused op reads.

The operands are normalised: transposes of K are undone, reshapes that only
flatten batch*heads are looked through, einsum layouts become permutations,
a scalar pre-scale of q or k moves into the scale, and a key/value repeated
for grouped-query attention (``repeat_kv``: ``unsqueeze -> expand ->
reshape``, or ``repeat_interleave`` over the heads) is recognised. A mask that
depends on no input is evaluated once and recognised as causal or as no mask
at all; one computed from the (dynamic) sizes is proved causal or not by
:mod:`.attention_causal`. :func:`normalise_layout` declines (:class:`graphopt.pattern.Decline`)
a site whose operands have no such layout; only consumers that need it (the
``scaled_dot_product_attention`` rewrite) care.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.fx as fx

from graphopt import ir
from graphopt.opsets import RESHAPES
from graphopt.passes.analysis.sites.attention_causal import causal_reason, keep_mask_of
from graphopt.passes.analysis.sites.attention_masks import broadcastable, classify_constant_mask, evaluate_mask
from graphopt.passes.analysis.sites.attention_ops import (
    Constants, arg, dtype_of, is_leading_reshape, static_shape, swaps_last_two,
)
from graphopt.pattern import Decline

if TYPE_CHECKING:  # type hints only: the site module imports this one
    from graphopt.passes.analysis.sites.attention import AttentionSite

aten = torch.ops.aten


def _einsum_labels(equation: str, ndims: list[int]) -> tuple[list[list[str]], list[str]]:
    """Split an einsum equation into per-operand label lists and the output labels.

    ``...`` becomes labels ``#0``, ``#1``, ... aligned from the right.
    """
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    ins = lhs.split(",")
    if len(ins) != len(ndims):
        raise Decline(f"einsum '{equation}' does not have {len(ndims)} operands")
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
            raise Decline(f"einsum '{equation}' does not match its operands' ranks")
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
        if swaps_last_two(n):
            op = _Operand(n.args[0], not op.transposed, op.path + [n])
        elif is_leading_reshape(n) or n.target in (aten.clone.default, aten.contiguous.default):
            op = _Operand(n.args[0], op.transposed, op.path + [n])
        else:
            return op


def _strip_transposes(node: fx.Node, transposed: bool) -> _Operand:
    op = _Operand(node, transposed)
    while swaps_last_two(op.node):
        op = _Operand(op.node.args[0], not op.transposed, op.path + [op.node])
    return op


def _strip_prescale(op: _Operand, consts: Constants) -> tuple[_Operand, float]:
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
        if ir.shape_of(a) != ir.shape_of(n) or dtype_of(a) != dtype_of(n):
            return op, scale
        scale *= c if n.target == aten.mul.Tensor else 1.0 / c
        op = _Operand(a, op.transposed, op.path + [n])


def repeat_kv_source(node: fx.Node) -> tuple[fx.Node, int, list[fx.Node]] | None:
    """If ``node`` is key/value repeated over the heads dim (-3), return (source, repeats, nodes)."""
    shape = ir.shape_of(node)
    if shape is None or len(shape) < 3 or node.op != "call_function":
        return None
    if node.target == aten.repeat_interleave.self_int:
        src, reps = node.args[0], node.args[1]
        dim = arg(node, 2, "dim")
        if isinstance(src, fx.Node) and dim is not None and dim % len(shape) == len(shape) - 3:
            return src, int(reps), [node]
        return None
    path = []
    n = node
    if n.target in RESHAPES:
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


# ---------------------------------------------------------------------------------------------
# the layout steps


_FORMS = {aten.matmul.default: "matmul", aten.bmm.default: "bmm", aten.mm.default: "matmul",
          aten.baddbmm.default: "baddbmm", aten.einsum.default: "einsum"}


def _einsum_operands(site: AttentionSite) -> tuple[_Operand, _Operand, _Operand]:
    """Q, K, V of an einsum site, with the permutations that bring them to (..., seq, dim)."""
    prod, pv = site.scores, site.output
    if prod.target != aten.einsum.default or pv.target != aten.einsum.default:
        raise Decline("Q @ K^T and the product with V mix einsum with matmul")
    if any(n.target in RESHAPES for n in site.score_chain + site.weights_chain):
        raise Decline("einsum attention with reshapes between the products")
    qa, ka = prod.args[1]
    (ql, kl), sl = _einsum_labels(prod.args[0], [len(static_shape(qa)), len(static_shape(ka))])
    contracted = [lb for lb in ql if lb in kl and lb not in sl]
    t_lab = [lb for lb in ql if lb in sl and lb not in kl]
    s_lab = [lb for lb in kl if lb in sl and lb not in ql]
    batch = sl[:-2]
    if len(contracted) != 1 or len(t_lab) != 1 or len(s_lab) != 1 or sl[-2:] != t_lab + s_lab \
            or sorted(ql) != sorted(batch + t_lab + contracted) or sorted(kl) != sorted(batch + s_lab + contracted):
        raise Decline(f"einsum '{prod.args[0]}' is not (..., q, d) x (..., k, d) -> (..., q, k)")
    pa, va = pv.args[1]
    (pl, vl), ol = _einsum_labels(pv.args[0], [len(static_shape(pa)), len(static_shape(va))])
    pv_contracted = [lb for lb in pl if lb in vl and lb not in ol]
    e_lab = [lb for lb in vl if lb in ol and lb not in pl]
    if len(pv_contracted) != 1 or pl[-1] != pv_contracted[0] or len(e_lab) != 1 or len(pl) != len(sl):
        raise Decline(f"einsum '{pv.args[0]}' is not (..., q, k) x (..., k, e) -> (..., q, e)")
    pbatch, pt, ps = pl[:-2], pl[-2], pl[-1]
    if sorted(vl) != sorted(pbatch + [ps] + e_lab) or sorted(ol) != sorted(pbatch + [pt] + e_lab):
        raise Decline(f"einsum '{pv.args[0]}' is not (..., q, k) x (..., k, e) -> (..., q, e)")
    site.q_perm = _perm_or_none([ql.index(lb) for lb in batch + t_lab + contracted])
    site.k_perm = _perm_or_none([kl.index(lb) for lb in batch + s_lab + contracted])
    site.v_perm = _perm_or_none([vl.index(lb) for lb in pbatch + [ps] + e_lab])
    sdpa_out = pbatch + [pt] + e_lab
    site.out_perm = _perm_or_none([sdpa_out.index(lb) for lb in ol])
    return _Operand(qa), _Operand(ka), _Operand(va)


def _matmul_operands(site: AttentionSite) -> tuple[_Operand, _Operand, _Operand]:
    """Q, K, V of a matmul/bmm/baddbmm site, lifted through transposes and batch*heads reshapes."""
    prod, pv = site.scores, site.output
    qa, kta = (prod.args[1], prod.args[2]) if prod.target == aten.baddbmm.default else prod.args[:2]
    va = pv.args[1]
    if pv.args[0] is not (site.weights_chain[-1] if site.weights_chain else site.softmax):
        raise Decline("the attention weights are the second operand of the product with V")
    # lift through transposes and batch*heads reshapes; fall back to the raw operands if inconsistent
    q_op = _lift(qa, False)
    q_lead = (ir.shape_of(q_op.node) or ())[:-2]
    k_op, v_op = _lift(kta, True, q_lead), _lift(va, False, q_lead)
    lifted = [ir.shape_of(o.node) for o in (q_op, k_op, v_op)]
    if any(s is None for s in lifted) or not (len(lifted[0]) == len(lifted[1]) == len(lifted[2])) \
            or lifted[0][:-2] != lifted[2][:-2] or lifted[0][:-3] != lifted[1][:-3] \
            or (len(lifted[0]) >= 3 and lifted[0][-3] != lifted[1][-3]):
        q_op, k_op, v_op = _Operand(qa), _strip_transposes(kta, True), _Operand(va)
    site.k_transposed = k_op.transposed
    return q_op, k_op, v_op


def _grouped_kv(site: AttentionSite, k_op: _Operand, v_op: _Operand,
                consts: Constants) -> tuple[_Operand, _Operand]:
    """GQA: key and value repeated over the heads (repeat_kv); returns the sources."""
    if k_op.transposed or site.k_perm is not None or site.v_perm is not None:
        return k_op, v_op
    kr, vr = repeat_kv_source(k_op.node), repeat_kv_source(v_op.node)
    if kr is None or vr is None or kr[1] != vr[1]:
        return k_op, v_op
    site.k_expanded, site.v_expanded = k_op.node, v_op.node
    k_src, _, k_path = kr
    v_src, _, v_path = vr
    k_op = _Operand(k_src, False, k_op.path + k_path)
    v_op = _Operand(v_src, False, v_op.path + v_path)
    k_op, ks = _strip_prescale(k_op, consts)
    site.scale *= ks
    return k_op, v_op


def _check_shapes(site: AttentionSite) -> None:
    """The shapes the fused op will see: batch dims, head dims and dtypes must agree."""
    q_shape = _permuted(static_shape(site.q), site.q_perm)
    k_shape = _permuted(static_shape(site.k_expanded if site.gqa else site.k), site.k_perm)
    if site.k_transposed:
        k_shape = k_shape[:-2] + (k_shape[-1], k_shape[-2])
    v_shape = _permuted(static_shape(site.v_expanded if site.gqa else site.v), site.v_perm)
    if len(q_shape) < 2 or q_shape[:-2] != k_shape[:-2] or k_shape[:-2] != v_shape[:-2]:
        raise Decline(f"query, key and value batch shapes differ ({q_shape[:-2]}, {k_shape[:-2]}, "
                      f"{v_shape[:-2]}): broadcast attention")
    if q_shape[-1] != k_shape[-1] or k_shape[-2] != v_shape[-2]:
        raise Decline("query/key head dims or key/value lengths differ")
    site.score_shape = q_shape[:-1] + (k_shape[-2],)
    if math.prod(site.score_shape) != math.prod(static_shape(site.softmax)):
        raise Decline("the scores do not have the shape of Q @ K^T")
    dtypes = {dtype_of(site.q), dtype_of(site.k), dtype_of(site.v), dtype_of(site.output)}
    if len(dtypes) != 1:
        raise Decline(f"query, key, value and output dtypes differ ({', '.join(sorted(map(str, dtypes)))})")
    if not next(iter(dtypes)).is_floating_point:
        raise Decline("attention on non-floating tensors")
    if len(q_shape) >= 3:
        site.num_heads = q_shape[-3]
        site.num_kv_heads = _permuted(static_shape(site.k), site.k_perm)[-3]


def _classify_masks(site: AttentionSite, consts: Constants) -> None:
    """``mask_kind``, ``is_causal`` and ``mask`` from the mask terms (a constant mask is evaluated)."""
    for term in site.mask_terms:
        if not broadcastable(static_shape(term.node), term.shape):
            raise Decline(f"mask {term.node.name} does not broadcast to the scores")
    if not site.mask_terms:
        return
    if all(consts.is_constant(t.node) for t in site.mask_terms):
        # a parameter's value is not classified (the graph shares the user's tensors, which may change)
        learned = any(t.learned for t in site.mask_terms)
        bias = None if learned else evaluate_mask(site.mask_terms, site.score_shape, consts)
        site.mask_kind = classify_constant_mask(bias) if bias is not None else "constant"
        _mark_zero_terms(site, consts)
    else:
        site.mask_kind, site.causal_declined = _computed_mask_kind(site)
        _mark_zero_terms(site, consts)
    site.is_causal = site.mask_kind == "causal"
    site.mask = site.mask_terms[0].node  # the one applied last, nearest the softmax


def _mark_zero_terms(site: AttentionSite, consts: Constants) -> None:
    """Beside other terms, mark the constant ones that add nothing (``MaskTerm.zero``): T5's zero
    cross-attention bias beside the padding mask, a folded all-ones padding mask beside MPNet's bias."""
    if len(site.mask_terms) < 2 or site.mask_kind != "input" and not any(t.learned for t in site.mask_terms):
        return
    for term in site.mask_terms:
        if not term.learned and consts.is_constant(term.node):
            part = evaluate_mask([term], site.score_shape, consts)
            term.zero = part is not None and classify_constant_mask(part) == "none"


def _computed_mask_kind(site: AttentionSite) -> tuple[str, str | None]:
    """``("causal", None)`` for one mask term proved ``kv <= q``; else ``("input", why not causal)``.

    The reason is kept only for a mask with a ``kv <= q`` term (a padding mask alone is no decline).
    """
    if len(site.mask_terms) != 1 or site.form == "einsum":
        return "input", None
    keep, _ = keep_mask_of(site.mask_terms[0])
    val = ir.tensor_meta(site.softmax)
    if keep is None or val is None:
        return "input", None
    reason, has_causal_term = causal_reason(keep, val.shape[-2])
    if reason is None:
        return "causal", None
    return "input", (reason if has_causal_term else None)


def _check_dynamic(site: AttentionSite) -> None:
    """The rewrite writes static shapes into reshapes where the layouts differ: not with dynamic shapes."""
    pv = site.output
    reshapes = any(tuple(t.shape) != tuple(site.score_shape) for t in site.mask_terms if site.mask_kind != "causal")
    reshapes |= site.form != "einsum" and site.score_shape[:-1] + (static_shape(pv)[-1],) != static_shape(pv)
    if reshapes and any(_symbolic(n) for n in (site.q, site.k, site.v, pv, site.softmax)):
        raise Decline("batch*heads are flattened and the shapes are dynamic: the rewrite needs static shapes")


def normalise_layout(site: AttentionSite, consts: Constants) -> None:
    """Fill the site's q/k/v, layout, heads and mask fields; declines when no standard layout exists."""
    site.form = _FORMS[site.scores.target]
    if site.form == "einsum" or site.output.target == aten.einsum.default:
        q_op, k_op, v_op = _einsum_operands(site)
        prescale_ok = site.q_perm is None and site.k_perm is None
    else:
        q_op, k_op, v_op = _matmul_operands(site)
        prescale_ok = True
    site.scale = site.score_scale
    if prescale_ok:
        q_op, qs = _strip_prescale(q_op, consts)
        k_op, ks = _strip_prescale(k_op, consts)
        site.scale *= qs * ks
    k_op, v_op = _grouped_kv(site, k_op, v_op, consts)
    site.q, site.k, site.v = q_op.node, k_op.node, v_op.node
    site.nodes = list(dict.fromkeys(q_op.path + k_op.path + v_op.path + site.nodes))
    _check_shapes(site)
    _classify_masks(site, consts)
    _check_dynamic(site)


def _symbolic(node: fx.Node) -> bool:
    val = ir.tensor_meta(node)
    return val is not None and any(not isinstance(d, int) for d in val.shape)


def _permuted(shape: tuple[int, ...], perm: tuple[int, ...] | None) -> tuple[int, ...]:
    return shape if perm is None else tuple(shape[p] for p in perm)
