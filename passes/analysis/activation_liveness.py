"""Activation-memory liveness over node order: the predicted peak and what is live at it.

Implements the ``MemoryProfile(peak_bytes, peak_node, live_at_peak, timeline)``
contract of ``graphopt/memory.py`` (written on the analysis branch) so the
blocked-operator planner can run before that lands; :func:`memory_profile`
prefers ``graphopt.memory`` when it provides ``memory_profile``.

Model (what the FX interpreter / generated code does): nodes run in graph
order; a value is allocated when its node runs and freed after its last user
ran. Views and in-place results share their base's storage (read from the
fake tensors' storages in ``meta["val"]``), so a storage lives as long as any
alias is used. Parameters, buffers (``get_attr``) and inputs are resident and
not counted; graph outputs live to the end. Blocked operators add their
working memory while they run (:func:`graphopt.ops.workspace.workspace_bytes`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree

from graphopt.ops.workspace import workspace_bytes

__all__ = ["MemoryProfile", "memory_profile", "activation_profile"]


@dataclass
class MemoryProfile:
    """Predicted activation memory of a graph.

    ``peak_bytes``: the largest live total; ``peak_node``: the node running
    then; ``live_at_peak``: ``[(node that allocated it, bytes)]`` for every
    storage live at the peak, largest first; ``timeline``: ``[(node name,
    live bytes while it runs)]`` in graph order.
    """

    peak_bytes: int
    peak_node: fx.Node | None
    live_at_peak: list[tuple[fx.Node, int]] = field(default_factory=list)
    timeline: list[tuple[str, int]] = field(default_factory=list)


def _tensors(val: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(val) if isinstance(t, torch.Tensor)]


def _storage_key(t: torch.Tensor) -> Any:
    try:
        return StorageWeakRef(t.untyped_storage())
    except Exception:  # tensors without storage (sparse, symbolic): count each on its own
        return ("tensor", id(t))


def _storage_bytes(t: torch.Tensor) -> int:
    try:
        return int(t.untyped_storage().nbytes())
    except Exception:
        try:
            return int(t.numel() * t.element_size())
        except Exception:  # symbolic sizes
            return 0


def activation_profile(gm: fx.GraphModule) -> MemoryProfile:
    """Liveness of activation storages over ``gm``'s node order (needs ``meta["val"]``)."""
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    end = len(nodes) - 1
    alloc: dict[Any, int] = {}
    size: dict[Any, int] = {}
    owner: dict[Any, fx.Node] = {}
    resident: set[Any] = set()
    keys_of: dict[fx.Node, list[Any]] = {}
    for i, node in enumerate(nodes):
        keys = []
        for t in _tensors(node.meta.get("val")):
            key = _storage_key(t)
            keys.append(key)
            if key in alloc or key in resident:
                continue
            if node.op in ("placeholder", "get_attr"):
                resident.add(key)
                continue
            alloc[key], size[key], owner[key] = i, _storage_bytes(t), node
        keys_of[node] = keys
    last_use = dict(alloc)
    for node in nodes:
        at = end if node.op == "output" else index[node]
        for inp in node.all_input_nodes:
            for key in keys_of.get(inp, ()):
                if key in last_use and last_use[key] < at:
                    last_use[key] = at
    delta = [0] * (len(nodes) + 1)
    for key, start in alloc.items():
        delta[start] += size[key]
        delta[last_use[key] + 1] -= size[key]
    live, timeline = 0, []
    peak, peak_i = -1, 0
    for i, node in enumerate(nodes):
        live += delta[i]
        now = live + workspace_bytes(node)
        timeline.append((node.name, now))
        if now > peak:
            peak, peak_i = now, i
    live_at_peak = sorted(
        ((owner[k], size[k]) for k, s in alloc.items() if s <= peak_i <= last_use[k]),
        key=lambda item: -item[1],
    )
    return MemoryProfile(max(peak, 0), nodes[peak_i] if nodes else None, live_at_peak, timeline)


def memory_profile(gm: fx.GraphModule) -> MemoryProfile:
    """The graph's :class:`MemoryProfile`: ``graphopt.memory``'s when it exists, else :func:`activation_profile`.

    Blocked operators' working memory is added to the analysis' figure when it
    does not count it itself.
    """
    try:
        from graphopt import memory as shared_memory  # the analysis branch's liveness
    except ImportError:
        return activation_profile(gm)
    profile_fn = getattr(shared_memory, "memory_profile", None)
    if profile_fn is None:
        return activation_profile(gm)
    shared = profile_fn(gm)
    ours = activation_profile(gm)
    # the shared analysis may not know the blocked operators' working memory: keep the larger estimate
    return ours if ours.peak_bytes > shared.peak_bytes else shared
