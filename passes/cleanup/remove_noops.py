"""Remove operations that return their input unchanged.

Rewrites (each only when the result has the input's shape and dtype):
    dropout(x, p, train=False) / dropout(x, 0.0, _)      -> x
    alias(x) / detach(x) / clone(x)                      -> x
    _to_copy(x) / to(x, dtype) with x's dtype and device -> x
    view(x, shape) / reshape / expand to x's own shape    -> x
    slice(x, dim, 0, >= size, 1)                          -> x
    add(x, 0) / sub(x, 0) / mul(x, 1) / div(x, 1)         -> x
    _assert_tensor_metadata(x, dtype, device) on a value the graph computes,
        when x's recorded dtype and device are those     -> removed (it can only pass; on
                                                            an input it stays: it checks the caller's tensor)

Declines: a node whose input or result is mutated in place by a later op,
directly or through a view or a cast that returns its input (removing the copy
would let the mutation leak: a KV cache layer's ``clone(position).to(int64).add_(1)``
would advance the caller's position tensor); "output would alias an
input" (or a weight, or another output): a returned fresh tensor whose removal
would hand back the caller's own tensor, the model's weight or another output
(``return x * 1``, ``return x + 0``, ``return x.clone()``: writing into the
output would write into the input) -- an output aliases an input after the
pass only when it did before (``return x.detach()`` still goes); a cast that
changes dtype, device or memory format; dropout in training mode.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from graphopt import ir
from graphopt.cost import alias_root
from graphopt.opsets import CASTS_INCLUDING_DEVICE, IDENTITY_OPS, METADATA_ASSERTS, RESHAPES_AND_EXPAND, \
    is_inactive_dropout, mutated_storage
from graphopt.pass_infra import OptimizeContext, Pass, PassResult
from graphopt.report import Declined

aten = torch.ops.aten

_NEUTRAL = {aten.add.Tensor: 0, aten.sub.Tensor: 0, aten.mul.Tensor: 1, aten.div.Tensor: 1,
            aten.add.Scalar: 0, aten.sub.Scalar: 0, aten.mul.Scalar: 1, aten.div.Scalar: 1}


def _identity_input(node: fx.Node) -> fx.Node | None:
    """The node ``node`` returns unchanged, or None."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    t, x = node.target, node.args[0]
    if t == aten.dropout.default:
        return x if is_inactive_dropout(node) else None
    if t in IDENTITY_OPS:
        return x if not node.kwargs.get("memory_format") else None
    if t in CASTS_INCLUDING_DEVICE:  # dtype, device and strides are compared by the caller
        return x if node.kwargs.get("memory_format") in (None, torch.preserve_format) else None
    if t in RESHAPES_AND_EXPAND:
        return x
    if t == aten.slice.Tensor:
        dim = node.args[1] if len(node.args) > 1 else 0
        start = node.args[2] if len(node.args) > 2 else None
        end = node.args[3] if len(node.args) > 3 else None
        step = node.args[4] if len(node.args) > 4 else 1
        shape = ir.shape_of(x)
        if shape is None or not isinstance(dim, int):
            return None
        full_end = end is None or (isinstance(end, int) and end >= shape[dim])
        return x if start in (None, 0) and full_end and step == 1 else None
    if t in _NEUTRAL and len(node.args) >= 2 and not isinstance(node.args[1], fx.Node):
        other = node.args[1]
        alpha = node.kwargs.get("alpha", 1)
        return x if isinstance(other, (int, float)) and other == _NEUTRAL[t] and alpha == 1 else None
    return None


def _assert_always_passes(node: fx.Node) -> bool:
    """A metadata assert on a computed value whose recorded dtype and device are the asserted ones."""
    if node.op != "call_function" or node.target not in METADATA_ASSERTS or not node.args:
        return False
    x = node.args[0]
    if not isinstance(x, fx.Node) or x.op != "call_function":
        return False
    val = ir.tensor_meta(x)
    if val is None:
        return False
    dtype, device = node.kwargs.get("dtype"), node.kwargs.get("device")
    return (dtype is None or val.dtype == dtype) and (device is None or val.device == torch.device(device))


def _output_leaves(gm: fx.GraphModule) -> list[fx.Node]:
    leaves: list[fx.Node] = []
    for node in gm.graph.nodes:
        if node.op == "output":
            fx.node.map_arg(node.args, leaves.append)
    return leaves


def _output_would_alias(gm: fx.GraphModule, node: fx.Node, x: fx.Node) -> str | None:
    """What a returned ``node`` would newly share memory with if replaced by ``x``, or None.

    An output may alias an input, a weight or another output after the rewrite
    only when it did before: ``x + 0`` is a fresh tensor, ``x`` is the caller's
    (writing into the output would write into the input); ``x.detach()`` already
    shares ``x``'s memory, so it can go.
    """
    if not ir.is_returned(node):
        return None
    before, after = alias_root(node), alias_root(x)
    if before is after:
        return None
    if after.op == "placeholder":
        return "an input"
    if after.op == "get_attr":
        return "a weight"
    if any(alias_root(leaf) is after for leaf in _output_leaves(gm)):
        return "another output"
    return None


def _same_value_type(a: fx.Node, b: fx.Node) -> bool:
    va, vb = ir.tensor_meta(a), ir.tensor_meta(b)
    if va is None or vb is None:
        return False
    try:
        return (tuple(va.shape) == tuple(vb.shape) and va.dtype == vb.dtype and va.device == vb.device
                and (va.stride() == vb.stride() or va.numel() <= 1))
    except Exception:
        return False


class RemoveNoOps(Pass):
    name = "remove_noops"
    summary = "remove eval-mode dropout, identities, no-op casts, views and slices"

    def call(self, gm: fx.GraphModule, ctx: OptimizeContext) -> PassResult:
        removed: dict[str, int] = {}
        declined: list[Declined] = []
        mutated = mutated_storage(gm.graph)  # also through views and casts that return their input
        for node in list(gm.graph.nodes):
            if _assert_always_passes(node):
                gm.graph.erase_node(node)
                removed["aten._assert_tensor_metadata"] = removed.get("aten._assert_tensor_metadata", 0) + 1
                continue
            x = _identity_input(node)
            if x is None and node.op == "call_function" and node.target == aten.dropout.default:
                declined.append(Declined(node.name, "dropout in training mode draws random values; kept"))
            if x is None or not _same_value_type(node, x):
                continue
            if node in mutated or x in mutated:
                declined.append(Declined(node.name, "its input or result is mutated in place later"))
                continue
            aliased = _output_would_alias(gm, node, x)
            if aliased is not None:
                declined.append(Declined(node.name, f"output would alias {aliased}: kept, so writing into the "
                                         f"output cannot change {aliased}"))
                continue
            node.replace_all_uses_with(x)
            gm.graph.erase_node(node)
            key = ir.op_name(node)
            removed[key] = removed.get(key, 0) + 1
        notes = [f"removed {n} x {op}" for op, n in sorted(removed.items())]
        return PassResult(gm, bool(removed), notes, declined)

