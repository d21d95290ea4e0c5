"""The peak memory of a call as a fresh process sees it: :func:`measure_peak_in_fresh_process`.

The module is exported (``torch.export``) with its example inputs into a
temporary ``.pt2``; a new Python process loads it (weights-only, through
:func:`graphopt.program_file.load_exported_program`), runs the call once to
warm up and measures the second call's peak resident-set growth
(:func:`graphopt.target.measure_peak` with ``source="rss"``). Nothing that
this process allocated earlier (freed heap pages, cached blocks) is in the
figure: it is what a deployment that loads the saved program sees, the
figure ``benchmarks/blocked.py`` reports. It costs an export and a process
start (seconds) per measurement.

    python -m graphopt.target.fresh_process_peak PROGRAM.pt2   # prints {"bytes": ..., "method": ...}
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import torch

import graphopt.ops  # noqa: F401  (registers graphopt's operators, which a blocked graph calls)
from graphopt.program_file import load_exported_program
from graphopt.target.memory_probe import MeasuredPeak, measure_peak

__all__ = ["measure_peak_in_fresh_process"]


def measure_peak_in_fresh_process(module: torch.nn.Module, args: Sequence[Any] = (),
                                  kwargs: dict[str, Any] | None = None, *, timeout: float = 600) -> MeasuredPeak:
    """Peak RSS growth of ``module(*args, **kwargs)`` measured in a new process (None bytes: it failed; the
    method says why)."""
    with tempfile.TemporaryDirectory(prefix="graphopt-peak-") as folder:
        path = os.path.join(folder, "call.pt2")
        with torch.no_grad():
            program = torch.export.export(module, tuple(args), dict(kwargs or {}), strict=False)
        torch.export.save(program, path)
        try:
            proc = subprocess.run([sys.executable, "-m", "graphopt.target.fresh_process_peak", path],
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return MeasuredPeak(None, f"fresh process: no answer in {timeout:.0f} s")
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        why = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
        return MeasuredPeak(None, f"fresh process failed: {why}")
    answer = json.loads(lines[-1])
    return MeasuredPeak(answer["bytes"], f"fresh process, {answer['method']}")


def _main(path: str) -> None:
    program = load_exported_program(path)
    args, kwargs = program.example_inputs
    measured = measure_peak(program.module(), args, kwargs, source="rss", warmup=True)
    sys.stdout.write(json.dumps({"bytes": measured.bytes, "method": measured.method}) + "\n")


if __name__ == "__main__":
    _main(sys.argv[1])
