"""The weight-only ops of a graph as direct calls of torch's kernels, for a compiler to see through.

    graphopt.int8_weight_only_linear(x, W8, s, b)      -> int8_kernel_call(x, W8, s_kernel, b)
    graphopt.int4_weight_only_linear(x, W4, sz, G, b)  -> int4_kernel_call(x, W4_kernel, G, sz_kernel, pad, N, b)

where ``*_kernel`` are the kernel layouts :func:`~graphopt.ops.weight_only_linear.prepack`
made of the stored weights (shared, not copied) and the calls are the ops'
own kernel paths (:mod:`graphopt.ops.weight_only_linear`), plain functions of
aten ops: the bf16 cast of ``x``, the kernel
(``torch._weight_int8pack_mm``, ``torch._weight_int4pack_mm_for_cpu`` or
CUDA's ``torch._weight_int4pack_mm``), the cast back and the bias.

Why: each weight-only op is a ``torch.library.custom_op`` with a Python body
(it finds the weight's kernel layout, casts, calls the kernel), which
``torch.compile`` calls as an opaque extern op. At batch 1 of a decode step
that wrapper costs about as much as the int4 kernel itself (measured on the
4-layer Llama of benchmarks/generate.py: ~58 us of the op's own time around
each ~80 us kernel), and its casts cannot fuse with the norm before and the
add after. Traced as aten ops, inductor fuses the casts into its kernels and
calls the weight kernel directly. The graph the user saves keeps the custom
ops (they export, reload and translate to ONNX); only the copy handed to a
compiler is rewritten, and it computes the same numbers (the op's kernel path,
op for op).

Declined (the op node is kept as it is): a weight or scale that is not a
module attribute (``get_attr``), or one without a kernel layout on its device
(the op's reference path runs there, and stays the op's to run).
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.fx as fx

from graphopt.ir import get_attr_value, is_constant, register_constant
from graphopt.ops import weight_only_linear as wo
from graphopt.ops.weight_only_linear import int4_kernel_call, int8_kernel_call

log = logging.getLogger(__name__)

__all__ = ["inline_kernel_calls"]


def _attr(gm: fx.GraphModule, node: object) -> torch.Tensor | None:
    if not is_constant(node):
        return None
    value = get_attr_value(gm, node)
    return value if isinstance(value, torch.Tensor) else None


def _new_attr(gm: fx.GraphModule, value: torch.Tensor, name_hint: str, anchor: fx.Node) -> fx.Node:
    with gm.graph.inserting_before(anchor):
        return gm.graph.get_attr(register_constant(gm, name_hint, value))


def _op(node: fx.Node) -> object:
    """The node's op overload (a traced call of the packet, ``torch.ops.graphopt.x(...)``, is its default)."""
    target = node.target
    return target.default if isinstance(target, torch._ops.OpOverloadPacket) else target


def _ops() -> tuple[object, object]:
    return (torch.ops.graphopt.int8_weight_only_linear.default, torch.ops.graphopt.int4_weight_only_linear.default)


def _lower(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Replace one weight-only op node by its kernel call; False where it is declined (see the module docstring)."""
    int4 = _op(node) is torch.ops.graphopt.int4_weight_only_linear.default
    x, weight_node, scale_node = node.args[0], node.args[1], node.args[2]
    weight, scales = _attr(gm, weight_node), _attr(gm, scale_node)
    layout = wo.kernel_layout(weight, scales) if weight is not None and scales is not None else None
    if layout is None:
        return False
    graph = gm.graph
    if int4:
        packed, sz, pad = layout
        group_size, bias = node.args[3], node.args[4]
        packed_node = _new_attr(gm, packed, f"{weight_node.target}_kernel", node)
        sz_node = _new_attr(gm, sz, f"{scale_node.target}_kernel", node)
        args = (x, packed_node, group_size, sz_node, pad, weight.shape[0], bias)
        target = int4_kernel_call
    else:
        scale_node_k = _new_attr(gm, layout[1], f"{scale_node.target}_kernel", node)
        args, target = (x, weight_node, scale_node_k, node.args[3]), int8_kernel_call
    with graph.inserting_before(node):
        call = graph.call_function(target, args)
    call.meta = dict(node.meta)
    node.replace_all_uses_with(call)
    graph.erase_node(node)
    for attr in (weight_node, scale_node):  # the stored layout, where only the kernel layout is read now
        if not attr.users:
            graph.erase_node(attr)
    return True


def inline_kernel_calls(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` (a GraphModule; anything else is returned as it is) with its weight-only ops as
    kernel calls; the copy shares every tensor with ``module``, which is left unchanged."""
    if not isinstance(module, fx.GraphModule):
        return module

    def lowerable(n: fx.Node) -> bool:
        return n.op == "call_function" and _op(n) in _ops()

    if not any(lowerable(n) for n in module.graph.nodes):
        return module
    lowered_module = fx.GraphModule(module, _copied_graph(module.graph), class_name=type(module).__name__)
    graph = lowered_module.graph
    lowered = sum(_lower(lowered_module, n) for n in list(graph.nodes) if lowerable(n))
    lowered_module.recompile()
    log.debug("weight-only ops as kernel calls: %d", lowered)
    return lowered_module


def _copied_graph(graph: fx.Graph) -> fx.Graph:
    """``graph``'s nodes in a new graph, with its code generator (an exported graph's takes pytree inputs)."""
    new = fx.Graph()
    new.output(new.graph_copy(graph, {}))
    new._codegen = copy.copy(graph._codegen)
    return new
