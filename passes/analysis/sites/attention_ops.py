"""Op sets, small graph predicates and constant values the attention-site walk uses.

Attention-only for now; the op sets shared with other passes (casts, identity
ops, softmax forms) are to move to one module of op sets (issue 15).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx as fx

from graphopt import ir
from graphopt.ir import constant_nodes, evaluate
from graphopt.opsets import CASTS_INCLUDING_DEVICE, IDENTITY_LIKE, RESHAPES, is_inactive_dropout
from graphopt.pattern import Decline

log = logging.getLogger(__name__)
aten = torch.ops.aten


def _overloads(*names: str) -> frozenset:
    """The named aten overloads this torch has (``"_safe_softmax.default"``, ...)."""
    found = []
    for name in names:
        packet, _, overload = name.partition(".")
        op = getattr(getattr(aten, packet, None), overload, None)
        if op is not None:
            found.append(op)
    return frozenset(found)


MATMUL_OPS = frozenset({aten.matmul.default, aten.bmm.default, aten.mm.default})
PRODUCT_OPS = MATMUL_OPS | {aten.baddbmm.default, aten.einsum.default}
#: what the attention walk steps over as a cast: opsets' casts with ``.to(device)`` and ``type_as``
CAST_OPS = CASTS_INCLUDING_DEVICE | {aten.type_as.default}
SCALE_OPS = frozenset({aten.mul.Tensor, aten.div.Tensor})
#: ``scores += bias`` in place (MPNet): an additive step when the scores are the argument written
INPLACE_ADD_OPS = frozenset({aten.add_.Tensor, aten.sub_.Tensor})
ADD_OPS = frozenset({aten.add.Tensor, aten.sub.Tensor}) | INPLACE_ADD_OPS
MASKED_FILL_OPS = frozenset({aten.masked_fill.Scalar, aten.masked_fill.Tensor})
WHERE_OPS = frozenset({aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf})

#: largest mask the analysis evaluates to recognise a causal one
MASK_EVAL_MAX_BYTES = 1 << 30


def arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    """Argument ``i`` of ``node``, positional or by keyword ``name``."""
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def static_shape(node: Any) -> tuple[int, ...]:
    """The shape of ``node``; declines the site when it has none."""
    s = ir.shape_of(node)
    if s is None:
        raise Decline(f"{getattr(node, 'name', node)} has no static shape (attention fusion needs static "
                      "shapes: capture without dynamic_shapes)")
    return s


def dtype_of(node: Any) -> torch.dtype | None:
    """The dtype of ``node``'s value (None when unknown)."""
    val = ir.tensor_meta(node)
    return val.dtype if val is not None else None


def is_float_cast(node: fx.Node) -> bool:
    """A cast between floating dtypes on the same device."""
    if node.op != "call_function" or node.target not in CAST_OPS or not isinstance(node.args[0], fx.Node):
        return False
    a, b = ir.tensor_meta(node.args[0]), ir.tensor_meta(node)
    return (a is not None and b is not None and a.dtype.is_floating_point and b.dtype.is_floating_point
            and a.device == b.device)


def is_identity(node: fx.Node) -> bool:
    """Ops that pass a value through unchanged (in eval mode)."""
    if node.op != "call_function":
        return False
    if node.target in IDENTITY_LIKE:
        return True
    if node.target == aten.dropout.default:
        return is_inactive_dropout(node)
    return is_float_cast(node)


def is_active_dropout(node: fx.Node) -> bool:
    """Dropout that draws random values (training mode, p > 0)."""
    return (node.op == "call_function" and node.target in (aten.dropout.default, aten.native_dropout.default)
            and not is_identity(node))


def is_leading_reshape(node: fx.Node) -> bool:
    """A reshape that keeps the last two dims (it only splits or merges batch/head dims)."""
    if node.op != "call_function" or node.target not in RESHAPES or not isinstance(node.args[0], fx.Node):
        return False
    a, b = ir.shape_of(node.args[0]), ir.shape_of(node)
    return a is not None and b is not None and len(a) >= 2 and len(b) >= 2 and a[-2:] == b[-2:]


def swaps_last_two(node: fx.Node) -> bool:
    """transpose(x, -2, -1) / t(x) / permute swapping only the last two dims."""
    if node.op != "call_function":
        return False
    shape = ir.shape_of(node)
    if shape is None:
        return False
    n = len(shape)
    if node.target == aten.t.default:
        return n == 2
    if node.target == aten.transpose.int:
        dims = {d % n for d in node.args[1:3]}
        return dims == {n - 2, n - 1}
    if node.target == aten.permute.default:
        perm = [d % n for d in node.args[1]]
        return perm == list(range(n - 2)) + [n - 1, n - 2]
    return False


class Constants:
    """Which nodes depend on no input, and their values (evaluated at most once)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.nodes = constant_nodes(gm)
        self._values: dict[fx.Node, Any] = {}
        self.params = {id(p) for p in gm.parameters()}

    def is_constant(self, node: Any) -> bool:
        """True for a non-node argument or a node computed from no input."""
        return not isinstance(node, fx.Node) or node in self.nodes

    def value(self, node: fx.Node) -> torch.Tensor | None:
        """The value of a constant node (None when not constant, too large, or not runnable)."""
        if node not in self._values:
            val = ir.tensor_meta(node)
            if node not in self.nodes or val is None or val.numel() * val.element_size() > MASK_EVAL_MAX_BYTES:
                self._values[node] = None
            else:
                try:
                    self._values[node] = evaluate(self.gm, [node], self.nodes)[node]
                except Exception as exc:  # an op that does not run eagerly on real tensors
                    log.debug("could not evaluate %s: %s", node.name, exc)
                    self._values[node] = None
        return self._values[node]

    def scalar(self, x: Any) -> float | None:
        """A Python number, or a one-element constant tensor's value."""
        if isinstance(x, bool):
            return None
        if isinstance(x, (int, float)):
            return float(x)
        if isinstance(x, fx.Node):
            v = self._one_element(x, 0)
            return float(v.reshape(())) if v is not None else None
        return None

    def _one_element(self, node: fx.Node, depth: int) -> torch.Tensor | None:
        """Value of a one-element node computed from constants only.

        Wider than :func:`constant_nodes`: it runs the in-place ``detach_``
        that ``torch.tensor(d).sqrt()`` exports as (harmless on a fresh copy).
        """
        val = ir.tensor_meta(node)
        if val is None or val.numel() != 1 or depth > 16:
            return None
        if node in self.nodes:
            return self.value(node)
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload) \
                or torch.Tag.nondeterministic_seeded in node.target.tags:
            return None
        env = {}
        for inp in node.all_input_nodes:
            env[inp] = self._one_element(inp, depth + 1)
            if env[inp] is None:
                return None
        args = fx.node.map_arg(node.args, lambda a: env[a].clone())
        kwargs = fx.node.map_arg(node.kwargs, lambda a: env[a].clone())
        try:
            with torch.no_grad():
                out = node.target(*args, **kwargs)
        except Exception:
            return None
        return out if isinstance(out, torch.Tensor) and out.numel() == 1 else None

    def learned(self, node: fx.Node) -> bool:
        """True when ``node`` is computed from an nn.Parameter (not only buffers)."""
        seen, stack = set(), [node]
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if n.op == "get_attr":
                try:
                    if id(ir.get_attr_value(self.gm, n)) in self.params:
                        return True
                except AttributeError:
                    pass
            stack.extend(n.all_input_nodes)
        return False
