"""Per-node costs for the viewer: read ``node.meta[meta.COST]``, or estimate.

The cost model proper is :mod:`graphopt.cost` (its annotation pass writes a
``NodeCost`` into ``node.meta[meta.COST]``). This module only *reads* that, by
attribute name (``flops``, ``bytes_read``, ``bytes_written``, ``intensity``,
``bound``, ``predicted_s``, ``measured_s``), so the viewer works with any
object that has them, including a plain dict.

When a graph carries no costs at all (the analysis was not run, or
:mod:`graphopt.cost` is not installed), :func:`estimate_costs` gives a rough
fallback so the heatmap still says something: bytes are the tensors an op
reads and writes (view ops move nothing), FLOPs are counted for the matmul
family, convolutions and attention (elementwise ops: one per output element),
and the time is the roofline of a nominal CPU (:data:`NOMINAL_FLOPS`,
:data:`NOMINAL_BYTES_PER_S`). The viewer labels such figures "estimate".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx as fx

from graphopt import ir, meta
from graphopt.opsets import MATMUL_OPS

aten = torch.ops.aten

#: the nominal machine of the fallback estimate (a few CPU cores)
NOMINAL_FLOPS = 2e11
NOMINAL_BYTES_PER_S = 5e10

COST_FIELDS = ("flops", "bytes_read", "bytes_written", "intensity", "bound", "predicted_s", "measured_s")

_CONVS = {aten.conv2d.default, aten.conv1d.default, aten.conv3d.default, aten.convolution.default}
_FREE = {aten.embedding.default}


def read_cost(node: fx.Node) -> dict[str, Any] | None:
    """The cost fields of ``node.meta[meta.COST]`` as a dict, or None when it has none."""
    cost = node.meta.get(meta.COST)
    if cost is None:
        return None
    out: dict[str, Any] = {}
    for name in COST_FIELDS:
        value = cost.get(name) if isinstance(cost, Mapping) else getattr(cost, name, None)
        if value is None:
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(float(value)):
                out[name] = float(value)
        else:
            out[name] = str(getattr(value, "value", value))
    return out or None


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        try:
            return int(value.numel()) * value.element_size()
        except Exception:  # symbolic sizes
            return 0
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


def _numel(value: Any) -> int:
    try:
        return int(value.numel()) if isinstance(value, torch.Tensor) else 0
    except Exception:
        return 0


def _flops(node: fx.Node) -> float:
    out = node.meta.get("val")
    t = node.target
    if t in MATMUL_OPS:
        a = node.args[1] if t in (aten.addmm.default, aten.baddbmm.default) else node.args[0]
        shape = ir.shape_of(a)
        return 2.0 * _numel(out) * (shape[-1] if shape else 1)
    if t in _CONVS:
        w = ir.shape_of(node.args[1])
        return 2.0 * _numel(out) * (math.prod(w[1:]) if w else 1)
    if t == aten.scaled_dot_product_attention.default:
        q, k = ir.shape_of(node.args[0]), ir.shape_of(node.args[1])
        if q and k:
            return 4.0 * math.prod(q[:-1]) * k[-2] * q[-1]
        return 0.0
    if t in ir.VIEW_OPS or t in _FREE:
        return 0.0
    return float(_numel(out))


def estimate_cost(node: fx.Node) -> dict[str, Any] | None:
    """A rough cost of one node (see the module docstring), or None for non-ops."""
    if node.op != "call_function" or node.target in ir.VIEW_OPS:
        return None
    if not isinstance(node.meta.get("val"), (torch.Tensor, list, tuple)):
        return None
    read = sum(_nbytes(i.meta.get("val")) for i in node.all_input_nodes)
    written = _nbytes(node.meta.get("val"))
    if node.target == aten.embedding.default:  # reads the rows it gathers, not the table
        read = written + _nbytes(node.args[1].meta.get("val")) if isinstance(node.args[1], fx.Node) else written
    flops = _flops(node)
    moved = read + written
    t_compute, t_memory = flops / NOMINAL_FLOPS, moved / NOMINAL_BYTES_PER_S
    return {
        "flops": flops,
        "bytes_read": float(read),
        "bytes_written": float(written),
        "intensity": flops / moved if moved else 0.0,
        "bound": "compute" if t_compute > t_memory else "memory",
        "predicted_s": max(t_compute, t_memory),
    }


def node_costs(gm: fx.GraphModule, annotated_gm: fx.GraphModule | None = None
               ) -> tuple[dict[str, dict[str, Any]], str]:
    """``({node name: cost fields}, source)`` for every node that has a cost.

    ``source`` is ``"graphopt.cost"`` when the graph carries ``meta["cost"]``
    annotations, else ``"estimate"`` (the fallback above). ``annotated_gm``: a
    copy of the graph that an analysis annotated instead (same node names),
    read when ``gm`` itself has no annotations.
    """
    known = {n.name for n in gm.graph.nodes}
    for source in (gm, annotated_gm):
        if source is None:
            continue
        annotated = {n.name: c for n in source.graph.nodes if n.name in known and (c := read_cost(n)) is not None}
        if annotated:
            return annotated, "graphopt.cost"
    return {n.name: c for n in gm.graph.nodes if (c := estimate_cost(n)) is not None}, "estimate"
