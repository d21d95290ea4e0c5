"""Attention sites: one search from each softmax over the graph, for every consumer.

A site is ``softmax(scale * (Q @ K^T) + mask) @ V`` in any of the forms people
write. The search is anchored on each softmax (``aten.softmax.int``,
``aten._softmax``, ``aten._safe_softmax``); it walks back through the scores
and forward through the weights (:mod:`.attention_walk`), then brings the
operands to the (batch, heads, seq, head_dim) layout a fused op reads
(:mod:`.attention_layout`).

Every softmax appears in the result. A site records both views its consumers
read: the operands as written (``scores``, ``q_operand``, ``k_t_operand``,
``v_operand``, ``score_scale``, ``biases``, ``fill_mask``: the blocked-operator
planner) and the normalised ones (``q``, ``k``, ``v``, ``scale``, GQA source,
permutations, ``mask_kind``: ``fuse_attention``, ``analyze``, the viewer).

What no consumer can take is ``declined`` ("softmax over dim 1, not the key
dim", ...). What only some consumers can take is recorded, and each consumer
decides: ``layout_declined`` (the operands have no standard layout),
learned additive terms (``MaskTerm.learned``: fuse_attention adds them into
its float mask, or leaves them to blocked attention, which reads biases as
written, when the blocked pass runs) and non-floating ones (fuse_attention
declines them).

The search is a walk written for this graph shape rather than a set of
``torch.fx.subgraph_rewriter`` patterns (what inductor's ``fuse_attention``
does): the forms multiply (scale x mask x cast x dropout x layout x GQA) and
a pattern list misses the combinations nobody enumerated.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.fx as fx

from graphopt import ir
from graphopt.opsets import SOFTMAX_INCLUDING_SAFE
from graphopt.passes.analysis.sites.attention_layout import normalise_layout
from graphopt.passes.analysis.sites.attention_masks import MaskTerm
from graphopt.passes.analysis.sites.attention_ops import Constants, static_shape
from graphopt.passes.analysis.sites.attention_walk import ADDITIVE, FILL, ScoreStep, walk_scores, walk_weights
from graphopt.pattern import Decline, attempt

log = logging.getLogger(__name__)
aten = torch.ops.aten


@dataclass
class AttentionSite:
    """One attention computation found in the graph (or a softmax that is not one, with the reason).

    As written: ``scores`` (the Q @ K^T product node), ``output`` (the
    product with V), ``score_steps`` (each node between them and the softmax
    with its role, nearest the softmax first), ``weights_chain`` (softmax to
    the product with V), ``score_scale`` (the scale applied to the scores),
    ``mask_terms`` (every mask and bias, with how it was applied).

    Normalised (when ``layout_declined`` is None): ``q``, ``k``, ``v`` hold
    query, key and value as (batch, heads, seq, head_dim) -- or the closest
    node before a layout change; ``scale`` (also the operands' pre-scales);
    ``mask`` (the term nearest the softmax); ``is_causal``; ``num_heads`` /
    ``num_kv_heads``; ``q_perm`` / ``k_perm`` / ``v_perm`` (a permutation to
    apply first, for einsum layouts), ``k_transposed`` (``k`` holds K^T),
    ``k_expanded`` / ``v_expanded`` (the repeat_kv output: GQA),
    ``mask_kind`` (``None``, ``"causal"``, ``"none"`` when a constant mask
    masks nothing, ``"constant"`` or ``"input"``), ``causal_declined`` (why
    a mask computed from the shapes with a ``kv <= q`` term is not exactly
    causal: the explicit mask is kept), ``score_shape`` (scores
    as the fused op sees them), ``out_perm`` (einsum output layout), ``form``
    (``matmul``, ``bmm``, ``baddbmm``, ``einsum``), ``module`` (the
    nn.Module path), ``nodes`` (every node of the site).

    Declines: ``declined`` (no consumer can take the site),
    ``weights_declined`` (the forward walk's reason, also in ``declined``),
    ``layout_declined`` (no standard layout: for consumers that need one).
    ``weights_end``: the node the weights feed after ``weights_chain``.
    """

    kind: ClassVar[str] = "attention"
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
    declined: str | None = None
    # as written
    scores: fx.Node | None = None
    score_steps: list[ScoreStep] = field(default_factory=list)
    weights_chain: list[fx.Node] = field(default_factory=list)
    weights_end: fx.Node | None = None
    score_scale: float = 1.0
    #: the cap of a tanh soft-cap ``c * tanh(s / c)`` applied after the scale (Gemma 2); None: none
    soft_cap: float | None = None
    mask_terms: list[MaskTerm] = field(default_factory=list)
    weights_declined: str | None = None
    layout_declined: str | None = None
    # layout and mask details for a fused rewrite
    form: str = ""
    module: str = ""
    q_perm: tuple[int, ...] | None = None
    k_perm: tuple[int, ...] | None = None
    v_perm: tuple[int, ...] | None = None
    k_transposed: bool = False
    k_expanded: fx.Node | None = None
    v_expanded: fx.Node | None = None
    mask_kind: str | None = None
    causal_declined: str | None = None
    score_shape: tuple[int, ...] | None = None
    out_perm: tuple[int, ...] | None = None

    @property
    def ok(self) -> bool:
        """True when some consumer can take the site (nothing declined it for all)."""
        return self.declined is None

    @property
    def name(self) -> str:
        return self.softmax.name

    @property
    def gqa(self) -> bool:
        """Key/value are shared by groups of query heads (repeat_kv found)."""
        return self.k_expanded is not None

    # ---- the operands as written

    @property
    def score_chain(self) -> list[fx.Node]:
        """The nodes between Q @ K^T and the softmax, nearest the softmax first."""
        return [s.node for s in self.score_steps]

    @property
    def between_products(self) -> list[fx.Node]:
        """The softmax and every node between the two products (what a fused op replaces besides them)."""
        return [self.softmax, *self.weights_chain, *self.score_chain]

    @property
    def q_operand(self) -> fx.Node:
        """The first operand of Q @ K^T as written."""
        return self.scores.args[1] if self.scores.target == aten.baddbmm.default else self.scores.args[0]

    @property
    def k_t_operand(self) -> fx.Node:
        """The second operand of Q @ K^T as written: (..., head_dim, keys)."""
        return self.scores.args[2] if self.scores.target == aten.baddbmm.default else self.scores.args[1]

    @property
    def v_operand(self) -> fx.Node:
        """The second operand of the product with V as written."""
        return self.output.args[1]

    @property
    def k_source(self) -> fx.Node | None:
        """(..., keys, head_dim) when ``k_t_operand`` is a transpose of its last two dims, else None."""
        k_t = self.k_t_operand
        if k_t.op != "call_function":
            return None
        r = len(ir.shape_of(k_t) or ())
        if k_t.target is aten.transpose.int and sorted(d % r for d in k_t.args[1:3]) == [r - 2, r - 1]:
            return k_t.args[0]
        if k_t.target is aten.permute.default and [d % r for d in k_t.args[1]] == list(range(r - 2)) + [r - 1, r - 2]:
            return k_t.args[0]
        return None

    @property
    def biases(self) -> list[fx.Node]:
        """The additive terms as written, nearest the softmax first."""
        return [t.written for t in self.mask_terms if t.kind == ADDITIVE]

    @property
    def fill_terms(self) -> list[MaskTerm]:
        return [t for t in self.mask_terms if t.kind == FILL]

    @property
    def fill_mask(self) -> fx.Node | None:
        """The boolean mask of the first fill term as written (None without one)."""
        return self.fill_terms[0].written if self.fill_terms else None

    @property
    def mask_invert(self) -> bool:
        """True when the fill term is a ``where`` (it fills where its condition is False)."""
        return bool(self.fill_terms) and self.fill_terms[0].applied_by.target not in (
            aten.masked_fill.Scalar, aten.masked_fill.Tensor)

    @property
    def mask_value(self) -> float:
        """The fill value of the first fill term (-inf without one)."""
        return self.fill_terms[0].fill if self.fill_terms else -math.inf

    @property
    def tq(self) -> int:
        return ir.shape_of(self.scores)[-2]

    @property
    def tk(self) -> int:
        return ir.shape_of(self.scores)[-1]

    @property
    def scores_bytes(self) -> int:
        """Bytes of the score matrix (at least float32)."""
        val = ir.tensor_meta(self.scores)
        return int(val.numel() * max(val.element_size(), 4))

    # ---- reporting

    def describe(self) -> str:
        """One line: where the site is and what was recognised."""
        where = f"{self.softmax.name}" + (f" ({self.module})" if self.module else "")
        reason = self.declined or self.layout_declined
        if reason:
            return f"{where}: declined: {reason}"
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
            "layout_declined": self.layout_declined,
            "form": self.form, "module": self.module, "mask_kind": self.mask_kind,
            "causal_declined": self.causal_declined,
            "mask_terms": [t.to_dict() for t in self.mask_terms],
        }


def _check_softmax(softmax: fx.Node) -> None:
    """The softmax normalises the last dim of a score matrix."""
    in_shape = static_shape(softmax.args[0])
    dim = softmax.args[1] if len(softmax.args) > 1 else softmax.kwargs.get("dim")
    if not isinstance(dim, int):
        raise Decline("softmax dim is not a constant")
    if dim % len(in_shape) != len(in_shape) - 1:
        raise Decline(f"softmax over dim {dim}, not the key dim")
    if len(in_shape) < 2:
        raise Decline("softmax over a vector, not a score matrix")


def _site_for(softmax: fx.Node, consts: Constants) -> AttentionSite:
    """The site anchored at ``softmax``: both walks, then the operand layout."""
    site = AttentionSite(softmax=softmax, module=ir.module_path(softmax))
    checked = attempt(_check_softmax, softmax)
    if isinstance(checked, Decline):
        site.declined = checked.reason
        return site
    scores, weights = attempt(walk_scores, softmax, consts), attempt(walk_weights, softmax)
    if isinstance(weights, Decline):
        site.weights_declined = weights.reason
    else:
        site.weights_end, site.output, site.weights_chain = weights.end, weights.product, weights.chain
        if weights.product is None:
            site.weights_declined = (f"the attention weights feed {ir.op_name(weights.end)} ({weights.end.name}), "
                                     "not a matmul with V")
    if isinstance(scores, Decline):
        site.declined = scores.reason
        return site
    site.scores, site.score_steps, site.score_scale, site.mask_terms, site.soft_cap = \
        scores.product, scores.steps, scores.scale, scores.terms, scores.softcap
    if site.weights_declined is not None:
        site.declined = site.weights_declined
        return site
    site.nodes = [site.scores, *reversed(site.score_chain), softmax, *site.weights_chain, site.output]
    layout = attempt(normalise_layout, site, consts)
    if isinstance(layout, Decline):
        site.layout_declined = layout.reason
    return site


def find_attention_sites(gm: fx.GraphModule) -> list[AttentionSite]:
    """Every softmax-anchored attention candidate in ``gm``, whatever its consumers can take.

    Each softmax gives one :class:`AttentionSite`; ``site.declined`` is None
    unless no consumer can take it.

    >>> import torch, graphopt
    >>> from graphopt import examples_models
    >>> from graphopt.passes.analysis.sites import find_attention_sites
    >>> model, args = examples_models.nanogpt(n_layer=2, seq=16)
    >>> sites = find_attention_sites(graphopt.capture(model, args).module)
    >>> [(s.is_causal, s.num_heads) for s in sites]
    [(True, 4), (True, 4)]
    """
    consts: Constants | None = None
    sites = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in SOFTMAX_INCLUDING_SAFE:
            continue
        if consts is None:
            consts = Constants(gm)
        site = _site_for(node, consts)
        sites.append(site)
        log.debug("attention site %s", site.describe())
    return sites


__all__ = ["AttentionSite", "MaskTerm", "find_attention_sites"]
