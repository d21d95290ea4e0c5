"""Constant folding with a size cap.

Rewrites:
    op(constants...) -> get_attr of the precomputed value
        e.g. a causal mask built from arange/tril/ones -> one constant tensor
    shape-only op of an input with static shape -> constant
        (new_ones(x, ...), zeros_like(x), ones_like(x), full_like(x, v))

A chain is folded at its frontier (the last constant node before a
non-constant user); interior nodes become dead and ``dead_code`` removes them.

Declines: results larger than ``constant_fold_max_bytes`` (default 16 MiB; a
folded tensor costs memory for as long as the module lives), values the model
returns (every call would hand out the same tensor object, and a caller
writing into it would change later results), views (folding
``t(weight)`` would copy a weight that stays alive: the view is kept and its
compute input folded instead), values written in place later (T5's
``position_bias.add_(mask)``: the stored constant would change on every
call), random ops, impure ops.
"""

from __future__ import annotations


import torch
import torch.fx as fx

from graphopt import ir
from graphopt.ir import constant_nodes, evaluate
from graphopt.pass_infra import OptimizeContext, Option, Pass, PassResult
from graphopt.report import Declined
from graphopt.tensor_sizes import readable_bytes

aten = torch.ops.aten

DEFAULT_MAX_BYTES = 16 * 2**20


class ConstantFolding(Pass):
    name = "constant_folding"
    summary = "precompute subgraphs that depend on no input (size-capped)"
    options = {"constant_fold_max_bytes": Option("largest tensor constant folding may create (bytes, default 16 MiB)",
                                                 int, DEFAULT_MAX_BYTES)}

    def call(self, gm: fx.GraphModule, ctx: OptimizeContext) -> PassResult:
        max_bytes = int(self.option(ctx, "constant_fold_max_bytes"))
        const = constant_nodes(gm)
        frontier: list[fx.Node] = []
        visited: set[fx.Node] = set()
        declined: list[Declined] = []
        for node in gm.graph.nodes:
            if node not in const or node.op == "get_attr":
                continue
            if not any(u not in const for u in node.users):
                continue
            # a view of a constant stays a view; fold the compute behind it
            while node.op == "call_function" and node.target in ir.VIEW_OPS and isinstance(node.args[0], fx.Node):
                node = node.args[0]
            if node.op != "call_function" or node in visited:
                continue
            visited.add(node)
            if ir.is_returned(node):
                declined.append(Declined(node.name, "returned as an output: folded, every call would return "
                                         "the same tensor object"))
                continue
            writer = ir.writer_of(node)
            if writer is not None:
                declined.append(Declined(node.name, f"written in place by {ir.op_name(writer)}: folded, the "
                                         "stored constant would change on every call"))
                continue
            val = ir.tensor_meta(node)
            if val is None:
                continue
            nbytes = val.numel() * val.element_size()
            if nbytes > max_bytes:
                declined.append(Declined(node.name, f"result is {readable_bytes(nbytes)} > cap "
                                         f"{readable_bytes(max_bytes)} (constant_fold_max_bytes)"))
                continue
            frontier.append(node)
        if not frontier:
            return PassResult(gm, False, declined=declined)
        values = evaluate(gm, frontier, const)
        folded = []
        for node in frontier:
            name = ir.register_constant(gm, node.name, values[node].detach().clone())
            with gm.graph.inserting_before(node):
                new = gm.graph.get_attr(name)
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            folded.append(new.name)
        gm.graph.eliminate_dead_code()
        return PassResult(gm, True, [f"folded {len(frontier)} constant subgraphs"], declined, folded)
