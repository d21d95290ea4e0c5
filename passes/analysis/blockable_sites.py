"""Find the sites the blocked-operator planner can rewrite, and say why others are left.

The sites come from the site layer (``passes/analysis/sites/``); this module
says which of them the planner takes:

* **attention** -- the sites of :func:`graphopt.passes.analysis.sites.find_attention_sites`
  the blocked-attention operator can express
  (:mod:`graphopt.passes.analysis.blockable_attention`):
  ``matmul(q, k^T) * s + bias (+ ...) [masked] -> softmax -> matmul v``.
* **ffn** -- the chains of :func:`graphopt.passes.analysis.sites.ffn.find_ffn_chains`
  the chunked-FFN operator can take (:mod:`graphopt.passes.analysis.blockable_ffn`).
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

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx as fx

from graphopt import ir
from graphopt.opsets import ACTIVATION_MATMULS
from graphopt.passes.analysis.blockable_attention import check_blockable_attention, is_blockable_candidate
from graphopt.passes.analysis.blockable_ffn import check_blockable_ffn, is_blockable_ffn_candidate
from graphopt.passes.analysis.sites import AttentionSite, find_attention_sites
from graphopt.passes.analysis.sites.ffn import FFNChain, find_ffn_chains
from graphopt.passes.analysis.sites.linear import LinearSite, linear_site
from graphopt.passes.analysis.sites.lm_head import LM_HEAD_REDUCTIONS, LMHeadSite, lm_head_site
from graphopt.pattern import attempt, declined_from
from graphopt.report import Declined

aten = torch.ops.aten

__all__ = ["AttentionSite", "FFNChain", "LMHeadSite", "MatmulSite", "BlockableSite", "find_blockable_sites"]


def _rank(node: Any) -> int:
    shape = ir.shape_of(node)
    return len(shape) if shape is not None else -1


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


BlockableSite = AttentionSite | FFNChain | LMHeadSite | MatmulSite


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
        taken.update(site.removed if isinstance(site, FFNChain) else getattr(site, "nodes", []))
        taken.add(site.output)

    for node in gm.graph.nodes if "lm_head" in kinds else ():
        if node.op == "call_function" and node.target in LM_HEAD_REDUCTIONS:
            found = attempt(lm_head_site, node)
            if (decline := declined_from(node.name, found)) is not None:
                declined.append(decline)
            elif found is not None:
                add(found)
    for site in find_attention_sites(gm) if "attention" in kinds else ():
        if site.softmax in taken or not is_blockable_candidate(site):
            continue  # a softmax that is not attention (e.g. a classifier head): not a candidate
        found = attempt(check_blockable_attention, site)
        if (decline := declined_from(site.name, found)) is not None:
            declined.append(decline)
        else:
            sites.append(site)
            taken.update(site.between_products)
            taken.add(site.output)
    for chain in find_ffn_chains(gm) if "ffn" in kinds else ():
        if not is_blockable_ffn_candidate(chain) or chain.output in taken:
            continue
        found = attempt(check_blockable_ffn, chain)
        if (decline := declined_from(chain.name, found)) is not None:
            declined.append(decline)
        elif found is not None and not (set(found.removed) & taken):
            add(found)
    for node in gm.graph.nodes if "matmul" in kinds else ():
        if node in taken or node.op != "call_function":
            continue
        lin = linear_site(node)
        if lin is not None and node.target in (aten.linear.default, aten.addmm.default, aten.mm.default,
                                               aten.matmul.default):
            sites.append(MatmulSite(node, lin))
        elif node.target in ACTIVATION_MATMULS and _rank(node.args[0]) >= 2 and _rank(node.args[1]) >= 2:
            sites.append(MatmulSite(node, None))
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    sites.sort(key=lambda s: order[s.output])
    return sites, declined
