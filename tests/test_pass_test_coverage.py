"""Each rewrite pass's four tests are easy to find (issue 15 item 8; the table is tests/README.md).

For every pass in :func:`graphopt.passes.all_pass_classes` that rewrites, its
test files (``PASS_TEST_FILES``) must hold test functions whose names say
which of the four they are: golden ops, idempotence, numerics, a declined case.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from graphopt.passes import all_pass_classes

TESTS = Path(__file__).resolve().parent

PASS_TEST_FILES: dict[str, tuple[str, ...]] = {
    "remove_noops": ("test_cleanup_remove_noops.py",),
    "constant_folding": ("test_cleanup_constant_folding.py",),
    "cse": ("test_cleanup_cse.py",),
    "fold_conv_bn": ("test_cleanup_fold_conv_bn.py",),
    "dead_code": ("test_cleanup_dead_code.py",),
    "fuse_attention": ("test_attention_forms.py",),
    "merge_matmuls": ("test_parallel_merge.py",),
    "precision": ("test_precision_pass.py",),
    "tensor_parallel": ("test_parallel_tp_plan.py", "test_parallel_tp_run.py"),
    "blocked": ("test_blocked_pass.py",),
    "weight_layout": ("test_weight_layout.py",),
    "sdpa_gqa": ("test_sdpa_gqa.py",),
}

# What a test function's name must contain to count as each of the four.
KINDS: dict[str, re.Pattern[str]] = {
    "golden ops": re.compile(r"golden"),
    "idempotence": re.compile(r"idempot|second_run"),
    "numerics": re.compile(r"numeric|equal"),
    "declined": re.compile(r"declin"),
}

# Known gaps, named so they are visible; the test fails when one is filled (remove it here then).
MISSING: dict[str, set[str]] = {
    "tensor_parallel": {"golden ops", "idempotence"},
}


def functions_in(files: tuple[str, ...]) -> list[str]:
    """Names of the top-level ``test_*`` functions in ``files`` (under tests/)."""
    names = []
    for name in files:
        tree = ast.parse((TESTS / name).read_text())
        names += [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]
    return names


def missing_kinds(names: list[str]) -> set[str]:
    """Which of the four kinds no name in ``names`` mentions."""
    return {kind for kind, pattern in KINDS.items() if not any(pattern.search(n) for n in names)}


def test_every_rewrite_pass_has_its_four_tests() -> None:
    rewrites = sorted(cls.name for cls in all_pass_classes() if cls.kind != "analysis")
    assert sorted(PASS_TEST_FILES) == rewrites, "add the new pass's test files to PASS_TEST_FILES and tests/README.md"
    problems = {}
    for name in rewrites:
        files = PASS_TEST_FILES[name]
        absent = [f for f in files if not (TESTS / f).exists()]
        assert not absent, f"{name}: test file(s) {absent} do not exist"
        gaps = missing_kinds(functions_in(files))
        if gaps != MISSING.get(name, set()):
            problems[name] = sorted(gaps)
    assert not problems, f"write the missing tests (names saying golden/idempotent/numerics/declined): {problems}"


def test_the_check_can_fail() -> None:
    assert missing_kinds(["test_golden_ops", "test_idempotent", "test_numerics_equal"]) == {"declined"}
    assert missing_kinds(["test_something_else"]) == set(KINDS)
    assert missing_kinds(["test_golden_ops_and_idempotence", "test_numerics", "test_declines_x"]) == set()
    assert missing_kinds(["test_declines_random_ops", "test_idempotent", "test_numerics"]) == {"golden ops"}
