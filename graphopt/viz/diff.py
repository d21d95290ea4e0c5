"""Before/after: match the captured graph's nodes with the optimized graph's.

Rewrite passes work on copies of the graph, so a node that survives keeps its
name. Matching, in order:

1. same name and same op -> the same node;
2. the rest, by (op, module path), in graph order -> the same node renamed;
3. what is left is *removed* (only in the captured graph) or *added* (only in
   the optimized graph).

Which pass removed or added a node is known exactly when the optimization ran
with :class:`PassHistory` (``graphopt viz --diff`` does); otherwise from each
pass's ``nodes_involved``, and else not at all.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from graphopt import ir
from graphopt.pass_infra import Instrument, OptimizeContext, Pass, PassResult
from graphopt.report import PassRecord


@dataclass
class NodeMatch:
    """``pairs``: {before name: after name}; ``removed`` / ``added``: unmatched names."""

    pairs: dict[str, str] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)


def match_nodes(before: fx.GraphModule, after: fx.GraphModule) -> NodeMatch:
    """Match the nodes of ``before`` and ``after`` (see the module docstring)."""
    b_nodes, a_nodes = list(before.graph.nodes), list(after.graph.nodes)
    a_by_name = {n.name: n for n in a_nodes}
    match = NodeMatch()
    used: set[str] = set()
    rest_b = []
    for n in b_nodes:
        other = a_by_name.get(n.name)
        if other is not None and ir.op_name(other) == ir.op_name(n):
            match.pairs[n.name] = other.name
            used.add(other.name)
        else:
            rest_b.append(n)
    pool: dict[tuple[str, str], list[fx.Node]] = defaultdict(list)
    for n in a_nodes:
        if n.name not in used:
            pool[(ir.op_name(n), ir.module_path(n))].append(n)
    for n in rest_b:
        candidates = pool.get((ir.op_name(n), ir.module_path(n)))
        if candidates and n.op not in ("get_attr",):
            other = candidates.pop(0)
            match.pairs[n.name] = other.name
            used.add(other.name)
        else:
            match.removed.append(n.name)
    match.added = [n.name for n in a_nodes if n.name not in used]
    return match


@dataclass
class PassChange:
    """Node names one pass removed from, added to, and rewired in (same name, new op or inputs) its graph."""

    name: str
    record: PassRecord | None
    removed: list[str]
    added: list[str]
    rewritten: list[str] = field(default_factory=list)


class PassHistory(Instrument):
    """Record, for each rewrite pass, the node names it removed, added and rewired.

    Hand it to :func:`graphopt.optimize` (``instruments=[PassHistory()]``);
    :func:`graphopt.visualize` then attributes each removed/added node of the
    before/after view to the pass that did it. The records are kept in
    ``result.context.records[PassHistory]``.
    """

    def __init__(self) -> None:
        self._before: dict[str, tuple[str, tuple[str, ...]]] = {}

    def before_pass(self, pass_: Pass, gm: fx.GraphModule, ctx: OptimizeContext) -> None:
        self._before = {n.name: _signature(n) for n in gm.graph.nodes}

    def after_pass(self, pass_: Pass, result: PassResult, record: PassRecord, ctx: OptimizeContext) -> str | None:
        if pass_.kind == "analysis" or not result.modified:
            return None
        after = {n.name: _signature(n) for n in result.module.graph.nodes}
        change = PassChange(
            pass_.name, record,
            removed=[n for n in self._before if n not in after],
            added=[n for n in after if n not in self._before],
            rewritten=[n for n, sig in after.items() if n in self._before and self._before[n] != sig],
        )
        ctx.records.setdefault(PassHistory, []).append(change)
        return None


def _signature(node: fx.Node) -> tuple[str, tuple[str, ...]]:
    return ir.op_name(node), tuple(p.name for p in node.all_input_nodes)


def pass_changes(result: Any) -> list[PassChange]:
    """The :class:`PassChange` list of an optimization (empty without :class:`PassHistory`)."""
    context = getattr(result, "context", None)
    records = getattr(context, "records", None) or {}
    return list(records.get(PassHistory, []))
