"""Find attention sites: BFS/DFS from each softmax over the graph.

A site is a softmax whose input descends from a matmul of two activations
(Q @ K^T, possibly scaled and masked) and whose output feeds a matmul with V.

(Stub: the attention work (issue 4) fills in the search; the data structure
is the contract shared by analysis, the attention rewrite and the viewer.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx


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

    def to_dict(self) -> dict:
        name = lambda n: n.name if isinstance(n, fx.Node) else None  # noqa: E731
        return {
            "softmax": self.softmax.name, "q": name(self.q), "k": name(self.k), "v": name(self.v),
            "output": name(self.output), "scale": self.scale, "mask": name(self.mask),
            "is_causal": self.is_causal, "num_heads": self.num_heads, "num_kv_heads": self.num_kv_heads,
            "nodes": [n.name for n in self.nodes], "declined": self.declined,
        }


def find_attention_sites(gm: fx.GraphModule) -> list[AttentionSite]:
    """Every softmax-anchored attention candidate in ``gm``, rewritable or not."""
    return []
