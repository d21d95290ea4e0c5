"""Verification of a model that draws random numbers in its forward: each input set's runs share one seed."""
from __future__ import annotations

import torch

import graphopt
from graphopt.verify import Verifier


class Noisy(torch.nn.Module):
    """A linear, a no-op multiply (what remove_noops rewrites), then noise drawn inside the forward."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x) * 1.0
        return y + torch.rand_like(y)


def test_a_model_with_random_ops_is_verified_and_rewritten():
    torch.manual_seed(0)
    model = Noisy().eval()
    result = graphopt.optimize(model, (torch.randn(4, 8),))
    assert result.report.final_numerics.ok, result.report.final_numerics.reason
    assert result.report.final_numerics.rel_l2 == 0.0
    assert result.report.record("remove_noops").status == "applied"
    assert result.report.rolled_back == []


def test_verification_leaves_the_callers_random_state_as_it_was():
    torch.manual_seed(7)
    model = Noisy().eval()
    before = torch.get_rng_state()
    verifier = Verifier(model, (torch.randn(4, 8, generator=torch.Generator().manual_seed(1)),), {}, n_random=0)
    assert verifier.check(model).ok  # the model against itself: the same numbers
    assert torch.equal(torch.get_rng_state(), before)


def test_a_candidate_drawing_other_random_numbers_still_fails():
    # the shared seed makes equal draws equal; a candidate that draws differently is caught
    model = Noisy().eval()
    verifier = Verifier(model, (torch.randn(4, 8, generator=torch.Generator().manual_seed(1)),), {}, n_random=0)

    def other_draw(x: torch.Tensor) -> torch.Tensor:
        y = model.lin(x)
        torch.rand(1)  # one more draw first: every number after it differs
        return y + torch.rand_like(y)

    assert not verifier.check(other_draw).ok


def test_a_model_drawing_random_numbers_has_no_wide_reference():
    # fp64 draws other numbers than fp32 from the same seed: the model would look ill-conditioned against its
    # fp64 run, and any candidate within that error would pass
    x = (torch.randn(4, 8, generator=torch.Generator().manual_seed(1)),)
    assert not Verifier(Noisy().eval(), x, {}, n_random=0).fp32_reference().available
    assert Verifier(torch.nn.Linear(8, 8).eval(), x, {}, n_random=0).fp32_reference().available
