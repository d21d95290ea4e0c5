"""One fp32 run that records what the precision plan needs.

``calibrate(gm, input_sets, record)`` runs ``gm`` (an ``fx.Interpreter``) on
each flattened input set and returns a :class:`Calibration`: the absolute
maximum of every floating value over all sets (fp16 range checks and
overflow scaling), and, on the first set, the argument values of the nodes
named in ``record`` (to measure each candidate's error and speed in isolation).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx


@dataclass
class Calibration:
    amax: dict[str, float] = field(default_factory=dict)
    args: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = field(default_factory=dict)

    def range_of(self, node: Any) -> float:
        return self.amax.get(node.name, 0.0) if isinstance(node, fx.Node) else 0.0


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, cal: Calibration, record: set[str], keep_args: bool) -> None:
        super().__init__(gm)
        self.cal, self.record, self.keep_args = cal, record, keep_args

    def run_node(self, n: fx.Node) -> Any:
        if self.keep_args and n.name in self.record:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            self.cal.args[n.name] = (args, kwargs)
        out = super().run_node(n)
        if isinstance(out, torch.Tensor) and out.dtype.is_floating_point and out.numel():
            finite = out.detach()
            value = float(finite.abs().amax())
            self.cal.amax[n.name] = max(self.cal.amax.get(n.name, 0.0), value)
        return out


def calibrate(gm: fx.GraphModule, input_sets: Sequence[Sequence[Any]], record: Iterable[str] = ()) -> Calibration:
    """Record ranges over every input set and the arguments of ``record`` nodes on the first."""
    cal = Calibration()
    names = set(record)
    with torch.no_grad():
        for i, flat in enumerate(input_sets):
            _Recorder(gm, cal, names, keep_args=(i == 0)).run(*flat)
    return cal
