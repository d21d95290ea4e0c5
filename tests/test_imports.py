"""Import order: graphopt's library modules import first in a fresh interpreter (no import cycle).

``graphopt.passes`` imports every pass, and the passes import the library
(``graphopt.precision``, ...); a library module that imports ``graphopt.passes``
at its top closes a cycle that only shows when that module is the first one a
process imports -- a user's ``graphopt.export_onnx(module, ...)`` before any
``optimize`` was one (it imports ``graphopt.precision.quantize``).
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[1]


def _modules_importing_passes_at_the_top() -> list[str]:
    found = []
    for path in sorted((ROOT / "graphopt").rglob("*.py")):
        if re.search(r"^from graphopt\.passes|^import graphopt\.passes", path.read_text(), re.MULTILINE):
            found.append(".".join(path.relative_to(ROOT).with_suffix("").parts))
    return found


def _fresh(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("module", ["graphopt.precision.quantize", "graphopt.precision.lower_float",
                                    *_modules_importing_passes_at_the_top()])
def test_module_imports_first(module):
    done = _fresh(f"import {module}")
    assert done.returncode == 0, done.stderr[-2000:]


def test_export_onnx_of_a_plain_module_is_the_first_call(tmp_path):
    done = _fresh("import torch, graphopt\n"
                  f"graphopt.export_onnx(torch.nn.Linear(4, 4), {str(tmp_path / 'm.onnx')!r}, (torch.randn(2, 4),))\n"
                  "print('exported')")
    assert done.returncode == 0 and "exported" in done.stdout, done.stderr[-2000:]
