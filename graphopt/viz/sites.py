"""The sites the viewer marks: attention, FFN chains and hot matmuls.

They come from an analysis (:func:`graphopt.analysis.analyze`: its
``attention_sites``, ``ffn_chains`` and ``hot_matmuls``), read by attribute
name so any object (or dict) with those lists works; each entry names its
nodes (fx nodes, names, or objects with ``nodes`` / ``node`` / ``name``). Of
the hot matmuls, the first ``analysis.top`` (10) with at least
:data:`HOT_MIN_SHARE` of the time are marked.

Without an analysis: attention sites from
:func:`graphopt.passes.analysis.sites.find_attention_sites`, hot
matmuls from the node costs (the matmul-family nodes with the largest share
of predicted time), and no FFN chains.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from graphopt.passes.analysis.sites import find_attention_sites

log = logging.getLogger(__name__)

#: (attribute of an analysis, site kind shown by the viewer)
SITE_KINDS = (("attention_sites", "attention"), ("ffn_chains", "ffn"), ("hot_matmuls", "hot"))
#: a matmul is marked hot from this share of the graph's time
HOT_MIN_SHARE = 0.01

_MATMUL_NAMES = ("mm", "addmm", "bmm", "matmul", "linear", "baddbmm", "conv", "convolution",
                 "scaled_dot_product_attention")


@dataclass
class Site:
    """One marked site: its kind, a short label, its node names and details."""

    kind: str
    label: str
    nodes: list[str]
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "label": self.label, "nodes": list(self.nodes), "detail": dict(self.detail)}


def node_names(item: Any) -> list[str]:
    """Names of the nodes an analysis entry refers to (see the module docstring)."""
    if isinstance(item, fx.Node):
        return [item.name]
    if isinstance(item, str):
        return [item]
    if isinstance(item, Mapping):
        for key in ("nodes", "node", "name"):
            if key in item:
                return _flatten_names(item[key])
        return []
    for attr in ("nodes", "node"):
        value = getattr(item, attr, None)
        if value is not None:
            return _flatten_names(value)
    name = getattr(item, "name", None)
    return [name] if isinstance(name, str) else []


def _flatten_names(value: Any) -> list[str]:
    if isinstance(value, (fx.Node, str)):
        return node_names(value)
    if isinstance(value, Iterable):
        out: list[str] = []
        for v in value:
            out += node_names(v)
        return out
    return []


def plain_detail(item: Any) -> dict[str, Any]:
    """JSON-safe scalar fields of an analysis entry (for the details panel)."""
    raw: Any
    if hasattr(item, "to_dict"):
        try:
            raw = item.to_dict()
        except Exception:
            raw = {}
    elif isinstance(item, Mapping):
        raw = item
    else:
        raw = getattr(item, "__dict__", {})
    out: dict[str, Any] = {}
    for key, value in dict(raw).items():
        if key == "nodes" or str(key).startswith("_"):
            continue
        if isinstance(value, fx.Node):
            value = value.name
        if isinstance(value, (str, int, float, bool)) or value is None:
            out[str(key)] = value
        elif isinstance(value, (list, tuple)) and len(value) <= 16 and all(
                isinstance(v, (str, int, float, bool, fx.Node)) for v in value):
            out[str(key)] = [v.name if isinstance(v, fx.Node) else v for v in value]
    return out


def _label(kind: str, names: list[str], detail: Mapping[str, Any]) -> str:
    anchor = detail.get("softmax") or detail.get("name") or detail.get("node") or (names[0] if names else "")
    return f"{kind}: {anchor}" if anchor else kind


def sites_from_analysis(analysis: Any, known: set[str]) -> list[Site]:
    """The sites an analysis object lists, restricted to nodes of this graph."""
    sites = []
    top = analysis.get("top", 10) if isinstance(analysis, Mapping) else getattr(analysis, "top", 10)
    for attr, kind in SITE_KINDS:
        items = analysis.get(attr) if isinstance(analysis, Mapping) else getattr(analysis, attr, None)
        items = list(items or ())
        if kind == "hot":
            items = [h for h in items[:top] if _share(h) is None or _share(h) >= HOT_MIN_SHARE]
        for item in items:
            names = [n for n in node_names(item) if n in known]
            if not names:
                continue
            detail = plain_detail(item)
            label = _label(kind, names, detail)
            if kind == "hot" and _share(item) is not None:
                label += f" ({_share(item):.1%} of the time)"
            sites.append(Site(kind, label, names, detail))
    return sites


def _share(item: Any) -> float | None:
    share = item.get("share") if isinstance(item, Mapping) else getattr(item, "share", None)
    return float(share) if isinstance(share, (int, float)) else None


def hot_matmuls(gm: fx.GraphModule, costs: Mapping[str, Mapping[str, Any]], *, top: int = 8,
                min_share: float = 0.02) -> list[Site]:
    """The matmul-family nodes with the largest share of predicted time."""
    total = sum(float(c.get("predicted_s", 0.0)) for c in costs.values())
    if total <= 0:
        return []
    ranked = []
    for node in gm.graph.nodes:
        op = str(getattr(node.target, "__name__", node.target)).split(".")[0]
        if node.op != "call_function" or op not in _MATMUL_NAMES or node.name not in costs:
            continue
        share = float(costs[node.name].get("predicted_s", 0.0)) / total
        if share >= min_share:
            ranked.append((share, node.name))
    ranked.sort(reverse=True)
    return [Site("hot", f"hot: {name} ({share:.1%} of predicted time)", [name], {"share": round(share, 4)})
            for share, name in ranked[:top]]


def collect_sites(gm: fx.GraphModule, analysis: Any = None,
                  costs: Mapping[str, Mapping[str, Any]] | None = None) -> list[Site]:
    """Every site to mark in ``gm``: from ``analysis`` when given, else the fallbacks."""
    known = {n.name for n in gm.graph.nodes}
    if analysis is not None:
        sites = sites_from_analysis(analysis, known)
        if any(s.kind == "hot" for s in sites) or not costs:
            return sites
        return sites + hot_matmuls(gm, costs)
    sites: list[Site] = []
    try:
        for site in find_attention_sites(gm):
            detail = plain_detail(site)
            names = [n for n in node_names(site) if n in known]
            if names:
                sites.append(Site("attention", _label("attention", names, detail), names, detail))
    except Exception as exc:  # the viewer still renders without site markers
        log.warning("attention-site search failed, no attention markers: %s", exc)
    return sites + hot_matmuls(gm, costs or {})
