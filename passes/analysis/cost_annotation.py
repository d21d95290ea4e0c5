"""Cost annotation: FLOPs, bytes, roofline bound and predicted time of every node.

Writes (no rewrite; ``modified`` is always False):
    node.meta[meta.COST] = NodeCost(flops, bytes_read, bytes_written, category, bound, predicted_s)
    the roofline used: ctx.target.roofline(ctx.device) (measured once per machine and cached,
                       see graphopt.target.roofline)
Returns (``ctx.analysis(CostAnnotation, gm)``): ``{node name: NodeCost}``.

Declines: nothing; a node without ``meta["val"]`` (or a non-tensor value)
costs nothing, and a graphopt op without a declared cost counts its bytes
only (logged).
"""

from __future__ import annotations

import torch.fx as fx

from graphopt.cost import NodeCost, annotate_costs
from graphopt.pass_infra import AnalysisPass, OptimizeContext, PassResult


class CostAnnotation(AnalysisPass["dict[str, NodeCost]"]):
    name = "cost_annotation"
    summary = "annotate each node with FLOPs, bytes, roofline bound and predicted time"

    def analyze(self, gm: fx.GraphModule, ctx: OptimizeContext) -> dict[str, NodeCost]:
        return annotate_costs(gm, ctx.target.roofline(ctx.device))

    def describe(self, gm: fx.GraphModule, costs: dict[str, NodeCost], ctx: OptimizeContext) -> PassResult:
        total = sum(c.predicted_s for c in costs.values())
        return PassResult(gm, False, [f"predicted {total * 1e3:.3f} ms on {ctx.target.roofline(ctx.device).name}"])
