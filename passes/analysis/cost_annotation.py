"""Cost annotation: FLOPs, bytes, roofline bound and predicted time of every node.

Writes (no rewrite; ``modified`` is always False):
    node.meta[meta.COST] = NodeCost(flops, bytes_read, bytes_written, category, bound, predicted_s)
    ctx.target        = the Target used (measured once per machine and cached, see graphopt.cost)
    ctx.cache["costs"] = {node name: NodeCost}

Declines: nothing; a node without ``meta["val"]`` (or a non-tensor value)
costs nothing, and a graphopt op without a registered cost counts its bytes
only (logged).
"""

from __future__ import annotations

import torch.fx as fx

from graphopt import meta
from graphopt.cost import Target, annotate_costs, get_target
from graphopt.pass_infra import OptimizeContext, Pass, PassResult


def target_for(ctx: OptimizeContext) -> Target:
    """``ctx.target`` if set, else the (cached) measured roofline of ``ctx.device``."""
    if not isinstance(ctx.target, Target):
        ctx.target = get_target(ctx.device)
    return ctx.target


class CostAnnotation(Pass):
    name = "cost_annotation"
    summary = "annotate each node with FLOPs, bytes, roofline bound and predicted time"
    kind = "analysis"

    def call(self, gm: fx.GraphModule, ctx: OptimizeContext) -> PassResult:
        costs = annotate_costs(gm, target_for(ctx))
        ctx.cache["costs"] = costs
        total = sum(c.predicted_s for c in costs.values())
        return PassResult(gm, False, [f"predicted {total * 1e3:.3f} ms on {ctx.target.name}"])
