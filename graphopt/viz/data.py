"""The viewer's data: a JSON-ready dict built from a graph (and an optimization).

:func:`build_view_data` is what every renderer (HTML, DOT, Model Explorer)
starts from. Its shape (``version`` 1)::

    {"version": 1, "title": str, "cost_source": "graphopt.cost" | "estimate",
     "cost_target": roofline name | None, "profiled": bool,
     "views": {"after": GRAPH, "before": GRAPH (only with diff)},
     "rewrites": [REWRITE], "summary": {...}}

    GRAPH = {"nodes": [NODE], "groups": [GROUP], "sites": [SITE], "totals": {...}}
    NODE  = {"id", "name", "op", "kind", "target", "g" (group id), "src" (source line), "aux" (guard/assert),
             "shape", "dtype", "in" (input node ids), "cost": {flops, bytes_read,
             bytes_written, intensity, bound, predicted_s, measured_s}, "prec",
             "diff": "added" | "removed", "match" (name in the other view), "rw" (rewrite ids)}
    GROUP = {"id", "parent", "path" (module path), "key" (unique: module call or source line), "cls",
             "label", "kind": "root" | "module" | "line", "src" (line groups)}
    SITE  = {"kind": "attention" | "ffn" | "hot", "label", "nodes": [node ids], "detail"}
    REWRITE = {"pass", "status", "numerics", "notes", "declined", "sites": [{"module",
               "before": [names], "after": [names]}], ...}

Groups follow ``nn_module_stack`` (:func:`graphopt.ir.module_stack`); inside a
module, four or more nodes from one source line (a helper call such as
``create_causal_mask(...)``) form a ``line`` group of their own, so a module
opens to a readable handful of boxes. Parameters (``get_attr``) belong to the
module their name says (``transformer.h.0.attn.c_attn.weight``).
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx as fx

from graphopt import ir, meta
from graphopt.viz.costs import node_costs
from graphopt.viz.diff import NodeMatch, PassChange, match_nodes, pass_changes
from graphopt.viz.sites import Site, collect_sites
from graphopt.analysis import analyze

log = logging.getLogger(__name__)

VERSION = 1
#: a source line with at least this many nodes in one module becomes a group
LINE_GROUP_MIN_NODES = 4


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _shape_dtype(value: Any) -> tuple[Any, Any]:
    if isinstance(value, torch.Tensor):
        try:
            shape: Any = [int(s) for s in value.shape]
        except Exception:
            shape = [str(s) for s in value.shape]
        return shape, _dtype_name(value.dtype)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
        pairs = [_shape_dtype(v) for v in value]
        return [p[0] for p in pairs], [p[1] for p in pairs]
    return None, None


def precision_of(node: fx.Node) -> str | None:
    """The precision an op computes in: the one the precision pass gave it, else its output dtype."""
    given = node.meta.get(meta.PRECISION)
    if given not in (None, "fp32") and node.op == "call_function":  # a candidate kept in fp32 shows its dtype
        return str(given)
    val = node.meta.get("val")
    if isinstance(val, (list, tuple)):
        val = next((v for v in val if isinstance(v, torch.Tensor)), None)
    return _dtype_name(val.dtype) if isinstance(val, torch.Tensor) else None


class _Groups:
    """Builds the group tree: modules from nn_module_stack, then source-line groups."""

    def __init__(self, root_cls: str) -> None:
        self.groups: list[dict[str, Any]] = [
            {"id": 0, "parent": None, "path": "", "key": "", "cls": root_cls, "label": root_cls or "model",
             "kind": "root"}]
        self.by_path: dict[str, int] = {"": 0}  # module path -> its first call's group
        self.by_key: dict[str, int] = {"": 0}  # one group per module call ('pool', 'pool@1')

    def module(self, stack: list[tuple[str, str, str]]) -> int:
        """The group of the innermost module call in ``stack`` [(key, path, class)], created as needed."""
        gid = 0
        for key, path, cls in stack:
            if not path:
                if cls and not self.groups[0]["cls"]:
                    self.groups[0]["cls"] = self.groups[0]["label"] = cls
                continue
            if key not in self.by_key:
                parts = path.split(".")
                # 'transformer.h.0' -> 'h.0': a bare index says little on its own
                label = ".".join(parts[-2:]) if len(parts) > 1 and parts[-1].isdigit() else parts[-1]
                call = key.rsplit("@", 1)[1] if "@" in key else ""
                self.by_key[key] = len(self.groups)
                self.by_path.setdefault(path, len(self.groups))
                self.groups.append({"id": len(self.groups), "parent": gid, "path": path, "key": key, "cls": cls,
                                    "label": f"{label} (call {int(call) + 1})" if call.isdigit() else label,
                                    "kind": "module"})
            gid = self.by_key[key]
        return gid

    def line(self, parent: int, src: str, count: int) -> int:
        code = src.split(": ", 1)[1] if ": " in src else src
        label = code if len(code) <= 48 else code[:45] + "..."
        gid = len(self.groups)
        self.groups.append({"id": gid, "parent": parent, "path": self.groups[parent]["path"],
                            "key": f"{self.groups[parent]['key']}#{src}", "cls": f"{count} ops", "label": label,
                            "src": src, "kind": "line"})
        return gid


def module_calls(node: fx.Node) -> list[tuple[str, str, str]]:
    """[(call key, module path, class name)] from the outermost module call to the innermost.

    The key tells repeated calls of one module apart (``pool``, ``pool@1``):
    torch.export suffixes the ``nn_module_stack`` key of each further call.
    """
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for key, (path, cls) in zip(stack.keys(), ir.module_stack(node)):
        call = str(key).rsplit("@", 1)[1] if "@" in str(key) else ""
        out.append((f"{path}@{call}" if call else path, path, cls))
    return out


def _root_class(gm: fx.GraphModule) -> str:
    for node in gm.graph.nodes:
        for path, cls in ir.module_stack(node):
            if not path:
                return cls
    return ""


def _param_group(node: fx.Node, groups: _Groups, group_of: Mapping[str, int]) -> int:
    target = str(node.target)
    path = target.rsplit(".", 1)[0] if "." in target else ""
    if path in groups.by_path:
        return groups.by_path[path]
    users = [group_of[u.name] for u in node.users if u.name in group_of]
    return users[0] if users and len(set(users)) == 1 else 0


def assign_groups(gm: fx.GraphModule) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """``(groups, {node name: group id})`` for ``gm`` (see the module docstring)."""
    groups = _Groups(_root_class(gm))
    group_of: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_module", "call_method"):
            group_of[node.name] = groups.module(module_calls(node))
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            group_of[node.name] = _param_group(node, groups, group_of)
        elif node.name not in group_of:
            group_of[node.name] = 0
    # source-line groups
    has_children = Counter(g["parent"] for g in groups.groups if g["parent"] is not None)
    direct: dict[int, list[fx.Node]] = defaultdict(list)
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_module", "call_method"):
            direct[group_of[node.name]].append(node)
    for gid, nodes in list(direct.items()):
        by_line: dict[str, list[fx.Node]] = defaultdict(list)
        for node in nodes:
            src = ir.source_line(node)
            if src:
                by_line[src].append(node)
        for src, members in by_line.items():
            covers_all = len(members) == len(nodes) and not has_children[gid]
            if len(members) >= LINE_GROUP_MIN_NODES and not covers_all:
                line_gid = groups.line(gid, src, len(members))
                for node in members:
                    group_of[node.name] = line_gid
    return groups.groups, group_of


def _is_auxiliary(node: fx.Node) -> bool:
    """export's guard and assert nodes: no data flows out of them (hidden with the weights)."""
    if node.op == "call_module" and "guards" in str(node.target):
        return True
    return node.op == "call_function" and ir.op_name(node).startswith("aten._assert") and not node.users


def _short_cost(cost: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not cost:
        return None
    return {k: (round(v, 12) if isinstance(v, float) else v) for k, v in cost.items()}


def graph_view(gm: fx.GraphModule, *, analysis: Any = None) -> tuple[dict[str, Any], str]:
    """One graph's part of the view data (no diff or rewrite marks yet) and its cost source."""
    groups, group_of = assign_groups(gm)
    analysed = getattr(analysis, "gm", None)
    costs, cost_source = node_costs(gm, analysed if isinstance(analysed, fx.GraphModule) else None)
    nodes = list(gm.graph.nodes)
    index = {n.name: i for i, n in enumerate(nodes)}
    out_nodes = []
    for i, node in enumerate(nodes):
        shape, dtype = _shape_dtype(node.meta.get("val"))
        rec: dict[str, Any] = {
            "id": i, "name": node.name, "op": ir.op_name(node), "kind": node.op,
            "target": str(node.target) if node.op != "output" else "output", "g": group_of[node.name],
            "in": [index[p.name] for p in node.all_input_nodes if p.name in index],
        }
        src = ir.source_line(node)
        if src:
            rec["src"] = src
        if _is_auxiliary(node):
            rec["aux"] = 1
        if shape is not None:
            rec["shape"], rec["dtype"] = shape, dtype
        cost = _short_cost(costs.get(node.name))
        if cost:
            rec["cost"] = cost
        prec = precision_of(node)
        if prec:
            rec["prec"] = prec
        out_nodes.append(rec)
    sites = collect_sites(gm, analysis, costs)
    totals = {key: sum(float(c.get(key, 0.0)) for c in costs.values() if isinstance(c.get(key), float))
              for key in ("flops", "bytes_read", "bytes_written", "predicted_s", "measured_s")}
    view = {
        "nodes": out_nodes,
        "groups": groups,
        "sites": [_site_record(s, index) for s in sites],
        "totals": totals,
    }
    return view, cost_source


def _site_record(site: Site, index: Mapping[str, int]) -> dict[str, Any]:
    rec = site.to_dict()
    rec["nodes"] = [index[n] for n in site.nodes if n in index]
    return rec


def _numerics(record: Any) -> dict[str, Any] | None:
    num = getattr(record, "numerics", None)
    if num is None:
        return None
    return {"ok": bool(num.ok), "summary": num.summary(), "reason": num.reason,
            "inputs_checked": num.inputs_checked, "max_abs": num.max_abs, "rel_l2": num.rel_l2, "top1": num.top1}


def _module_of(names: list[str], gm: fx.GraphModule) -> dict[str, list[str]]:
    by_name = {n.name: n for n in gm.graph.nodes}
    out: dict[str, list[str]] = defaultdict(list)
    for name in names:
        node = by_name.get(name)
        if node is None:
            continue
        if node.op == "get_attr":  # a constant belongs to the site of the op that reads it
            first_user = next(iter(node.users), None)
            module = ir.module_path(first_user) if first_user is not None else str(node.target).rpartition(".")[0]
        else:
            module = ir.module_path(node)
        out[module].append(name)
    return out


def rewrites(report: Any, before: fx.GraphModule | None, after: fx.GraphModule, match: NodeMatch | None,
             changes: list[PassChange]) -> list[dict[str, Any]]:
    """One record per pass of the report, with the sites it rewrote (module -> before/after nodes)."""
    out = []
    by_pass = {c.name: c for c in changes}
    removed_left = set(match.removed) if match else set()
    after_names = {n.name for n in after.graph.nodes}
    before_names = {n.name for n in before.graph.nodes} if before is not None else set()
    for record in getattr(report, "passes", []) or []:
        if record.status == "analysis":
            continue
        rec: dict[str, Any] = {
            "pass": record.name, "status": record.status, "seconds": record.seconds,
            "nodes_before": record.nodes_before, "nodes_after": record.nodes_after,
            "notes": list(record.notes)[:20], "error": record.error,
            "declined": [{"site": d.site, "reason": d.reason} for d in record.declined[:50]],
            "declined_total": len(record.declined), "numerics": _numerics(record), "sites": [],
        }
        if record.status == "applied":
            change = by_pass.get(record.name)
            if change is not None:
                added = [n for n in change.added + change.rewritten if n in after_names]
                removed = [n for n in change.removed if match is not None and n in removed_left]
                removed += [n for n in change.rewritten if n in before_names]
            else:
                added = [n for n in record.nodes_involved if n in after_names]
                removed = []
            a_mod = _module_of(added, after)
            b_mod = _module_of(removed, before) if before is not None else {}
            if change is None and before is not None and match is not None:
                # without a history: removed nodes in the same modules as the pass's nodes
                b_mod = {m: ns for m, ns in _module_of(sorted(removed_left), before).items() if m in a_mod}
            for module in sorted(set(a_mod) | set(b_mod)):
                rec["sites"].append({"module": module, "before": b_mod.get(module, []), "after": a_mod.get(module, [])})
        out.append(rec)
    return out


def _subject_parts(subject: Any) -> tuple[fx.GraphModule, fx.GraphModule | None, Any, tuple[Any, ...] | None]:
    """(graph to show, captured graph or None, report or None, example args or None)."""
    if isinstance(subject, fx.GraphModule):
        return subject, None, None, None
    if isinstance(subject, torch.export.ExportedProgram):
        return subject.module(), None, None, None
    module = getattr(subject, "module", None)
    captured = getattr(subject, "captured", None)
    report = getattr(subject, "report", None)
    if isinstance(module, fx.GraphModule) and captured is not None:  # an OptimizeResult
        return module, captured.module, report, tuple(getattr(captured, "args", ()) or ())
    if isinstance(module, fx.GraphModule):  # a Captured
        return module, None, None, tuple(getattr(subject, "args", ()) or ())
    raise TypeError(
        f"cannot visualize a {type(subject).__name__}; give an OptimizeResult (graphopt.optimize), "
        "a Captured (graphopt.capture), an ExportedProgram or an fx.GraphModule")


def _auto_analysis(gm: fx.GraphModule, args: tuple[Any, ...] | None) -> Any:
    """:func:`graphopt.analysis.analyze` of ``gm`` (annotates ``meta["cost"]``); None when it fails."""
    try:
        return analyze(gm, args)
    except Exception as exc:  # the viewer still works from estimates
        log.warning("analysis failed, the viewer uses estimated costs: %s", exc)
        return None


def build_view_data(subject: Any, *, diff: bool | None = None, analysis: Any = None,
                    title: str | None = None) -> dict[str, Any]:
    """The viewer's data for ``subject`` (see the module docstring).

    ``subject``: an :class:`graphopt.OptimizeResult`, a :class:`graphopt.Captured`,
    an ``ExportedProgram`` or an ``fx.GraphModule``. ``diff`` adds the captured
    graph as the "before" view (default: on for an OptimizeResult). ``analysis``:
    an analysis of the graph shown (:func:`graphopt.analysis.analyze`); None runs
    it when it is available, ``False`` skips it.
    """
    gm, before_gm, report, args = _subject_parts(subject)
    if diff is None:
        diff = before_gm is not None
    if diff and before_gm is None:
        raise ValueError("a before/after view needs an OptimizeResult (graphopt.optimize(...)); "
                         "got a single graph, so call visualize(..., diff=False)")
    if analysis is None:
        analysis = _auto_analysis(gm, args)
    elif analysis is False:
        analysis = None
    after_view, cost_source = graph_view(gm, analysis=analysis)
    target = getattr(analysis, "target", None)
    views: dict[str, Any] = {"after": after_view}
    match = None
    if diff and before_gm is not None:
        before_analysis = _auto_analysis(before_gm, args) if analysis is not None else None
        before_view, _ = graph_view(before_gm, analysis=before_analysis)
        match = match_nodes(before_gm, gm)
        _mark_diff(before_view, after_view, match)
        views["before"] = before_view
    changes = pass_changes(subject)
    rw = rewrites(report, before_gm if diff else None, gm, match, changes) if report is not None else []
    _mark_rewrites(views, rw)
    model = getattr(report, "model", "") if report is not None else ""
    summary: dict[str, Any] = {"nodes": len(after_view["nodes"])}
    if report is not None:
        summary.update({"capture_route": report.capture_route, "nodes_before": report.nodes_before,
                        "nodes_after": report.nodes_after, "total_seconds": report.total_seconds,
                        "final_numerics": report.final_numerics.summary() if report.final_numerics else None,
                        "final_ok": report.final_numerics.ok if report.final_numerics else None})
    if match is not None:
        summary.update({"removed": len(match.removed), "added": len(match.added)})
    return {
        "version": VERSION,
        "title": title or model or after_view["groups"][0]["label"],
        "cost_source": cost_source,
        "cost_target": getattr(target, "name", None),
        "profiled": bool(getattr(analysis, "profiled", False)),
        "views": views,
        "rewrites": rw,
        "summary": summary,
    }


def _mark_diff(before: dict[str, Any], after: dict[str, Any], match: NodeMatch) -> None:
    removed, added = set(match.removed), set(match.added)
    back = {a: b for b, a in match.pairs.items()}
    for rec in before["nodes"]:
        if rec["name"] in removed:
            rec["diff"] = "removed"
        elif match.pairs.get(rec["name"], rec["name"]) != rec["name"]:
            rec["match"] = match.pairs[rec["name"]]
    for rec in after["nodes"]:
        if rec["name"] in added:
            rec["diff"] = "added"
        elif back.get(rec["name"], rec["name"]) != rec["name"]:
            rec["match"] = back[rec["name"]]


def _mark_rewrites(views: dict[str, Any], rw: list[dict[str, Any]]) -> None:
    by_name = {side: {n["name"]: n for n in view["nodes"]} for side, view in views.items()}
    for i, rec in enumerate(rw):
        for site in rec["sites"]:
            for side in ("after", "before"):
                for name in site[side]:
                    node = by_name.get(side, {}).get(name)
                    if node is not None and i not in node.setdefault("rw", []):
                        node["rw"].append(i)
