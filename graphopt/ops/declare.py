"""How a graphopt operator declares what the rest of graphopt needs to know about it.

Each operator module in :mod:`graphopt.ops` ends with its declarations::

    DECLARATIONS = (
        OpDeclaration(torch.ops.graphopt.my_op.default, cost=_cost, workspace=_workspace, onnx=_my_op_onnx),
    )

* ``cost(call) -> OpCost``: FLOPs, bytes read and written, and a cost
  category (:data:`graphopt.cost.CATEGORIES`), read by
  :func:`graphopt.cost.node_cost` (the analysis, the viewer's heatmap);
* ``workspace(call) -> int``: transient bytes the op allocates while it runs
  beyond its inputs and output, added to the predicted peak by the blocked
  planner's liveness;
* ``onnx``: the onnxscript translation handed to ``torch.onnx.export``.

``call`` is an :class:`OpCall`: the node's arguments *by schema name*, tensors
given as their fake values (``meta["val"]``), so a declaration never decodes
positions. The fake kernel is registered with torch.library's own
``register_fake`` beside the op. :mod:`graphopt.ops` lists the modules
(``OP_MODULES``) and gathers their declarations; nothing registers itself at
import time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

__all__ = ["OpCall", "OpCost", "OpDeclaration", "io_bytes", "io_cost", "linear_cost", "numel"]


def _val(arg: Any) -> Any:
    return arg.meta.get("val") if isinstance(arg, fx.Node) else arg


class OpCall:
    """One call of an operator in a graph: its arguments by schema name, its output value.

    ``call["q"]`` is the fake tensor (``meta["val"]``) of the node passed as
    ``q``, or the plain value of a non-tensor argument; defaults are filled
    in. ``call.tensor("bias")`` is the tensor or None.
    """

    def __init__(self, node: fx.Node) -> None:
        self.node = node
        self._args: dict[str, Any] = {}
        schema = node.target._schema  # an OpOverload's schema
        positional = list(node.args)
        for i, argument in enumerate(schema.arguments):
            if i < len(positional) and not argument.kwarg_only:
                self._args[argument.name] = _val(positional[i])
            elif argument.name in node.kwargs:
                self._args[argument.name] = _val(node.kwargs[argument.name])
            elif argument.has_default_value():
                self._args[argument.name] = argument.default_value

    def __getitem__(self, name: str) -> Any:
        return self._args[name]

    def tensor(self, name: str) -> torch.Tensor | None:
        """The fake tensor passed as ``name``, or None (an optional tensor left out, or no value known)."""
        value = self._args.get(name)
        return value if isinstance(value, torch.Tensor) else None

    @property
    def out(self) -> torch.Tensor | None:
        """The first output's fake tensor (None when unknown)."""
        value = self.node.meta.get("val")
        if isinstance(value, (tuple, list)):
            value = value[0] if value else None
        return value if isinstance(value, torch.Tensor) else None


def io_bytes(call: OpCall) -> tuple[int, int]:
    """(bytes of every tensor input, bytes of every tensor output): an op that reads and writes each once."""
    node = call.node
    read = sum(int(v.numel() * v.element_size()) for a in node.all_input_nodes
               if isinstance(v := a.meta.get("val"), torch.Tensor))
    out = node.meta.get("val")
    outs = out if isinstance(out, (tuple, list)) else [out]
    written = sum(int(t.numel() * t.element_size()) for t in outs if isinstance(t, torch.Tensor))
    return read, written


def numel(shape: Any) -> int:
    """Number of elements of a shape (a product of ints)."""
    return int(math.prod(int(s) for s in shape))


@dataclass(frozen=True)
class OpCost:
    """FLOPs and bytes of one call (:class:`graphopt.cost.NodeCost` is built from it)."""

    flops: int
    bytes_read: int
    bytes_written: int
    category: str = "custom"


def io_cost(call: OpCall, flops: int, category: str) -> OpCost:
    """``flops`` with the bytes of :func:`io_bytes` (the intermediates of a blocked op stay in tiles)."""
    read, written = io_bytes(call)
    return OpCost(int(flops), read, written, category)


def linear_cost(x: str, weight: str) -> Callable[[OpCall], OpCost]:
    """The cost of a linear layer ``x @ weight.T`` (``weight`` ``[N, K]``, any storage dtype): a
    linear's FLOPs, ``2 * rows * N * K``, as the fp32 linear it replaces counts; inputs read once."""

    def cost(call: OpCall) -> OpCost:
        xv, w = call.tensor(x), call.tensor(weight)
        flops = 0 if xv is None or w is None else 2 * numel(xv.shape[:-1]) * int(w.shape[0]) * int(xv.shape[-1])
        return io_cost(call, flops, "matmul")

    return cost


@dataclass(frozen=True)
class OpDeclaration:
    """What graphopt knows about one operator overload (see the module docstring)."""

    op: Any  # a torch OpOverload
    cost: Callable[[OpCall], OpCost] | None = None
    workspace: Callable[[OpCall], int] | None = None
    onnx: Callable[..., Any] | None = None
