"""The wheel carries every package: pyproject's explicit list names each package directory."""
from __future__ import annotations

import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _package_dirs() -> set[str]:
    names = set()
    for root, prefix in ((ROOT / "graphopt", "graphopt"), (ROOT / "passes", "graphopt.passes")):
        for init in root.rglob("__init__.py"):
            rel = init.parent.relative_to(root).parts
            names.add(".".join((prefix, *rel)))
    return names


def test_every_package_directory_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    missing = _package_dirs() - listed
    assert not missing, f"add to pyproject.toml [tool.setuptools] packages: {sorted(missing)}"
    stale = listed - _package_dirs()
    assert not stale, f"pyproject.toml lists packages that do not exist: {sorted(stale)}"


def test_readme_has_no_merge_conflict_markers():
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        for marker in ("<<<<<<< ", "\n=======\n", ">>>>>>> "):
            assert marker not in text, f"{path.name} holds a merge conflict marker {marker.strip()!r}"
