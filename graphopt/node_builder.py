"""Insert nodes into a graph with ``meta["val"]`` computed on the spot.

A rewrite that needs to analyse its own result (liveness of a candidate plan,
say) cannot wait for :func:`graphopt.ir.refresh_meta` after the pass: each new
node's fake value is computed here from its arguments' fake values, in their
``FakeTensorMode``, so storages alias exactly as they will at run time.
Source metadata (``nn_module_stack``, ``stack_trace``) is copied from an
anchor node so reports and the viewer still place the new nodes.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

__all__ = ["NodeBuilder", "fake_mode_of"]

_SOURCE_META = ("nn_module_stack", "stack_trace", "source_fn_stack")


def fake_mode_of(gm: fx.GraphModule) -> Any:
    """The FakeTensorMode of the graph's ``meta["val"]`` tensors (None when there are none)."""
    for node in gm.graph.nodes:
        for t in pytree.tree_leaves(node.meta.get("val")):
            mode = getattr(t, "fake_mode", None)
            if mode is not None:
                return mode
    return None


class NodeBuilder:
    """Create ``call_function`` nodes before ``anchor`` with fake values and source metadata."""

    def __init__(self, gm: fx.GraphModule, anchor: fx.Node, fake_mode: Any = None) -> None:
        self.gm = gm
        self.anchor = anchor
        self.fake_mode = fake_mode if fake_mode is not None else fake_mode_of(gm)
        self.created: list[fx.Node] = []

    def call(self, target: Any, *args: Any, **kwargs: Any) -> fx.Node:
        with self.gm.graph.inserting_before(self.anchor):
            node = self.gm.graph.call_function(target, tuple(args), dict(kwargs))
        for key in _SOURCE_META:
            if key in self.anchor.meta:
                node.meta[key] = self.anchor.meta[key]
        self._set_val(node)
        self.created.append(node)
        return node

    def getitem(self, node: fx.Node, index: int) -> fx.Node:
        return self.call(operator.getitem, node, index)

    def _set_val(self, node: fx.Node) -> None:
        if self.fake_mode is None:
            return
        args = fx.node.map_arg(node.args, lambda n: n.meta.get("val"))
        kwargs = fx.node.map_arg(node.kwargs, lambda n: n.meta.get("val"))
        with self.fake_mode:
            val = node.target(*args, **kwargs)
        node.meta["val"] = val
        if isinstance(val, torch.Tensor):
            node.meta["tensor_meta"] = fx.passes.shape_prop._extract_tensor_metadata(val)
