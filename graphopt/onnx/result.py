"""What :func:`graphopt.onnx.export_onnx` produced, its failure, and how a caller records it in a report.

:func:`~graphopt.onnx.export_onnx` returns an :class:`OnnxExport` and writes
nothing into a report; the caller decides where it goes (``graphopt convert``
records it under ``report.extra["onnx"]`` with :func:`record_onnx_export`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from graphopt.errors import BadInput
from graphopt.pattern import Declined
from graphopt.report import Report
from graphopt.verify import Numerics

#: what ``target=`` may be
TARGETS = ("onnxruntime", "standard")


class OnnxExportError(RuntimeError):
    """The model could not be exported to a valid ONNX file.

    ``ops`` names the operators that have no ONNX translation, when that was the cause.
    """

    def __init__(self, message: str, ops: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.ops = list(ops)


class NoOnnxForm(OnnxExportError, BadInput):
    """The model computes something ONNX cannot express (complex tensors); the original model does not export either.

    The message names the node where the construct starts, with its source line, and the node
    torch.onnx failed on; ``node`` is the former's name.
    """

    def __init__(self, message: str, node: str, ops: Sequence[str] = ()) -> None:
        super().__init__(message, ops)
        self.node = node


@dataclass
class OnnxExport:
    """What :func:`~graphopt.onnx.export_onnx` wrote and how it was checked."""

    path: str
    files: list[str] = field(default_factory=list)
    opset: int = 0
    target: str = "onnxruntime"
    inputs: list[dict[str, Any]] = field(default_factory=list)  # name, dtype, shape ('batch'/'seq' when dynamic)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)
    op_counts: dict[str, int] = field(default_factory=dict)
    rewrites: dict[str, int] = field(default_factory=dict)
    declined: list[Declined] = field(default_factory=list)
    numerics: Numerics | None = None
    checked_shapes: list[list[list[int]]] = field(default_factory=list)
    tolerance: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    speed: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    #: what onnxruntime was compared with: "torch's graph", or "the original model" (a precision result)
    checked_against: str = "torch's graph"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (what ``report.extra["onnx"]`` holds)."""
        d = dataclasses.asdict(self)
        d["declined"] = [x.to_dict() for x in self.declined]
        d["numerics"] = self.numerics.to_dict() if self.numerics else None
        d["seconds"] = {k: round(v, 3) for k, v in self.seconds.items()}
        return d

    def summary(self) -> str:
        """One line: file, opset, node count, the onnxruntime check and, when timed, the speed-up."""
        parts = [f"{os.path.basename(self.path)} (opset {self.opset}, {sum(self.op_counts.values())} nodes)"]
        if self.numerics is not None:
            status = "ok" if self.numerics.ok else "MISMATCH"
            against = "torch" if self.checked_against == "torch's graph" else self.checked_against
            parts.append(f"onnxruntime vs {against} {status}: {self.numerics.summary()} over "
                         f"{self.numerics.inputs_checked} input sets")
        if self.speed:
            parts.append(f"onnxruntime median {self.speed['graphopt']['median_ms']:.1f} ms vs plain export "
                         f"{self.speed['plain']['median_ms']:.1f} ms (x{self.speed['speedup']:.2f})")
        return "; ".join(parts)


def record_onnx_export(report: Report, export: OnnxExport) -> None:
    """Record ``export`` in ``report`` (``report.extra["onnx"]``: report.json, report.md, ``graphopt convert``)."""
    report.extra["onnx"] = export.to_dict()
