"""Node data for Google's Model Explorer: overlay graphopt's costs on its graph view.

Model Explorer (``pip install ai-edge-model-explorer``) opens a ``.pt2``
program (``graphopt optimize`` writes ``model.pt2``) and colours its nodes
from a *node data* JSON file (``model-explorer model.pt2
--node_data_paths=costs.json``). Its format (``model_explorer/node_data_builder.py``)::

    {GRAPH_ID: {"results": {NODE_ID: {"value": number}}, "gradient": [{"stop": 0, "bgColor": ...}, ...]}}

For a PyTorch program the graph id is ``"graph"`` and node ids are the fx node
names, which graphopt keeps, so the overlay lands on the same nodes.
Values: ``time`` in microseconds (measured when known, else predicted),
``bytes`` read + written, ``flops``, or ``intensity`` (FLOP/byte).
"""

from __future__ import annotations

import json
from typing import Any

#: Model Explorer's graph id for a PyTorch ExportedProgram
GRAPH_ID = "graph"
METRICS = ("time", "bytes", "flops", "intensity")
_GRADIENT = [{"stop": 0, "bgColor": "#f4f1f8"}, {"stop": 0.5, "bgColor": "#fdcc8a"}, {"stop": 1, "bgColor": "#b30000"}]


def metric_values(view: dict[str, Any], metric: str) -> dict[str, float]:
    """{node name: value} of ``metric`` for the nodes of one view that have it."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    measured = any("measured_s" in (n.get("cost") or {}) for n in view["nodes"])
    out: dict[str, float] = {}
    for node in view["nodes"]:
        cost = node.get("cost") or {}
        if metric == "time":
            v = cost.get("measured_s" if measured else "predicted_s")
            v = v * 1e6 if isinstance(v, (int, float)) else None
        elif metric == "bytes":
            v = (cost.get("bytes_read") or 0.0) + (cost.get("bytes_written") or 0.0) if cost else None
        else:
            v = cost.get(metric)
        if isinstance(v, (int, float)):
            out[node["name"]] = float(v)
    return out


def node_data(data: dict[str, Any], *, metric: str = "time", graph_id: str = GRAPH_ID) -> dict[str, Any]:
    """The Model Explorer node-data dict for the "after" view of ``data``."""
    values = metric_values(data["views"]["after"], metric)
    return {graph_id: {"results": {name: {"value": value} for name, value in values.items()},
                       "gradient": list(_GRADIENT)}}


def render_node_data(data: dict[str, Any], *, metric: str = "time") -> str:
    """:func:`node_data` as JSON text."""
    return json.dumps(node_data(data, metric=metric), indent=1)
