"""Hot matmuls: matmul-class nodes ranked by their share of the graph's time.

Writes (no rewrite):
    ctx.analysis(HotMatmuls, gm) -> [HotMatmul, ...]   largest share first
    node.meta[meta.HOT_RANK]    = 1, 2, ... on those nodes

The time is the measured one (``NodeCost.measured_s``) where every node was
profiled, else the roofline prediction; the share is of the whole graph's
time. Each site records its nodes: the matmul and the constant weight it reads
(through views), so a rewrite (blocking, parallel split, precision) and the
viewer can find them.

Declines: nothing. Needs ``node.meta[meta.COST]``; runs cost annotation first
when it is missing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from graphopt import ir, meta
from graphopt.cost import NodeCost, alias_root
from graphopt.pass_infra import AnalysisPass, OptimizeContext, PassResult
from graphopt.passes.analysis.cost_annotation import CostAnnotation

#: operand index of the weight (right-hand side) of each matmul-family target
_RHS = {"addmm": 2, "baddbmm": 2}


@dataclass
class HotMatmul:
    """A matmul-class node and its share of the graph's time."""

    node: fx.Node
    share: float
    time_s: float
    flops: int
    weight: fx.Node | None = None  # the get_attr it multiplies by, when it is a constant
    nodes: list[fx.Node] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "node": self.node.name, "op": ir.op_name(self.node), "module": ir.module_path(self.node),
            "share": self.share, "time_s": self.time_s, "flops": self.flops,
            "weight": self.weight.name if self.weight is not None else None,
            "nodes": [n.name for n in self.nodes],
        }


def node_time(cost: NodeCost, measured: bool) -> float:
    """The time a node is ranked by: measured when asked and known, else predicted."""
    if measured and cost.measured_s is not None:
        return cost.measured_s
    return cost.predicted_s


def all_measured(gm: fx.GraphModule) -> bool:
    costs = [n.meta.get(meta.COST) for n in gm.graph.nodes if n.op == "call_function"]
    return bool(costs) and all(c is not None and c.measured_s is not None for c in costs)


def weight_operand(node: fx.Node) -> fx.Node | None:
    """The constant (get_attr, through views) a matmul multiplies by, or None."""
    if node.op != "call_function":
        return None
    name = getattr(node.target, "_opname", "")
    idx = _RHS.get(name, 1)
    if len(node.args) <= idx or not isinstance(node.args[idx], fx.Node):
        return None
    root = alias_root(node.args[idx])
    return root if root.op == "get_attr" else None


def find_hot_matmuls(gm: fx.GraphModule, measured: bool | None = None) -> list[HotMatmul]:
    """Matmul-class nodes by share of total time, largest first."""
    if measured is None:
        measured = all_measured(gm)
    costs = {n: n.meta[meta.COST] for n in gm.graph.nodes if isinstance(n.meta.get(meta.COST), NodeCost)}
    total = sum(node_time(c, measured) for c in costs.values()) or 1.0
    out = []
    for node, cost in costs.items():
        if not cost.is_matmul_class:
            continue
        t = node_time(cost, measured)
        w = weight_operand(node)
        out.append(HotMatmul(node, t / total, t, cost.flops, w, [node] + ([w] if w is not None else [])))
    out.sort(key=lambda h: -h.time_s)
    return out


class HotMatmuls(AnalysisPass["list[HotMatmul]"]):
    name = "hot_matmuls"
    summary = "rank matmul/conv/attention nodes by their share of predicted (or measured) time"

    def analyze(self, gm: fx.GraphModule, ctx: OptimizeContext) -> list[HotMatmul]:
        if not all(isinstance(n.meta.get(meta.COST), NodeCost) for n in gm.graph.nodes):
            ctx.analysis(CostAnnotation, gm)
        hot = find_hot_matmuls(gm)
        for rank, h in enumerate(hot, 1):
            h.node.meta[meta.HOT_RANK] = rank
        return hot

    def describe(self, gm: fx.GraphModule, hot: list[HotMatmul], ctx: OptimizeContext) -> PassResult:
        share = sum(h.share for h in hot)
        return PassResult(gm, False, [f"{len(hot)} matmul-class nodes, {share:.0%} of the time"],
                          nodes_involved=[h.node.name for h in hot[:10]])
