"""Make a plan's regions local to one rank: shard weights, localise view sizes, all-reduce row outputs."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from graphopt import ir, meta
from graphopt.opsets import erase_dead
from graphopt.passes.tensor_parallel.shards import TensorParallelPlan, shard_tensor

aten = torch.ops.aten


def _all_reduce(graph: fx.Graph, value: fx.Node, group_name: str) -> fx.Node:
    reduced = graph.call_function(torch.ops._c10d_functional.all_reduce.default, (value, "sum", group_name))
    return graph.call_function(torch.ops._c10d_functional.wait_tensor.default, (reduced,))


def _set_arg(node: fx.Node, key: int | str, value: Any) -> None:
    if isinstance(key, int):
        args = list(node.args)
        args[key] = value
        node.args = tuple(args)
    else:
        kwargs = dict(node.kwargs)
        kwargs[key] = value
        node.kwargs = kwargs


def _constant(gm: fx.GraphModule, before: fx.Node, name: str, value: torch.Tensor) -> fx.Node:
    target = ir.register_constant(gm, name, value)
    gm.meta[meta.TENSOR_PARALLEL_SHARDS] = [*gm.meta.get(meta.TENSOR_PARALLEL_SHARDS, []), target]
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(target)
    node.meta.update({k: v for k, v in before.meta.items() if k in ("nn_module_stack", "stack_trace")})
    return node


def apply_plan(gm: fx.GraphModule, plan: TensorParallelPlan, rank: int, group_name: str) -> list[str]:
    """Rewrite ``gm`` in place into rank ``rank``'s part of ``plan``; returns the names of the nodes involved."""
    world = plan.world_size
    graph = gm.graph
    involved: list[str] = []
    for region in plan.regions:
        for node, key, value in region.arg_edits:
            _set_arg(node, key, value)
        for node, key, const, dim, blocks in region.const_edits:
            local = shard_tensor(ir.get_attr_value(gm, const), dim, blocks, rank, world)
            _set_arg(node, key, _constant(gm, node, f"{const.target}.tp{rank}", local))
        for site, blocks in region.columns:
            e = shard_tensor(site.effective_weight(gm).detach(), 1, blocks, rank, world)  # (in, out/W)
            bias = site.bias_value(gm)
            b_node = None
            if bias is not None:
                b_node = _constant(gm, site.node, f"{site.label}.bias.tp{rank}",
                                   shard_tensor(bias.detach(), 0, blocks, rank, world))
            if site.kind == "linear":
                w_node = _constant(gm, site.node, f"{site.label}.weight.tp{rank}", e.t().contiguous())
                site.node.args = (site.input, w_node) + ((b_node,) if b_node is not None else ())
                site.node.kwargs = {}
            elif site.kind == "addmm":
                w_node = _constant(gm, site.node, f"{site.label}.weight.tp{rank}", e)
                site.node.args = (b_node, site.input, w_node)
            else:
                w_node = _constant(gm, site.node, f"{site.label}.weight.tp{rank}", e)
                site.node.args = (site.input, w_node)
            involved.append(site.node.name)
        for site, blocks in region.rows:
            e = shard_tensor(site.effective_weight(gm).detach(), 0, blocks, rank, world)  # (in/W, out)
            node = site.node
            with graph.inserting_before(node):
                if site.kind == "linear":
                    w_node = _constant(gm, node, f"{site.label}.weight.tp{rank}", e.t().contiguous())
                    partial = graph.call_function(aten.linear.default, (site.input, w_node))
                else:
                    w_node = _constant(gm, node, f"{site.label}.weight.tp{rank}", e)
                    op = aten.matmul.default if site.kind == "matmul" else aten.mm.default
                    partial = graph.call_function(op, (site.input, w_node))
                total = _all_reduce(graph, partial, group_name)
                result = total
                if site.bias is not None:
                    result = graph.call_function(aten.add.Tensor, (total, site.bias))
            for new in (partial, total, total.args[0], result):
                new.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")})
            node.replace_all_uses_with(result)
            graph.erase_node(node)
            involved += [partial.name, total.name]
    erase_dead(gm)
    return involved
