"""House rules (issue 15): no function in graphopt/ or passes/ over 80 lines, no module over 500 lines.

A function may be longer when the line just above its ``def`` (or its first
decorator) is a comment saying why: ``# longer than 80 lines because ...``.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 500
EXCUSE = "longer than 80 lines because"


def _sources() -> list[Path]:
    return sorted(p for root in ("graphopt", "passes") for p in (REPO / root).rglob("*.py"))


def long_functions(path: Path) -> list[str]:
    """``file:line name (n lines)`` for each function in ``path`` over the limit without an excuse comment."""
    text = path.read_text()
    lines = text.splitlines()
    found = []
    for node in ast.walk(ast.parse(text)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        length = node.end_lineno - node.lineno + 1
        first = min([node.lineno] + [d.lineno for d in node.decorator_list])
        above = lines[first - 2] if first >= 2 else ""
        if length > MAX_FUNCTION_LINES and not (above.strip().startswith("#") and EXCUSE in above):
            found.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({length} lines)")
    return found


def long_modules(paths: list[Path]) -> list[str]:
    """``file (n lines)`` for each module over the limit."""
    return [f"{p.relative_to(REPO)} ({n} lines)" for p in paths
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]


def test_no_function_over_80_lines() -> None:
    found = [f for p in _sources() for f in long_functions(p)]
    assert not found, ("split these into named steps, or put '# longer than 80 lines because <why>' "
                       f"on the line above the def: {found}")


def test_no_module_over_500_lines() -> None:
    found = long_modules(_sources())
    assert not found, f"split these modules by purpose: {found}"


def test_the_checks_can_fail(tmp_path: Path) -> None:
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    long = tmp_path / "long.py"
    long.write_text(f"def too_long():\n{body}\n")
    excused = tmp_path / "excused.py"
    excused.write_text(f"# {EXCUSE} it is a table\ndef excused():\n{body}\n")
    fine = tmp_path / "fine.py"
    fine.write_text("def short():\n    return 1\n")
    global REPO
    saved, REPO = REPO, tmp_path
    try:
        assert long_functions(long) == ["long.py:1 too_long (81 lines)"]
        assert long_functions(excused) == [] and long_functions(fine) == []
        big = tmp_path / "big.py"
        big.write_text("x = 1\n" * (MAX_MODULE_LINES + 1))
        assert long_modules([big, fine]) == [f"big.py ({MAX_MODULE_LINES + 1} lines)"]
    finally:
        REPO = saved


def test_tests_share_helpers_through_the_support_package() -> None:
    """No ``sys.path.insert`` in tests/, and no test module imports another test module (``test_*``)."""
    found = []
    for path in sorted((REPO / "tests").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("sys.path.insert", "sys.path.append"):
                found.append(f"{path.relative_to(REPO)}:{node.lineno} {ast.unparse(node.func)}")
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.relative_to(REPO)}:{node.lineno} imports {n}" for n in names
                      if n.split(".")[-1].startswith("test_")]
    assert not found, f"put shared code in tests/support/ (import it as tests.support.<module>): {found}"
