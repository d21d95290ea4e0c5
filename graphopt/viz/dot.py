"""Render the viewer's data as Graphviz DOT: one cluster per module, nodes coloured by cost.

``dot -Tsvg graph.dot -o graph.svg`` draws it. Parameters and constants
(``get_attr``) and export's guard/assert nodes are left out (they would double
the node count); each node's
label is its op, name and shape; the fill is its share of the ``metric``
(``time``, ``bytes``, ``flops``) or its arithmetic intensity. Attention, FFN
and hot-matmul sites get a coloured border; nodes added by the optimization a
bold green one. Every string is escaped for DOT's quoted strings.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from graphopt.viz.model_explorer import metric_values

_HEAT = ["#f4f1f8", "#fde9c9", "#fdcc8a", "#fc8d59", "#e34a33", "#b30000"]
_SITE_COLOURS = {"attention": "#7048e8", "ffn": "#0b7285", "hot": "#d9480f"}


def dot_string(text: Any) -> str:
    """``text`` as a DOT quoted string (backslashes, quotes and newlines escaped)."""
    s = str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\r", "").replace("\n", "\\n")
    return f'"{s}"'


def _heat(t: float) -> str:
    t = max(0.0, min(1.0, t))
    p = t * (len(_HEAT) - 1)
    i = min(int(p), len(_HEAT) - 2)
    f = p - i
    a, b = int(_HEAT[i][1:], 16), int(_HEAT[i + 1][1:], 16)
    rgb = [round(((a >> s) & 255) * (1 - f) + ((b >> s) & 255) * f) for s in (16, 8, 0)]
    return "#%02x%02x%02x" % tuple(rgb)


def _shape(node: dict[str, Any]) -> str:
    shape = node.get("shape")
    if not shape:
        return ""
    if shape and isinstance(shape[0], list):
        return " ".join("[" + "x".join(map(str, s)) + "]" for s in shape)
    return "[" + "x".join(map(str, shape)) + "]"


def render_dot(data: dict[str, Any], *, metric: str = "time") -> str:
    """DOT source for the "after" view of the data from :func:`graphopt.viz.data.build_view_data`."""
    view = data["views"]["after"]
    nodes = [n for n in view["nodes"] if n["kind"] != "get_attr" and not n.get("aux")]
    shown = {n["id"] for n in nodes}
    values = metric_values(view, metric)
    positive = [v for v in values.values() if v > 0]
    top = max(positive) if positive else 0.0
    site_kind: dict[int, str] = {}
    for site in view["sites"]:
        for i in site["nodes"]:
            site_kind.setdefault(i, site["kind"])
    groups = view["groups"]
    children: dict[int, list[int]] = defaultdict(list)
    for g in groups:
        if g["parent"] is not None:
            children[g["parent"]].append(g["id"])
    members: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for n in nodes:
        members[n["g"]].append(n)

    def node_line(n: dict[str, Any]) -> str:
        op = str(n["op"]).removeprefix("aten.")
        label = "\n".join(x for x in (op, n["name"] if n["name"] != op else "", _shape(n)) if x)
        attrs = [f"label={dot_string(label)}", "style=\"filled,rounded\"", "shape=box"]
        v = values.get(n["name"])
        if v is not None and top > 0:
            scaled = math.log1p(v) / math.log1p(top) if metric == "intensity" else math.sqrt(v / top)
            attrs.append(f"fillcolor={dot_string(_heat(scaled))}")
        else:
            attrs.append('fillcolor="#eceef2"')
        if n.get("diff") == "added":
            attrs += ['color="#1a7f37"', "penwidth=3"]
        elif n["id"] in site_kind:
            attrs += [f"color={dot_string(_SITE_COLOURS.get(site_kind[n['id']], '#333333'))}", "penwidth=2.5"]
        tooltip = f"{n['name']}: {n['op']}" + (f"\n{n['src']}" if n.get("src") else "")
        attrs.append(f"tooltip={dot_string(tooltip)}")
        return f"  n{n['id']} [{', '.join(attrs)}];"

    lines = [f"digraph {dot_string(data.get('title') or 'graph')} {{",
             "  rankdir=TB; compound=true; fontname=\"Helvetica\";",
             "  node [fontname=\"Helvetica\", fontsize=10]; edge [color=\"#9aa3b2\"];",
             f"  label={dot_string(str(data.get('title', '')) + ' (colour: ' + metric + ')')}; labelloc=t;"]

    def emit(gid: int, indent: str) -> None:
        for n in members.get(gid, []):
            lines.append(indent + node_line(n).strip())
        for cid in children.get(gid, []):
            g = groups[cid]
            label = g["label"] if g["kind"] == "line" else f"{g['path']} ({g['cls']})"
            lines.append(f"{indent}subgraph cluster_{cid} {{")
            lines.append(f"{indent}  label={dot_string(label)}; style=\"rounded,dashed\"; color=\"#aab3c2\";")
            emit(cid, indent + "  ")
            lines.append(f"{indent}}}")

    emit(0, "  ")
    for n in nodes:
        for i in n["in"]:
            if i in shown:
                lines.append(f"  n{i} -> n{n['id']};")
    lines.append("}")
    return "\n".join(lines) + "\n"
