"""Common-subexpression elimination.

Rewrites:
    a = op(x, c); b = op(x, c)          -> b replaced by a
    two get_attr nodes of the same attr -> one

Declines: impure nodes (in-place ops, asserts), random ops (each call draws
new values), placeholders and the output, nodes that read or are storage
some op writes in place (a KV cache written with ``index_copy_``, a
position counter advanced with ``add_``: two reads of it are not one value,
and a merged copy would be advanced twice), two nodes that are both returned
(``return x + 1, x + 1``: merged, the caller would get one tensor twice, and
writing into one output would change the other).

torch ships ``torch.fx.passes.dialect.common.cse_pass.CSEPass``, but it
rebuilds the module on a fresh ``Graph`` and drops the pytree codegen that
keeps the module callable like the user's model; this pass works in place.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from graphopt import ir
from graphopt.opsets import mutated_storage
from graphopt.pass_infra import OptimizeContext, Pass, PassResult
from graphopt.report import Declined


def argument_key(value: Any, rep: dict[fx.Node, fx.Node] | None = None) -> Any:
    """``value`` (a node's target, args or kwargs) as a dict key: nodes by their representative in ``rep``,
    lists as tuples, floats by their bits (``0.0`` is not ``-0.0``), unhashables by identity."""
    rep = rep if rep is not None else {}
    if isinstance(value, fx.Node):
        return ("node", rep.get(value, value))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(argument_key(v, rep) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, argument_key(v, rep)) for k, v in value.items())))
    if isinstance(value, float):
        # by hex: 0.0 == -0.0 (x * -0.0 is not x * 0.0: 1/(x*-0.0) is -inf) and NaN != NaN
        return ("float", value.hex())
    if isinstance(value, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return str(value)
    try:
        hash(value)
    except TypeError:
        return ("id", id(value))
    return (type(value).__name__, value)


def _eligible(node: fx.Node, mutated: set[fx.Node]) -> bool:
    if node.op == "get_attr":
        return node not in mutated
    if node.op != "call_function" or node in mutated:
        return False
    if any(isinstance(a, fx.Node) and a in mutated for a in node.all_input_nodes):
        return False
    if node.is_impure():
        return False
    tags = getattr(node.target, "tags", ())
    if torch.Tag.nondeterministic_seeded in tags:
        return False
    schema = getattr(node.target, "_schema", None)
    return not (schema is not None and schema.is_mutable)


class CommonSubexpressionElimination(Pass):
    name = "cse"
    summary = "merge nodes that compute the same value from the same inputs"

    def call(self, gm: fx.GraphModule, ctx: OptimizeContext) -> PassResult:
        seen: dict[Any, fx.Node] = {}
        rep: dict[fx.Node, fx.Node] = {}
        merged = 0
        declined: list[Declined] = []
        mutated = mutated_storage(gm.graph)
        for node in list(gm.graph.nodes):
            if not _eligible(node, mutated):
                continue
            key = (node.op, argument_key(node.target, rep) if node.op != "call_function" else node.target,
                   argument_key(node.args, rep), argument_key(node.kwargs, rep))
            first = seen.get(key)
            if first is None:
                seen[key] = node
                continue
            if node.op == "call_function" and ir.is_returned(node) and ir.is_returned(first):
                declined.append(Declined(node.name, f"same value as {first.name}, but both are returned: "
                                         "merged, the two outputs would be one tensor"))
                continue
            rep[node] = first
            node.replace_all_uses_with(first)
            gm.graph.erase_node(node)
            merged += 1
        return PassResult(gm, merged > 0, [f"merged {merged} duplicate nodes"] if merged else [], declined)
