"""graphopt.verify.compare_outputs: the figures every rewrite is judged by."""

from __future__ import annotations

import math

import pytest
import torch

from graphopt.verify import compare_outputs


def _exact(r: torch.Tensor, c: torch.Tensor) -> tuple[float, float]:
    d = r.double() - c.double()
    return float(d.abs().max()), float(d.norm() / r.double().norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_errors_match_a_float64_computation_on_a_large_output(dtype):
    """rel_l2 and max_abs equal the float64 figures (the float32 fast path accumulates in float64: a
    float32 norm over 4M elements would be off by ~1e-3 relative)."""
    g = torch.Generator().manual_seed(0)
    r = torch.randn(64, 256, 256, generator=g).to(dtype)
    c = (r.double() + 1e-3 * torch.randn(r.shape, generator=g, dtype=torch.float64)).to(dtype)
    (e,) = compare_outputs(r, c)
    max_abs, rel = _exact(r, c)
    assert e.max_abs == pytest.approx(max_abs, rel=1e-6)
    assert e.rel_l2 == pytest.approx(rel, rel=1e-6)


def test_non_finite_candidate_where_the_reference_is_finite_fails():
    r = torch.randn(4, 8)
    for bad in (float("nan"), float("inf"), -float("inf")):
        c = r.clone()
        c[2, 3] = bad
        (e,) = compare_outputs(r, c)
        assert not e.ok and "NaN/inf" in e.reason


def test_positions_where_the_reference_is_not_finite_are_not_compared():
    r = torch.randn(4, 8)
    r[0, 0] = float("inf")
    c = r.clone()
    c[0, 0] = 1.0  # the reference overflowed there: nothing to compare
    (e,) = compare_outputs(r, c)
    assert e.ok and e.rel_l2 == 0.0
    c[1, 1] += 1.0  # elsewhere a difference still counts
    (e,) = compare_outputs(r, c)
    assert not e.ok and math.isfinite(e.rel_l2) and e.max_abs == pytest.approx(1.0, rel=1e-6)


def test_huge_finite_values_are_measured_exactly():
    """Values whose float32 squares overflow still get exact figures (the float64 path)."""
    r = torch.full((3, 5000), 3e30)
    c = r.clone()
    c[1, 7] = 3.3e30
    (e,) = compare_outputs(r, c)
    max_abs, rel = _exact(r, c)
    assert math.isfinite(e.rel_l2) and e.rel_l2 == pytest.approx(rel, rel=1e-6)
    assert e.max_abs == pytest.approx(max_abs, rel=1e-6)


def test_top1_is_pooled_over_input_sets_not_judged_per_set():
    """Ten sets of two rows with one flipped row: 19 of 20 agree (0.95); the flipped set alone would be 0.5."""
    from graphopt.verify import ErrorBudget, summarize

    torch.manual_seed(0)
    budget = ErrorBudget(rel_l2=10.0, top1=0.95)
    per_input = []
    for i in range(10):
        r = torch.randn(2, 50)
        c = r.clone()
        if i == 3:  # swap row 0's top two logits
            top = r[0].topk(2).indices
            c[0, top[0]], c[0, top[1]] = r[0, top[1]], r[0, top[0]]
        per_input.append(compare_outputs(r, c, budget))
    numerics = summarize(per_input, budget)
    assert numerics.ok and abs(numerics.top1 - 0.95) < 1e-9, numerics
    assert min(e.top1 for errs in per_input for e in errs) == 0.5  # the set alone
    strict = summarize(per_input, ErrorBudget(rel_l2=10.0, top1=0.96))
    assert not strict.ok and "over 20 rows of 10 input set(s)" in strict.reason, strict.reason
