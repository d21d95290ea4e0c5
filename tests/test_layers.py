"""The import layers of docs/design.md, checked on the source.

    library (ir, cost, memory, verify, pass_infra, pattern, opsets, ops/, target/, precision/, ...)
      < passes (graphopt.passes = passes/)
        < API and outputs (optimize, analysis, parallel, launch, specs, viz/, onnx/, commands/, cli)

A module may import from its own layer or below, never above. Imports inside
functions count too, and outside the command line (whose subcommands import
lazily so ``graphopt --help`` starts fast) a function-level import of graphopt
code is refused: it is how a cycle gets hidden instead of cut.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

LIBRARY, PASSES, API = 0, 1, 2
LAYER_NAMES = {LIBRARY: "library", PASSES: "passes", API: "API"}

#: top-level graphopt modules and packages in the API-and-outputs layer; every other graphopt module is library
API_MODULES = frozenset({
    "graphopt", "graphopt.__main__", "graphopt.cli", "graphopt.optimize", "graphopt.analysis",
    "graphopt.parallel", "graphopt.launch", "graphopt.specs", "graphopt.examples_models", "graphopt.model_inputs",
    "graphopt.loading",
})
API_PACKAGES = ("graphopt.viz", "graphopt.onnx", "graphopt.commands", "graphopt.generate")

#: where a function-level import of graphopt code is allowed, and why
LAZY_IMPORT_ALLOWED = {
    "graphopt.cli": "subcommands load on use, so `graphopt --help` starts without importing torch-heavy modules",
}
#: single function-level imports allowed, (importer, imported): why
LAZY_IMPORT_PAIRS = {
    ("graphopt.onnx.export", "graphopt.onnx.rewrites"):
        "the rewrites import onnxscript (seconds): `import graphopt` (which exposes export_onnx) stays without it",
    ("graphopt.optimize", "graphopt.generate.build"):
        "generation builds on optimize (it optimizes its prefill and decode graphs); the result's generate() "
        "is the one way back",
}
LAZY_IMPORT_PACKAGES = ("graphopt.commands",)  # the same reason as graphopt.cli


def layer_of(module: str) -> int:
    if module == "graphopt.passes" or module.startswith("graphopt.passes."):
        return PASSES
    if module in API_MODULES or any(module == p or module.startswith(p + ".") for p in API_PACKAGES):
        return API
    if module.startswith("graphopt.onnx_"):  # flat onnx modules are outputs wherever they live
        return API
    return LIBRARY


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "passes":
        parts = ["graphopt", "passes"] + parts[1:]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def source_modules() -> dict[str, Path]:
    files = sorted((ROOT / "graphopt").rglob("*.py")) + sorted((ROOT / "passes").rglob("*.py"))
    return {module_name(p): p for p in files}


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def graphopt_imports(module: str, source: str, is_package: bool = False) -> list[tuple[str, int, bool]]:
    """``(imported module, line, inside a function)`` for every graphopt import in ``source``."""
    tree = ast.parse(source)
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, in_function) for a in child.names
                             if a.name == "graphopt" or a.name.startswith("graphopt."))
            elif isinstance(child, ast.ImportFrom):
                target = _resolve(module, is_package, child)
                if target == "graphopt" or target.startswith("graphopt."):
                    # `from graphopt import ir` imports the module graphopt.ir, not the package's API
                    names = [f"{target}.{a.name}" for a in child.names] if target == "graphopt" else [target]
                    found.extend((n, child.lineno, in_function) for n in names)
            visit(child, nested)

    visit(tree, False)
    return found


def _known(name: str, modules: dict[str, Path]) -> str:
    """The module an imported name refers to (``graphopt.ir.shape_of`` -> ``graphopt.ir``)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name


def layer_violations(module: str, source: str, modules: dict[str, Path], is_package: bool = False) -> list[str]:
    """Every import in ``source`` (of ``module``) that reaches a higher layer or hides in a function."""
    problems = []
    own = layer_of(module)
    lazy_ok = module in LAZY_IMPORT_ALLOWED or module.startswith(LAZY_IMPORT_PACKAGES)
    for name, line, in_function in graphopt_imports(module, source, is_package):
        target = _known(name, modules) or name
        if layer_of(target) > own:
            problems.append(f"{module}:{line} imports {target} ({LAYER_NAMES[own]} -> {LAYER_NAMES[layer_of(target)]})")
        elif in_function and not lazy_ok and (module, target) not in LAZY_IMPORT_PAIRS:
            problems.append(f"{module}:{line} imports {target} inside a function (import at the top; "
                            "if that makes a cycle, cut the cycle)")
    return problems


def test_no_import_reaches_a_higher_layer_or_hides_in_a_function():
    modules = source_modules()
    problems = []
    for module, path in modules.items():
        problems += layer_violations(module, path.read_text(), modules, path.name == "__init__.py")
    assert not problems, "import layers broken:\n" + "\n".join(problems)


@pytest.mark.parametrize("module, source, expected", [
    ("graphopt.cost", "from graphopt.passes.attention import FuseAttention\n", "library -> passes"),
    ("graphopt.ir", "import graphopt.optimize\n", "library -> API"),
    ("graphopt.passes.attention", "from graphopt.analysis import analyze\n", "passes -> API"),
    ("graphopt.verify", "def f():\n    from graphopt import pass_infra\n", "inside a function"),
    ("graphopt.passes.blocked", "from .analysis import x\n", None),  # relative, same layer: fine
    ("graphopt.passes.blocked", "from ..analysis import x\n", "passes -> API"),  # graphopt.analysis
    ("graphopt.ops.int8_linear", "from ..passes import precision\n", "library -> passes"),
    ("graphopt.optimize", "from graphopt.passes import default_pipeline\n", None),
    ("graphopt.commands.viz", "def run():\n    import graphopt.viz\n", None),
])
def test_the_checker_catches_an_upward_import(module, source, expected):
    problems = layer_violations(module, source, source_modules(), is_package=False)
    if expected is None:
        assert problems == []
    else:
        assert len(problems) == 1 and expected in problems[0], problems
