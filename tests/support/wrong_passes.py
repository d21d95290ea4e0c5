"""Deliberately wrong passes, for testing verification and rollback."""

from __future__ import annotations

import torch
import torch.fx as fx

import graphopt

aten = torch.ops.aten
MATMULS = {aten.matmul.default, aten.mm.default, aten.bmm.default}


class SwapMatmulOperands(graphopt.Pass):
    """Deliberately wrong: a @ b -> b @ a (shapes still fit for square operands)."""

    name = "swap_matmul_operands"
    summary = "a wrong rewrite, for testing rollback"

    def call(self, gm: fx.GraphModule, ctx: graphopt.OptimizeContext) -> graphopt.PassResult:
        swapped = []
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in MATMULS:
                node.args = (node.args[1], node.args[0]) + tuple(node.args[2:])
                swapped.append(node.name)
        return graphopt.PassResult(gm, bool(swapped), [f"swapped {len(swapped)} matmuls"], nodes_involved=swapped)
