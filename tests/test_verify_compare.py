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
