"""Fuse hand-written attention into ``scaled_dot_product_attention``.

Rewrites (each site found by :func:`graphopt.passes.analysis.sites.find_attention_sites`):
    softmax(scale * (q @ k^T) + mask) @ v            -> sdpa(q, k, v, attn_mask=mask, scale=scale)
    ... with a constant causal mask (tril buffer, HF mask construction)
                                                      -> sdpa(q, k, v, is_causal=True, scale=scale)
    ... with a mask computed from dynamic sizes and proved exactly kv <= q
        (attention_causal: arange positions, index, le, and-ed terms true for every length)
                                                      -> sdpa(q, k, v, is_causal=True, scale=scale)
    sdpa(q, k, v, attn_mask=m), m proved kv <= q the same way (transformers' sdpa path)
                                                      -> sdpa(q, k, v, is_causal=True)
    ... with masked_fill(m, -inf) / where(keep, s, -inf)
                                                      -> sdpa(q, k, v, attn_mask=~m / keep)
    ... with a finite fill value (finfo.min, -1e9)    -> sdpa(q, k, v, attn_mask=where(m, fill, 0))
    bmm on (batch*heads, T, d) views of (batch, heads, T, d)
                                                      -> sdpa on the 4-d tensors, output viewed back
    baddbmm(bias, q, k^T, beta, alpha)                -> sdpa(..., attn_mask=beta * bias, scale=alpha * ...)
    softmax(scale * (q @ k^T) + bias + mask) @ v, bias learned or computed (T5's and MPNet's
        relative-position buckets, DeBERTa's c2p/p2c terms; ``scores += bias`` in place too)
                                                      -> sdpa(q, k, v, attn_mask=bias + mask, scale=scale)
        (a bias expanded over the batch is passed unexpanded; sdpa broadcasts it; constant
        terms that add nothing, such as a folded all-ones padding mask, are left out)
    einsum('bhqd,bhkd->bhqk') ... einsum('bhqk,bhkd->bhqd')
                                                      -> sdpa on permuted operands, output permuted back
    softmax in float32 then cast back, eval-mode dropout -> dropped (sdpa computes softmax in float32)
    q * c or k * c before the product                 -> c moved into scale
    repeat_kv(k), repeat_kv(v) (GQA)                  -> sdpa(q, k, v, enable_gqa=True) where that is
                                                         fast (CPU; CUDA without an explicit mask),
                                                         else the repeated k, v are kept
merges the identical mask nodes the sites built (layers sharing a bias share one mask),
then removes what became dead (the score matrix, the softmax, the mask when it
is replaced by ``is_causal``, and the dtype asserts that only checked them).

Declines (listed in the report with the reason, each naming the construct;
the table is in docs/attention.md): softmax over another dim than the keys;
attention weights used elsewhere (``output_attentions``); scores multiplied
by a tensor; a tanh soft-cap (Gemma 2: "tanh soft-cap (cap 50.0): SDPA cannot
apply it"); a learned bias while the blocked pass runs ("left for blocked
attention": it recomputes the bias per query block); active dropout;
products with a constant operand (a learned projection, not Q @ K^T); mixed
dtypes; broadcast batch shapes. A mask with a ``kv <= q`` term that is not
provably causal (it reads an input's values such as a padding mask, or a
sliding window shorter than the seq range) keeps the explicit mask and is
reported as ``is_causal: <reason>; the explicit mask is kept``. A site whose
rewrite fails the numeric check is rolled back and declined with the figures.

Verification (option ``attention_verify``): ``"auto"`` (default) fuses every
site and checks the numerics once; when that check fails it undoes them and
goes site by site (fuse one, check, roll back that one if it fails), so a bad
site is rolled back alone while the common case costs one check, not one per
layer. ``"site"`` always goes site by site; ``"pass"`` leaves the check to the
pass manager (all or nothing).

Option ``attention_gqa``: ``"auto"`` (default), ``"enable_gqa"`` or ``"expand"``.
Option ``attention_fusion``: ``"on"`` (default) or ``"off"``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx as fx

from graphopt import ir
from graphopt.opsets import METADATA_ASSERTS, is_dead_private_write, is_inactive_dropout
from graphopt.pass_infra import OptimizeContext, Option, Pass, PassResult
from graphopt.passes.analysis.sites import AttentionSite, find_attention_sites
from graphopt.passes.analysis.sites.attention_causal import causal_reason, keep_mask_of
from graphopt.passes.analysis.sites.attention_masks import MaskTerm, broadcastable
from graphopt.passes.analysis.sites.attention_ops import ADD_OPS, arg, dtype_of
from graphopt.passes.blocked import blocked_takes_attention
from graphopt.passes.cleanup.cse import argument_key
from graphopt.report import Declined

log = logging.getLogger(__name__)
aten = torch.ops.aten

SDPA = aten.scaled_dot_product_attention.default
#: the decline of a learned bias when the blocked pass runs and may block attention (it recomputes the bias per block)
LEFT_FOR_BLOCKED = ("scores biased by a learned tensor: left for blocked attention (the blocked pass runs: "
                    "a memory budget or block sizes are set)")
_ASSERTS = METADATA_ASSERTS
_BROADCAST_COPIES = frozenset({aten.expand.default, aten.contiguous.default, aten.clone.default})


def sdpa_supports_enable_gqa() -> bool:
    """True when the installed torch's scaled_dot_product_attention takes ``enable_gqa``."""
    return any(a.name == "enable_gqa" for a in SDPA._schema.arguments)


def sdpa_decline(site: AttentionSite, leave_learned: bool = False) -> str | None:
    """Why ``scaled_dot_product_attention`` cannot express ``site`` (None: it can).

    Besides what no consumer takes (``site.declined``), it leaves non-floating
    additive terms and sites whose operands have no standard layout. A learned
    or computed bias (T5's and MPNet's relative-position bias) is one more
    additive term of the float ``attn_mask``; with ``leave_learned`` (the
    blocked pass will run and may take attention: it recomputes such a bias per
    query block instead of holding it whole) a learned bias is left to it. The
    reasons are checked in the order the walk meets them: the scores, their
    terms, the weights.
    """
    if site.declined is not None and site.declined != site.weights_declined:
        return site.declined  # the walk back through the scores
    if site.soft_cap is not None:
        return f"tanh soft-cap (cap {site.soft_cap}): SDPA cannot apply it"
    for term in site.mask_terms:
        if term.kind != "additive" or term.applied_by.target not in ADD_OPS:
            continue
        if not (dtype_of(term.node) or torch.float32).is_floating_point:
            return f"{term.applied_by.name} adds a non-floating tensor to the scores"
        if term.learned and leave_learned:
            return LEFT_FOR_BLOCKED
    return site.weights_declined or site.layout_declined


def _use_enable_gqa(site: AttentionSite, ctx: OptimizeContext) -> bool:
    if not site.gqa or not sdpa_supports_enable_gqa():
        return False
    mode = FuseAttention().option(ctx, "attention_gqa")
    if mode == "enable_gqa":
        return True
    if mode == "expand":
        return False
    # CPU: the flash kernel takes grouped heads, with or without a mask (measured faster than the
    # repeated k/v). CUDA: the flash kernel takes them but no explicit mask; with a mask sdpa would
    # fall back to the math kernel, slower than keeping the repeated k/v. Other devices: keep them.
    has_mask = not site.is_causal and site.mask_kind not in (None, "none")
    return ctx.device.type == "cpu" or (ctx.device.type == "cuda" and not has_mask)


class _Builder:
    """Inserts nodes before ``anchor``, copying its provenance meta, and remembers them."""

    def __init__(self, gm: fx.GraphModule, anchor: fx.Node, meta_from: fx.Node) -> None:
        self.graph, self.anchor, self.meta_from = gm.graph, anchor, meta_from
        self.created: list[fx.Node] = []

    def __call__(self, target: Any, *args: Any, **kwargs: Any) -> fx.Node:
        with self.graph.inserting_before(self.anchor):
            node = self.graph.call_function(target, args, kwargs)
        for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
            if key in self.meta_from.meta:
                node.meta[key] = self.meta_from.meta[key]
        val = _fake_value(node)
        if val is not None:
            node.meta["val"] = val
        self.created.append(node)
        return node


def _fake_value(node: fx.Node) -> Any:
    """``meta["val"]`` of a new node, computed from its inputs' fake tensors (None if unknown)."""
    inputs = node.all_input_nodes
    if any(not isinstance(i.meta.get("val"), torch.Tensor) for i in inputs):
        return None
    args = fx.node.map_arg(node.args, lambda n: n.meta["val"])
    kwargs = fx.node.map_arg(node.kwargs, lambda n: n.meta["val"])
    try:
        return node.target(*args, **kwargs)
    except Exception as exc:  # refreshed for the whole graph after the pass anyway
        log.debug("no fake value for %s: %s", node.name, exc)
        return None


def _to_score_shape(b: _Builder, node: fx.Node, applied_shape: tuple[int, ...],
                    score_shape: tuple[int, ...]) -> fx.Node:
    """A mask applied to scores of ``applied_shape``, brought to the fused op's score shape."""
    if tuple(applied_shape) == tuple(score_shape):
        return node
    return b(aten.reshape.default, b(aten.expand.default, node, list(applied_shape)), list(score_shape))


def _unexpanded(node: fx.Node, applied_shape: tuple[int, ...]) -> fx.Node:
    """``node`` before the ``expand`` / ``contiguous`` copies that only broadcast it to ``applied_shape``.

    T5 and MPNet expand a (1, heads, T, S) bias over the batch and copy it; the
    fused op broadcasts its ``attn_mask`` itself, so a bias shared by the batch
    stays one (1, heads, T, S) tensor.
    """
    while node.op == "call_function" and node.target in _BROADCAST_COPIES and isinstance(node.args[0], fx.Node):
        src = ir.shape_of(node.args[0])
        if src is None or not broadcastable(tuple(src), tuple(applied_shape)):
            break
        node = node.args[0]
    return node


def _build_mask(b: _Builder, site: AttentionSite, dtype: torch.dtype) -> fx.Node | None:
    """One ``attn_mask`` from the site's mask terms (bool when every term masks with -inf)."""
    if site.is_causal or site.mask_kind in (None, "none"):
        return None
    terms = site.mask_terms
    shape = site.score_shape
    if all(t.kind == "fill" and t.fill == float("-inf") for t in terms):
        keep = None
        for t in terms:
            m = t.node if not t.fill_where else b(aten.logical_not.default, t.node)
            m = _to_score_shape(b, m, t.shape, shape)
            keep = m if keep is None else b(aten.logical_and.default, keep, m)
        return keep
    bias, bias_dtype = None, None
    for t in [t for t in terms if not t.zero] or terms[:1]:
        if t.kind == "additive":
            part, part_dtype = _unexpanded(t.node, t.shape), ir.tensor_meta(t.node).dtype
            if t.coefficient != 1.0:
                part = b(aten.mul.Tensor, part, t.coefficient)
        else:
            part_dtype = torch.get_default_dtype()
            fill = max(t.fill, torch.finfo(dtype).min) if t.fill != float("-inf") else t.fill
            part = b(aten.where.Scalar, t.node if t.fill_where else b(aten.logical_not.default, t.node),
                     fill, 0.0)
        part = _to_score_shape(b, part, t.shape, shape)
        bias = part if bias is None else b(aten.add.Tensor, bias, part)
        bias_dtype = part_dtype if bias_dtype is None else torch.promote_types(bias_dtype, part_dtype)
    if bias_dtype != dtype:
        bias = b(aten._to_copy.default, bias, dtype=dtype)
    return bias


def rewrite_site(gm: fx.GraphModule, site: AttentionSite, use_gqa: bool,
                 replaced: dict[fx.Node, fx.Node] | None = None) -> tuple[fx.Node, list[fx.Node]]:
    """Insert ``scaled_dot_product_attention`` for ``site`` and route the output's users to it.

    The old nodes stay in the graph (dead) so the rewrite can be undone with
    :func:`undo_rewrite`. ``replaced`` maps outputs of sites rewritten before
    to their new nodes (a site may read another one's output); it is updated.
    Returns (the node replacing ``site.output``, the nodes created).
    """
    replaced = replaced if replaced is not None else {}
    if replaced:
        site = _remapped(site, replaced)
    pv = site.output
    b = _Builder(gm, pv, site.softmax)
    q = site.q if site.q_perm is None else b(aten.permute.default, site.q, list(site.q_perm))
    k_src = site.k if (use_gqa or not site.gqa) else site.k_expanded
    v_src = site.v if (use_gqa or not site.gqa) else site.v_expanded
    k = k_src if site.k_perm is None else b(aten.permute.default, k_src, list(site.k_perm))
    if site.k_transposed:
        k = b(aten.transpose.int, k, -2, -1)
    v = v_src if site.v_perm is None else b(aten.permute.default, v_src, list(site.v_perm))
    dtype = ir.tensor_meta(site.q).dtype
    mask = _build_mask(b, site, dtype)
    kwargs: dict[str, Any] = {"scale": float(site.scale)}
    if use_gqa:
        kwargs["enable_gqa"] = True
    out = b(SDPA, q, k, v, mask, 0.0, bool(site.is_causal), **kwargs)
    if site.out_perm is not None:
        out = b(aten.permute.default, out, list(site.out_perm))
    pv_shape = ir.shape_of(pv)
    if site.form != "einsum" and pv_shape is not None and tuple(site.score_shape[:-1]) + (pv_shape[-1],) != pv_shape:
        out = b(aten.reshape.default, out, list(pv_shape))
    pv.replace_all_uses_with(out)
    replaced[pv] = out
    return out, b.created


def _remapped(site: AttentionSite, replaced: dict[fx.Node, fx.Node]) -> AttentionSite:
    """A copy of ``site`` reading the new outputs of sites rewritten before it."""
    get = lambda n: replaced.get(n, n)  # noqa: E731
    return dataclasses.replace(
        site, q=get(site.q), k=get(site.k), v=get(site.v), k_expanded=get(site.k_expanded),
        v_expanded=get(site.v_expanded),
        mask_terms=[dataclasses.replace(t, node=get(t.node)) for t in site.mask_terms])


def undo_rewrite(gm: fx.GraphModule, site: AttentionSite, out: fx.Node, created: list[fx.Node],
                 replaced: dict[fx.Node, fx.Node] | None = None) -> None:
    """Route the users back to the original output and erase the inserted nodes."""
    out.replace_all_uses_with(site.output)
    for node in reversed(created):
        gm.graph.erase_node(node)
    if replaced is not None:
        replaced.pop(site.output, None)


def share_masks(gm: fx.GraphModule, created: list[fx.Node]) -> int:
    """Merge the identical mask nodes the rewrites built site by site; returns how many went.

    Each site builds its ``attn_mask`` from its own terms; layers that read the
    same bias and mask (T5's decoder) build the same sum. The cleanup's CSE
    would merge the copies, but constant folding runs before it and folds each
    into its own (batch, heads, T, S) constant. The nodes are pure ATen ops the
    rewrite inserted, so the first of each kind stands for the others.
    """
    mine = set(created)
    seen: dict[Any, fx.Node] = {}
    merged = 0
    for node in list(gm.graph.nodes):
        if node not in mine or node.target == SDPA:
            continue
        key = (node.target, argument_key(node.args), argument_key(node.kwargs))
        first = seen.setdefault(key, node)
        if first is not node:
            node.replace_all_uses_with(first)
            gm.graph.erase_node(node)
            merged += 1
    return merged


def erase_unused(gm: fx.GraphModule, start: Iterable[fx.Node]) -> int:
    """Erase nodes (from ``start`` upwards) used by nothing but dtype asserts; returns how many.

    ``Graph.eliminate_dead_code`` keeps a value alive while an
    ``_assert_tensor_metadata`` checks it; once the value is dead the assert
    checks nothing anyone uses.
    """
    erased: set[fx.Node] = set()
    work = list(start)
    while work:
        n = work.pop()
        if n in erased or n.op not in ("call_function", "get_attr") or n.target in _ASSERTS:
            continue
        if n.op == "call_function" and n.is_impure() and not is_inactive_dropout(n) \
                and not is_dead_private_write(n):
            continue
        users = list(n.users)
        if any(u.op != "call_function" or u.target not in _ASSERTS for u in users):
            continue
        inputs = n.all_input_nodes
        for u in users:
            gm.graph.erase_node(u)
            erased.add(u)
        gm.graph.erase_node(n)
        erased.add(n)
        work.extend(inputs)
    return sum(1 for n in erased if n.target not in _ASSERTS)


def causal_sdpa(gm: fx.GraphModule) -> tuple[list[fx.Node], list[Declined]]:
    """``sdpa(q, k, v, attn_mask=m)`` with ``m`` proved to be ``kv <= q`` -> ``sdpa(q, k, v, is_causal=True)``.

    The mask a transformers model builds for its own ``scaled_dot_product_attention``
    call from the (dynamic) sizes (:mod:`graphopt.passes.analysis.sites.attention_causal`).
    Returns the rewritten nodes and, for masks with a ``kv <= q`` term that are not
    exactly causal, the reason (the explicit mask is kept).
    """
    done: list[fx.Node] = []
    declined: list[Declined] = []
    for n in list(gm.graph.nodes):
        mask = arg(n, 3, "attn_mask") if n.op == "call_function" and n.target == SDPA else None
        if not isinstance(mask, fx.Node) or arg(n, 5, "is_causal", False) or arg(n, 4, "dropout_p", 0.0):
            continue
        q = ir.tensor_meta(n.args[0])
        keep = mask if dtype_of(mask) == torch.bool else keep_mask_of(MaskTerm(mask, "additive", ()))[0]
        if q is None or keep is None:
            continue
        reason, has_causal_term = causal_reason(keep, q.shape[-2])
        if reason is not None:
            if has_causal_term:
                where = n.name + (f" ({ir.module_path(n)})" if ir.module_path(n) else "")
                declined.append(Declined(where, f"is_causal: {reason}; the explicit mask is kept"))
            continue
        kwargs = {k: v for k, v in n.kwargs.items() if k not in ("attn_mask", "dropout_p", "is_causal")}
        n.args, n.kwargs = (*n.args[:3], None, 0.0, True, *n.args[6:]), kwargs
        done.append(n)
        erase_unused(gm, [mask])
    return done, declined


def _site_name(site: AttentionSite) -> str:
    return site.softmax.name + (f" ({site.module})" if site.module else "")


class FuseAttention(Pass):
    name = "fuse_attention"
    summary = "rewrite hand-written attention (softmax(Q K^T) V) into scaled_dot_product_attention"
    options = {
        "attention_fusion": Option("'on' (default) or 'off' (keep the attention as written)",
                                   str, "on", ("on", "off")),
        "attention_gqa": Option("grouped-query attention: 'auto' (enable_gqa on CPU, and on CUDA without a mask; "
                                "else keep the repeated k/v), 'enable_gqa' or 'expand'",
                                str, "auto", ("auto", "enable_gqa", "expand")),
        "attention_verify": Option("'auto' (check all fused sites at once; when that fails, site by site), "
                                   "'site' (check after every site) or 'pass' (only the pass manager's check)",
                                   str, "auto", ("auto", "site", "pass")),
    }

    def call(self, gm: fx.GraphModule, ctx: OptimizeContext) -> PassResult:
        switch = self.option(ctx, "attention_fusion")
        if switch == "off":
            return PassResult(gm, False, ["switched off (attention_fusion='off')"])
        made_causal, declined = causal_sdpa(gm)
        sites = find_attention_sites(gm)
        mode = self.option(ctx, "attention_verify")
        leave = blocked_takes_attention(ctx)
        reasons = {s.softmax: sdpa_decline(s, leave) for s in sites}
        declined += [Declined(_site_name(s), reasons[s.softmax]) for s in sites if reasons[s.softmax]]
        declined += [Declined(_site_name(s), f"is_causal: {s.causal_declined}; the explicit mask is kept")
                     for s in sites if not reasons[s.softmax] and s.causal_declined]
        candidates = [s for s in sites if not reasons[s.softmax]]
        fused: list[tuple[AttentionSite, fx.Node, list[fx.Node]]] = []
        replaced: dict[fx.Node, fx.Node] = {}
        checked = None  # the last passing check of the graph as it stands (dead-code removal keeps it valid)
        if mode in ("auto", "pass") or ctx.verifier is None:
            fused = [(s, *rewrite_site(gm, s, _use_enable_gqa(s, ctx), replaced)) for s in candidates]
            if mode == "auto" and fused:
                ok, checked = self._numerics_ok(gm, ctx)
            if mode == "auto" and fused and not ok:
                checked = None
                log.info("fused attention fails the numeric check; checking site by site")
                for site, out, created in reversed(fused):
                    undo_rewrite(gm, site, out, created, replaced)
                fused, mode = [], "site"
        if mode == "site" and ctx.verifier is not None:
            for site in candidates:
                out, created = rewrite_site(gm, site, _use_enable_gqa(site, ctx), replaced)
                ok, numerics = self._numerics_ok(gm, ctx)
                if not ok:
                    undo_rewrite(gm, site, out, created, replaced)
                    declined.append(Declined(_site_name(site), f"rolled back: the fused site fails the numeric "
                                             f"check ({numerics.reason}; {numerics.summary()})"))
                    log.warning("attention site %s rolled back: %s", site.softmax.name, numerics.reason)
                    continue
                checked = numerics
                fused.append((site, out, created))
        if not fused:
            return self._causal_only(gm, made_causal, declined)
        shared = share_masks(gm, [n for _, _, created in fused for n in created])
        start = [n for site, _, _ in fused for n in site.nodes + [t.node for t in site.mask_terms]]
        removed = erase_unused(gm, start)
        gm.graph.eliminate_dead_code()
        n_causal = sum(1 for s, _, _ in fused if s.is_causal)
        n_mask = sum(1 for s, _, _ in fused if not s.is_causal and s.mask_kind not in (None, "none"))
        n_gqa = sum(1 for s, _, _ in fused if s.gqa)
        notes = [f"fused {len(fused)} attention sites into scaled_dot_product_attention "
                 f"({n_causal} causal, {n_mask} with an explicit mask, {n_gqa} grouped-query)"
                 + (f"; {shared} mask nodes shared between sites" if shared else ""),
                 f"removed {removed} nodes of the unfused attention"]
        notes += [f"{s.describe()}" for s, _, _ in fused[:64]]
        notes += [f"{len(made_causal)} scaled_dot_product_attention calls: proved-causal mask -> is_causal=True"
                  ] if made_causal else []
        involved = [out.name for _, out, _ in fused] + [n.name for n in made_causal]
        return PassResult(gm, True, notes, declined, involved, numerics=checked)

    @staticmethod
    def _causal_only(gm: fx.GraphModule, made_causal: list[fx.Node], declined: list[Declined]) -> PassResult:
        """The result when no site was fused: the sdpa calls made causal, if any."""
        if not made_causal:
            return PassResult(gm, False, declined=declined)
        gm.graph.eliminate_dead_code()
        notes = [f"{len(made_causal)} scaled_dot_product_attention calls: proved-causal mask -> is_causal=True"]
        return PassResult(gm, True, notes, declined, [n.name for n in made_causal])

    @staticmethod
    def _numerics_ok(gm: fx.GraphModule, ctx: OptimizeContext) -> tuple[bool, Any]:
        gm.recompile()
        numerics = ctx.check_numerics(gm)
        return (numerics is None or numerics.ok), numerics


__all__ = ["LEFT_FOR_BLOCKED", "FuseAttention", "erase_unused", "rewrite_site", "sdpa_decline", "sdpa_supports_enable_gqa",
           "share_masks", "undo_rewrite"]
