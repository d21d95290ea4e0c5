"""Replace one marked section of benchmarks/RESULTS.md (what the benchmarks' ``--write`` does).

Each benchmark owns the text between ``<!-- NAME:begin -->`` and
``<!-- NAME:end -->``; a section not in the file yet is appended.
"""

from __future__ import annotations

import os

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def markers(name: str) -> tuple[str, str]:
    """``(begin, end)`` comment lines around section ``name``."""
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def write_section(name: str, section: str, path: str = RESULTS) -> str:
    """Put ``section`` (markers included) in place of section ``name`` of ``path``; returns the path."""
    begin, end = markers(name)
    text = open(path).read() if os.path.exists(path) else "# Benchmark results\n\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + section.rstrip("\n") + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with open(path, "w") as f:
        f.write(text)
    return path
