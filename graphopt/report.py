"""The optimization report: what each pass changed, how long it took, the
numerics it was checked against, and every site it declined with the reason.

``str(report)`` is a readable table (rendered with rich); ``to_dict()`` and
``to_json()`` give the same content for tools.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

from graphopt.pattern import Declined
from graphopt.verify import Numerics
from graphopt.report_markdown import describe_inputs, report_to_markdown


@dataclass
class PassRecord:
    """One pass's run.

    ``status`` is one of ``applied`` (modified and kept), ``unchanged``,
    ``rolled back`` (its numerics failed; the graph before it was kept),
    ``error`` (it raised; the graph before it was kept) and ``analysis``.
    ``verified_with``: when the pass manager checked a group of exact passes
    once, the applied passes of that group (``numerics`` is the group's check).
    """

    name: str
    status: str
    seconds: float = 0.0
    nodes_before: int = 0
    nodes_after: int = 0
    notes: list[str] = field(default_factory=list)
    declined: list[Declined] = field(default_factory=list)
    numerics: Numerics | None = None
    nodes_involved: list[str] = field(default_factory=list)
    error: str = ""
    verified_with: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "seconds": round(self.seconds, 6),
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "notes": list(self.notes),
            "declined": [d.to_dict() for d in self.declined],
            "numerics": self.numerics.to_dict() if self.numerics else None,
            "nodes_involved": list(self.nodes_involved[:200]),
            "error": self.error,
            "verified_with": list(self.verified_with),
        }


@dataclass
class Report:
    """Everything :func:`graphopt.optimize` did, pass by pass."""

    model: str = ""
    capture_route: str = ""
    capture_seconds: float = 0.0
    #: what the capture changed of what was asked (dynamic axes the model fixes), each a sentence
    capture_notes: list[str] = field(default_factory=list)
    passes: list[PassRecord] = field(default_factory=list)
    final_numerics: Numerics | None = None
    total_seconds: float = 0.0
    nodes_before: int = 0
    nodes_after: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    #: the input sets verification used (``Verifier.describe``): their sources, and the rule of each rule-drawn input
    verification_inputs: dict[str, Any] = field(default_factory=dict)

    def record(self, name: str) -> PassRecord | None:
        return next((r for r in self.passes if r.name == name), None)

    @property
    def rolled_back(self) -> list[PassRecord]:
        return [r for r in self.passes if r.status in ("rolled back", "error")]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "capture_route": self.capture_route,
            "capture_notes": list(self.capture_notes),
            "capture_seconds": round(self.capture_seconds, 6),
            "total_seconds": round(self.total_seconds, 6),
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "passes": [r.to_dict() for r in self.passes],
            "final_numerics": self.final_numerics.to_dict() if self.final_numerics else None,
            "verification_inputs": dict(self.verification_inputs),
            **({"extra": self.extra} if self.extra else {}),
        }

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=_json_default)

    def render(self, console: Any = None) -> None:
        """Print the report to a rich console."""
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        console = console or Console()
        title = f"graphopt report{': ' + self.model if self.model else ''}"
        table = Table(title=escape(title), title_justify="left")
        for col in ("pass", "status", "nodes", "time", "numerics", "notes"):
            table.add_column(col, overflow="fold")
        for r in self.passes:
            nodes = f"{r.nodes_before}->{r.nodes_after}" if r.status != "analysis" else ""
            notes = "; ".join(r.notes[:3] + ([r.error] if r.error else []))
            if r.declined:
                notes += ("; " if notes else "") + f"{len(r.declined)} declined"
            style = {"rolled back": "red", "error": "red", "applied": "green"}.get(r.status, "")
            table.add_row(escape(r.name), f"[{style}]{r.status}[/]" if style else r.status, nodes,
                          f"{r.seconds * 1e3:.1f} ms", escape(r.numerics.summary()) if r.numerics else "",
                          escape(notes))
        console.print(table)
        console.print(
            f"capture: {self.capture_route} ({self.capture_seconds:.2f} s); nodes {self.nodes_before} -> "
            f"{self.nodes_after}; total {self.total_seconds:.2f} s", markup=False
        )
        for note in self.capture_notes:
            console.print(f"capture note: {note}", markup=False)
        if self.final_numerics:
            status = "ok" if self.final_numerics.ok else "FAILED"
            console.print(f"final check vs the original model: {status} ({self.final_numerics.summary()}, "
                          f"{self.final_numerics.inputs_checked} input sets)")
        if self.verification_inputs:
            console.print(f"verification inputs: {describe_inputs(self.verification_inputs)}", markup=False)
        declined = [(r.name, d) for r in self.passes for d in r.declined]
        if declined:
            console.print("declined sites:")
            for name, d in declined[:40]:
                console.print(f"  {name}: {d.site}: {d.reason}", markup=False)
            if len(declined) > 40:
                console.print(f"  ... and {len(declined) - 40} more (see report.json)")
        for r in self.rolled_back:
            console.print(f"[red]{escape(r.name)} {r.status}[/]: {escape(str(r.numerics.reason if r.numerics else r.error))}")

    def to_markdown(self) -> str:
        """The report as Markdown (what ``graphopt convert`` writes to ``report.md``)."""
        return report_to_markdown(self)

    def __str__(self) -> str:
        from rich.console import Console

        buf = io.StringIO()
        self.render(Console(file=buf, width=140, force_terminal=False, color_system=None))
        return buf.getvalue()


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    return str(obj)
