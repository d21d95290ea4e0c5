"""Activation memory: liveness over the node order, and a measured peak beside it.

:func:`peak_memory` walks the graph in its execution order (the order a
GraphModule's generated code runs it: each value is freed after its last
use). Every node that allocates owns a *storage*; views and other aliasing
ops (:func:`graphopt.cost.alias_source`: ``view``, ``transpose``, ``split``
and its ``getitem``\\ s, eval ``dropout``, ``contiguous`` of a contiguous
tensor, ...) share their base's storage and are not counted twice. A storage
is live from the node that allocates it to the last node that uses it or any
view of it; graph outputs stay live to the end. ``timeline[i]`` is the sum of
live activation storages while node ``i`` runs (its inputs and its output
both live), and the peak is its maximum.

Parameters and buffers (``get_attr``) and the model's inputs (placeholders)
are not activations: they are reported separately (``parameter_bytes``,
``input_bytes``), and views of them cost nothing.

What liveness does not see: scratch memory inside a kernel (e.g. the packed
weights of a oneDNN matmul, a softmax's temporaries) and allocator rounding.
:func:`graphopt.target.measure_peak` measures what torch really allocates
while the graph runs (``analyze(profile=True)`` puts it beside the prediction).
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from graphopt.cost import alias_source, storage_bytes, tensors_in, val_of

log = logging.getLogger(__name__)

StorageKey = tuple[str, int]


@dataclass
class Storage:
    """One allocation: which node made it, how big, when it lives."""

    owner: fx.Node
    index: int
    nbytes: int
    kind: str  # 'activation' | 'input' | 'parameter'
    born: int
    last_use: int


@dataclass
class MemoryProfile:
    """Predicted activation memory of a graph.

    ``peak_bytes`` at ``peak_node``; ``live_at_peak``: the nodes owning the
    storages live then (largest first); ``timeline[i]``: live activation bytes
    while the i-th node (graph order) runs. ``measured_peak_bytes`` and
    ``measured_method`` are filled by :func:`graphopt.target.measure_peak` when asked.
    """

    peak_bytes: int
    peak_node: fx.Node | None
    live_at_peak: list[fx.Node]
    timeline: list[int]
    parameter_bytes: int = 0
    input_bytes: int = 0
    storages: list[Storage] = field(default_factory=list, repr=False)
    measured_peak_bytes: int | None = None
    measured_method: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "peak_bytes": self.peak_bytes,
            "peak_node": self.peak_node.name if self.peak_node is not None else None,
            "live_at_peak": [n.name for n in self.live_at_peak],
            "parameter_bytes": self.parameter_bytes,
            "input_bytes": self.input_bytes,
            "measured_peak_bytes": self.measured_peak_bytes,
            "measured_method": self.measured_method,
        }


def storages_of(gm: fx.GraphModule) -> tuple[dict[str, list[StorageKey]], dict[StorageKey, Storage]]:
    """Map each node to the storage(s) its value lives in, and describe each storage.

    Returns ``(keys_by_node, storages)``; a key is ``(owner node name, output index)``.
    """
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    keys: dict[str, list[StorageKey]] = {}
    storages: dict[StorageKey, Storage] = {}
    for node in gm.graph.nodes:
        i = order[node]
        val = val_of(node)
        if node.op in ("placeholder", "get_attr"):
            kind = "input" if node.op == "placeholder" else "parameter"
            ts = tensors_in(val) if node.op == "placeholder" else _attr_tensors(gm, node)
            keys[node.name] = []
            for j, t in enumerate(ts):
                key = (node.name, j)
                storages[key] = Storage(node, j, storage_bytes(t), kind, i, i)
                keys[node.name].append(key)
            continue
        if node.op != "call_function":
            keys[node.name] = []
            continue
        if node.target is operator.getitem and isinstance(node.args[0], fx.Node):
            src, idx = node.args[0], node.args[1]
            src_keys = keys.get(src.name, [])
            if alias_source(src) is not None:  # getitem of a split: the split's base
                keys[node.name] = list(src_keys)
            elif isinstance(idx, int) and (src.name, idx) in storages:
                keys[node.name] = [(src.name, idx)]
            else:
                keys[node.name] = []
            continue
        src = alias_source(node)
        if src is not None:
            keys[node.name] = list(keys.get(src.name, []))
            continue
        if isinstance(val, torch.Tensor):
            key = (node.name, 0)
            storages[key] = Storage(node, 0, storage_bytes(val), "activation", i, i)
            keys[node.name] = [key]
        elif isinstance(val, (list, tuple)):
            keys[node.name] = []
            for j, t in enumerate(val):
                if isinstance(t, torch.Tensor):
                    key = (node.name, j)
                    storages[key] = Storage(node, j, storage_bytes(t), "activation", i, i)
                    keys[node.name].append(key)
        else:
            keys[node.name] = []
    end = len(order)
    for node in gm.graph.nodes:
        i = order[node]
        for inp in node.all_input_nodes:
            for key in keys.get(inp.name, []):
                st = storages[key]
                st.last_use = max(st.last_use, end if node.op == "output" else i)
    return keys, storages


def _attr_tensors(gm: fx.GraphModule, node: fx.Node) -> list[torch.Tensor]:
    try:
        obj: Any = gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part)
    except AttributeError:
        return tensors_in(val_of(node))
    return [obj] if isinstance(obj, torch.Tensor) else tensors_in(val_of(node))


def peak_memory(gm: fx.GraphModule) -> MemoryProfile:
    """Predicted peak activation memory of ``gm`` by liveness over its node order.

    >>> import torch, graphopt
    >>> from graphopt.memory import peak_memory
    >>> m = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 256))
    >>> gm = graphopt.capture(m, (torch.randn(64, 256),)).module
    >>> peak_memory(gm).peak_bytes   # linear's and relu's 64x1024 fp32 outputs
    524288
    """
    nodes = list(gm.graph.nodes)
    _keys, storages = storages_of(gm)
    n = len(nodes)
    delta = [0] * (n + 2)
    for st in storages.values():
        if st.kind != "activation":
            continue
        delta[st.born] += st.nbytes
        delta[min(st.last_use, n) + 1] -= st.nbytes
    timeline, live = [], 0
    for i in range(n):
        live += delta[i]
        timeline.append(live)
    peak_i = max(range(n), key=lambda i: timeline[i]) if n else 0
    peak = timeline[peak_i] if n else 0
    live_st = sorted((st for st in storages.values()
                      if st.kind == "activation" and st.born <= peak_i <= st.last_use),
                     key=lambda st: -st.nbytes)
    seen: set[str] = set()
    live_nodes = []
    for st in live_st:
        if st.owner.name not in seen:
            seen.add(st.owner.name)
            live_nodes.append(st.owner)
    params = _unique_bytes(gm, [st for st in storages.values() if st.kind == "parameter"])
    inputs = sum(st.nbytes for st in storages.values() if st.kind == "input")
    return MemoryProfile(peak, nodes[peak_i] if n else None, live_nodes, timeline, params, inputs,
                         list(storages.values()))


def _unique_bytes(gm: fx.GraphModule, storages: list[Storage]) -> int:
    """Bytes of distinct parameter storages (tied weights count once)."""
    seen: set[Any] = set()
    total = 0
    for st in storages:
        ts = _attr_tensors(gm, st.owner)
        t = ts[st.index] if st.index < len(ts) else None
        ident: Any = (st.owner.name, st.index)
        if isinstance(t, torch.Tensor) and not isinstance(t, torch._subclasses.FakeTensor):
            try:
                ident = (t.untyped_storage().data_ptr(), t.storage_offset())
            except Exception:
                pass
        if ident in seen:
            continue
        seen.add(ident)
        total += st.nbytes
    return total
