"""Predicted peak activation memory for the blocked-operator planner.

:func:`graphopt.memory.peak_memory` (liveness over node order; views share
their base's storage; parameters and inputs are not activations) plus, while
each blocked operator runs, its working memory
(:func:`graphopt.ops.workspace_bytes`, declared by each operator): the shared analysis counts
values, and a blocked operator's tiles are the memory it trades for time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from graphopt.memory import peak_memory
from graphopt.ops import workspace_bytes

__all__ = ["PlannerProfile", "memory_profile"]


@dataclass
class PlannerProfile:
    """``peak_bytes`` at ``peak_node``; ``live_at_peak``: ``[(owner node, bytes)]`` largest first;
    ``timeline[i]``: live bytes (values + working memory) while the i-th node runs."""

    peak_bytes: int
    peak_node: fx.Node | None
    live_at_peak: list[tuple[fx.Node, int]] = field(default_factory=list)
    timeline: list[int] = field(default_factory=list)


def memory_profile(gm: fx.GraphModule) -> PlannerProfile:
    """The predicted activation-memory profile of ``gm`` (which must carry ``meta["val"]``)."""
    shared = peak_memory(gm)
    nodes = list(gm.graph.nodes)
    timeline = [live + workspace_bytes(node) for node, live in zip(nodes, shared.timeline)]
    if not timeline:
        return PlannerProfile(0, None)
    peak_i = max(range(len(timeline)), key=timeline.__getitem__)
    live = sorted(((st.owner, st.nbytes) for st in shared.storages
                   if st.kind == "activation" and st.born <= peak_i <= st.last_use), key=lambda item: -item[1])
    return PlannerProfile(timeline[peak_i], nodes[peak_i], live, timeline)
