"""Markdown rendering of a :class:`graphopt.report.Report` (``Report.to_markdown()``).

Sections: summary, passes (table), final check, declined sites, rolled-back
passes, then one section per ``report.extra`` entry -- ``extra["onnx"]`` (an
export recorded with :func:`graphopt.onnx.record_onnx_export`) gets its own layout (file, inputs and outputs,
ops, rewrites, the onnxruntime check and the speed comparison); any other
entry is shown as JSON.
"""

from __future__ import annotations

import json
from typing import Any


def describe_inputs(verification_inputs: dict[str, Any]) -> str:
    """One line: how many sets of each source, then the rule each rule-drawn input followed."""
    sets = verification_inputs.get("sets", [])
    counts = ", ".join(f"{sets.count(s)} {s}" for s in dict.fromkeys(sets))
    if verification_inputs.get("chained"):
        counts += " (the user-given ones one chain of steps over shared state)"
    rules = verification_inputs.get("rules", {})
    return counts + ("; rules: " + "; ".join(f"{k}: {v}" for k, v in rules.items()) if rules else "")


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return out


def _numerics_line(n: dict[str, Any] | None) -> str:
    if not n:
        return ""
    s = f"max_abs={n['max_abs']:.2e} rel_l2={n['rel_l2']:.2e}"
    if n.get("top1") is not None:
        s += f" top1={n['top1']:.4f}"
    return s


def report_to_markdown(report: Any) -> str:
    d = report.to_dict()
    lines = [f"# graphopt report{': ' + d['model'] if d['model'] else ''}", ""]
    lines += _table(["", ""], [
        ["capture", f"{d['capture_route']} ({d['capture_seconds']:.2f} s)"],
        *[["capture note", note] for note in d.get("capture_notes", [])],
        ["nodes", f"{d['nodes_before']} -> {d['nodes_after']}"],
        ["total time", f"{d['total_seconds']:.2f} s"],
    ])
    lines += ["", "## Passes", ""]
    rows = []
    for r in d["passes"]:
        notes = "; ".join(r["notes"][:3] + ([r["error"]] if r["error"] else []))
        if r["declined"]:
            notes += ("; " if notes else "") + f"{len(r['declined'])} declined"
        nodes = f"{r['nodes_before']} -> {r['nodes_after']}" if r["status"] != "analysis" else ""
        rows.append([r["name"], r["status"], nodes, f"{r['seconds'] * 1e3:.1f} ms",
                     _numerics_line(r["numerics"]), notes])
    lines += _table(["pass", "status", "nodes", "time", "numerics", "notes"], rows) if rows else ["(no passes)"]
    final = d["final_numerics"]
    if final:
        status = "ok" if final["ok"] else f"FAILED ({final['reason']})"
        lines += ["", f"**Final check against the original model:** {status}: {_numerics_line(final)} over "
                      f"{final['inputs_checked']} input sets."]
        if d.get("verification_inputs"):
            lines += ["", f"**Verification inputs:** {_cell(describe_inputs(d['verification_inputs']))}."]
    declined = [(r["name"], x) for r in d["passes"] for x in r["declined"]]
    if declined:
        lines += ["", "## Declined sites", ""]
        lines += _table(["pass", "site", "reason"], [[name, x["site"], x["reason"]] for name, x in declined])
    rolled = [r for r in d["passes"] if r["status"] in ("rolled back", "error")]
    if rolled:
        lines += ["", "## Rolled back", ""]
        for r in rolled:
            why = (r["numerics"] or {}).get("reason") or r["error"]
            lines.append(f"- **{r['name']}** ({r['status']}): {why}")
    for key, value in (d.get("extra") or {}).items():
        lines += [""] + (_onnx_section(value) if key == "onnx" else
                         [f"## {key}", "", "```json", json.dumps(value, indent=2, default=str), "```"])
    return "\n".join(lines) + "\n"


def _shape(shape: list[Any]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def _onnx_section(onnx: dict[str, Any]) -> list[str]:
    lines = ["## ONNX export", ""]
    rows = [["file", onnx["path"].rsplit("/", 1)[-1]], ["opset", onnx["opset"]], ["target", onnx["target"]],
            ["nodes", sum(onnx["op_counts"].values())]]
    if onnx.get("dynamic_axes"):
        rows.append(["dynamic axes", "; ".join(f"{k}: " + ", ".join(f"{a}={n}" for a, n in v.items())
                                                for k, v in onnx["dynamic_axes"].items())])
    lines += _table(["", ""], rows)
    lines += ["", "Inputs and outputs:", ""]
    lines += _table(["", "name", "dtype", "shape"],
                    [["input", v["name"], v["dtype"], _shape(v["shape"])] for v in onnx["inputs"]]
                    + [["output", v["name"], v["dtype"], _shape(v["shape"])] for v in onnx["outputs"]])
    ops = sorted(onnx["op_counts"].items(), key=lambda kv: -kv[1])
    lines += ["", "Operators: " + ", ".join(f"{op} x{n}" for op, n in ops)]
    applied = {k: v for k, v in (onnx.get("rewrites") or {}).items() if v}
    if applied:
        lines += ["", "onnxruntime rewrites: " + ", ".join(f"{k} x{v}" for k, v in applied.items())]
    if onnx.get("declined"):
        lines += ["", "Declined ONNX rewrites:", ""]
        lines += _table(["site", "reason"], [[x["site"], x["reason"]] for x in onnx["declined"]])
    n = onnx.get("numerics")
    if n:
        status = "ok" if n["ok"] else f"MISMATCH ({n['reason']})"
        tol = ", ".join(f"{k} {v:.0e}" for k, v in (onnx.get("tolerance") or {}).items())
        shapes = "; ".join(", ".join(_shape(s) for s in case) for case in onnx.get("checked_shapes") or [])
        against = onnx.get("checked_against", "torch's graph")
        against = "torch" if against == "torch's graph" else against
        lines += ["", f"**onnxruntime vs {against}:** {status}: {_numerics_line(n)} over {n['inputs_checked']} input "
                      f"sets (relative L2 tolerance {tol}; input shapes {shapes})."]
    speed = onnx.get("speed")
    if speed:
        lines += ["", "### onnxruntime latency", ""]
        lines += _table(["model", "median ms", "min ms", "runs"], [
            ["plain torch.onnx export of the original", speed["plain"]["median_ms"], speed["plain"]["min_ms"],
             speed["plain"]["runs"]],
            ["graphopt", speed["graphopt"]["median_ms"], speed["graphopt"]["min_ms"], speed["graphopt"]["runs"]],
        ])
        opts = ", ".join(f"{k}={v}" for k, v in speed["session_options"].items())
        lines += ["", f"Speed-up x{speed['speedup']} (median). {speed['method']}; session options: {opts}; "
                      f"inputs {', '.join(_shape(s) for s in speed['inputs'])}."]
    if onnx.get("decode_speed"):
        lines += ["", "### decode speed", "", onnx["decode_speed"]["summary"] + "."]
    if onnx.get("notes"):
        lines += [""] + [f"- {note}" for note in onnx["notes"]]
    return lines
