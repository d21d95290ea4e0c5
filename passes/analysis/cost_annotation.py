"""Cost annotation: FLOPs, bytes, roofline bound and predicted time of every node.

Writes (no rewrite; ``modified`` is always False):
    node.meta["cost"] = NodeCost(flops, bytes_read, bytes_written, category, bound, predicted_s)
    the roofline used: ctx.target.roofline(ctx.device) (measured once per machine and cached,
                       see graphopt.target.roofline)
    ctx.cache["costs"] = {node name: NodeCost}

Declines: nothing; a node without ``meta["val"]`` (or a non-tensor value)
costs nothing, and a graphopt op without a registered cost counts its bytes
only (logged).
"""

from __future__ import annotations

import torch.fx as fx

from graphopt.cost import annotate_costs
from graphopt.pass_infra import OptimizeContext, Pass, PassResult


class CostAnnotation(Pass):
    name = "cost_annotation"
    summary = "annotate each node with FLOPs, bytes, roofline bound and predicted time"
    kind = "analysis"

    def call(self, gm: fx.GraphModule, ctx: OptimizeContext) -> PassResult:
        roofline = ctx.target.roofline(ctx.device)
        costs = annotate_costs(gm, roofline)
        ctx.cache["costs"] = costs
        total = sum(c.predicted_s for c in costs.values())
        return PassResult(gm, False, [f"predicted {total * 1e3:.3f} ms on {roofline.name}"])
