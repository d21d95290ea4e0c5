"""graphopt's graph viewer: one self-contained HTML file, or DOT, or Model Explorer data.

>>> import torch, graphopt
>>> result = graphopt.optimize(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()), (torch.randn(2, 4),))
>>> graphopt.visualize(result, "graph.html")          # doctest: +SKIP
'graph.html'

* :mod:`graphopt.viz.data` builds the data every format starts from;
* :mod:`graphopt.viz.html` renders the interactive page (assets in ``assets/``);
* :mod:`graphopt.viz.dot` writes Graphviz, :mod:`graphopt.viz.model_explorer`
  node data for Google's Model Explorer.
"""

from __future__ import annotations

import os
from typing import Any

from graphopt.viz.data import build_view_data
from graphopt.viz.diff import PassHistory
from graphopt.viz.dot import render_dot
from graphopt.viz.html import render_html
from graphopt.viz.model_explorer import render_node_data
from graphopt.user_state import preserves_user_state

__all__ = ["FORMATS", "PassHistory", "render", "visualize"]

#: output formats of :func:`visualize`
FORMATS = ("html", "dot", "model-explorer")


def render(result_or_graph: Any, *, format: str = "html", diff: bool | None = None, analysis: Any = None,
           title: str | None = None, metric: str = "time") -> str:
    """The text :func:`visualize` writes (HTML page, DOT source or Model Explorer JSON)."""
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    if format == "model-explorer":
        diff = False if diff is None else diff
    data = build_view_data(result_or_graph, diff=diff, analysis=analysis, title=title)
    if format == "html":
        return render_html(data)
    if format == "dot":
        return render_dot(data, metric=metric)
    return render_node_data(data, metric=metric)


@preserves_user_state
def visualize(result_or_graph: Any, path: str | os.PathLike[str], *, format: str = "html",
              diff: bool | None = None, analysis: Any = None, title: str | None = None,
              metric: str = "time") -> str:
    """Write a view of a graph or an optimization to ``path``; return the path.

    ``result_or_graph``: an :class:`graphopt.OptimizeResult` (its optimized graph,
    with the captured graph as the "before" view), a :class:`graphopt.Captured`,
    an ``ExportedProgram`` or an ``fx.GraphModule``.

    ``format``: ``"html"`` (interactive, self-contained: cost heatmap, module
    groups, sites, rewrites, search, before/after), ``"dot"`` (Graphviz, one
    cluster per module) or ``"model-explorer"`` (node data JSON to overlay on
    the graph in Google's Model Explorer). ``diff``: show before/after
    (default: on for an OptimizeResult). ``analysis``: the graph's
    :func:`graphopt.analysis.analyze` result; None runs it when available,
    False skips it. ``metric`` (DOT and Model Explorer): ``time``, ``bytes``,
    ``flops`` or ``intensity``.
    """
    text = render(result_or_graph, format=format, diff=diff, analysis=analysis, title=title, metric=metric)
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    tmp = path + ".partial"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    return path
