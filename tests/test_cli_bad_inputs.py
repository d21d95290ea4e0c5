"""Table-driven bad inputs (issue 21 item 7): each row exits 2 with one line on stderr and no traceback.

Rows fail before any optimization, so the file stays fast; keep it growing.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

TINY = "hf:gpt2?n_layer=1&n_embd=32&n_head=2&vocab_size=128"

ROWS = [
    ("n_layer-abc", ["analyze", "hf:gpt2?n_layer=abc"]),
    ("seq-abc", ["analyze", TINY + "&seq=abc"]),
    ("seq-negative", ["analyze", TINY + "&seq=-1"]),
    ("seq-beyond-max-positions", ["analyze", TINY + "&seq=10000000"]),
    ("vocab-zero", ["analyze", "hf:gpt2?n_layer=1&n_embd=32&n_head=2&vocab_size=0&seq=8"]),
    ("unknown-key-typo", ["analyze", "hf:gpt2?n_layers=1&seq=8"]),
    ("factory-raises", ["analyze", "{dir}/m.py:boom"]),
    ("factory-sys-exit", ["analyze", "{dir}/m.py:leave"]),
]

FACTORIES = "import sys\n\ndef boom():\n    raise RuntimeError('nope')\n\ndef leave():\n    sys.exit(0)\n"


@pytest.mark.parametrize("argv", [r[1] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_exits_2_with_one_line(tmp_path: Path, argv: list[str]) -> None:
    (tmp_path / "m.py").write_text(FACTORIES)
    before = sorted(p.name for p in tmp_path.iterdir())
    args = [a.format(dir=tmp_path) for a in argv]
    proc = subprocess.run([sys.executable, "-m", "graphopt.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]  # progress lines aside
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before
