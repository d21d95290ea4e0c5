"""Plan tensor parallelism: group linear sites into seeds, propagate, and collect regions and declines."""

from __future__ import annotations

import networkx as nx
import torch.fx as fx

from graphopt import ir
from graphopt.passes.analysis.sites.linear import LinearSite, find_linear_sites
from graphopt.pattern import Decline, attempt
from graphopt.report import Declined
from graphopt.passes.tensor_parallel.shards import NeedSeeds, ShardedRegion, ShardingError, TensorParallelPlan, where
from graphopt.passes.tensor_parallel.propagation import Propagation


#: how often a region restarts with more seeds before it is declined
MAX_RESTARTS = 4


def _upstream_sites(graph: nx.DiGraph, node: fx.Node, sites: dict[str, LinearSite], depth: int = 16) -> list[LinearSite]:
    """Linear sites found walking upstream from ``node`` (BFS), not beyond the first site on each path."""
    found: list[LinearSite] = []
    frontier, seen = [node.name], {node.name}
    for _ in range(depth):
        nxt = []
        for name in frontier:
            if name in sites:
                found.append(sites[name])
                continue
            for pred in graph.predecessors(name):
                if pred not in seen:
                    seen.add(pred)
                    nxt.append(pred)
        frontier = nxt
        if not frontier:
            break
    return found


def plan_tensor_parallel(gm: fx.GraphModule, world_size: int) -> TensorParallelPlan:
    """Find the column -> row regions of ``gm`` and how to make each local to one of ``world_size`` ranks.

    Raises :class:`ShardingError` when a region is shardable but a head (or
    feature) count is not divisible by ``world_size``.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    sites = find_linear_sites(gm)
    by_input: dict[fx.Node, list[LinearSite]] = {}
    for s in sites:
        by_input.setdefault(s.input, []).append(s)
    site_by_name = {s.node.name: s for s in sites}
    graph = ir.to_networkx(gm)
    assigned: set[fx.Node] = set()
    regions: list[ShardedRegion] = []
    declined: list[Declined] = []
    for group in by_input.values():
        if any(s.node in assigned for s in group):
            continue
        seeds = list(group)
        outcome: ShardedRegion | Decline = Decline("")
        for _ in range(MAX_RESTARTS + 1):
            prop = Propagation(gm, seeds, world_size)
            try:
                outcome = attempt(prop.run)
            except NeedSeeds as need:
                extra = [s for s in _upstream_sites(graph, need.operand, site_by_name)
                         if s not in seeds and s.node not in assigned]
                more = [t for s in extra for t in by_input[s.input] if t not in seeds and t.node not in assigned]
                if not more:
                    outcome = Decline(f"{where(need.operand)} must be sharded like the values it meets but does "
                                      "not come from a linear layer graphopt can shard")
                    break
                seeds += list(dict.fromkeys(more))
                continue
            break
        label = "+".join(s.label for s in seeds)
        if isinstance(outcome, Decline):
            declined.append(Declined(label, outcome.reason))
            continue
        if prop.indivisible:
            raise ShardingError(prop.indivisible[0])
        regions.append(outcome)
        assigned.update(s.node for s, _ in outcome.columns + outcome.rows)
    return TensorParallelPlan(world_size, regions, declined)
