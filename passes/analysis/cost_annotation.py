"""Cost annotation: FLOPs, bytes, roofline bound and predicted time of every node.

Writes (no rewrite; ``modified`` is always False):
    node.meta[meta.COST] = NodeCost(flops, bytes_read, bytes_written, category, bound, predicted_s)
    ctx.target        = the Target used (measured once per machine and cached, see graphopt.cost)
Returns (``ctx.analysis(CostAnnotation, gm)``): ``{node name: NodeCost}``.

Declines: nothing; a node without ``meta["val"]`` (or a non-tensor value)
costs nothing, and a graphopt op without a registered cost counts its bytes
only (logged).
"""

from __future__ import annotations

import torch.fx as fx

from graphopt.cost import NodeCost, Target, annotate_costs, get_target
from graphopt.pass_infra import AnalysisPass, OptimizeContext, PassResult


def target_for(ctx: OptimizeContext) -> Target:
    """``ctx.target`` if set, else the (cached) measured roofline of ``ctx.device``."""
    if not isinstance(ctx.target, Target):
        ctx.target = get_target(ctx.device)
    return ctx.target


class CostAnnotation(AnalysisPass["dict[str, NodeCost]"]):
    name = "cost_annotation"
    summary = "annotate each node with FLOPs, bytes, roofline bound and predicted time"

    def analyze(self, gm: fx.GraphModule, ctx: OptimizeContext) -> dict[str, NodeCost]:
        return annotate_costs(gm, target_for(ctx))

    def describe(self, gm: fx.GraphModule, costs: dict[str, NodeCost], ctx: OptimizeContext) -> PassResult:
        total = sum(c.predicted_s for c in costs.values())
        return PassResult(gm, False, [f"predicted {total * 1e3:.3f} ms on {ctx.target.name}"])
