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

__all__ = ["NodeBuilder", "fake_mode_of", "set_fake_val"]

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

    def __init__(self, gm: fx.GraphModule, anchor: fx.Node, fake_mode: Any = None,
                 val_cache: dict[Any, Any] | None = None, cache_key: Any = None) -> None:
        self.gm = gm
        self.anchor = anchor
        self.fake_mode = fake_mode if fake_mode is not None else fake_mode_of(gm)
        self.created: list[fx.Node] = []
        # Re-running the same rewrite on another copy of the graph creates the same nodes in the same
        # order with the same fake values: ``val_cache[(cache_key, i)]`` reuses them (fake dispatch is slow).
        self.val_cache = val_cache
        self.cache_key = cache_key

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
        if self.val_cache is None or self.cache_key is None:
            set_fake_val(node, self.fake_mode)
            return
        key = (self.cache_key, len(self.created))
        cached = self.val_cache.get(key)
        if cached is not None and cached[0] == (node.target, len(node.args)):
            node.meta["val"] = cached[1]
            if isinstance(cached[1], torch.Tensor):
                node.meta["tensor_meta"] = cached[2]
            return
        set_fake_val(node, self.fake_mode)
        self.val_cache[key] = ((node.target, len(node.args)), node.meta.get("val"), node.meta.get("tensor_meta"))


def set_fake_val(node: fx.Node, fake_mode: Any) -> None:
    """Compute ``node.meta["val"]`` from its arguments' fake values in ``fake_mode`` (no-op without one)."""
    if fake_mode is None:
        return
    args = fx.node.map_arg(node.args, lambda n: n.meta.get("val"))
    kwargs = fx.node.map_arg(node.kwargs, lambda n: n.meta.get("val"))
    with fake_mode:
        val = node.target(*args, **kwargs)
    node.meta["val"] = val
    if isinstance(val, torch.Tensor):
        node.meta["tensor_meta"] = fx.passes.shape_prop._extract_tensor_metadata(val)
