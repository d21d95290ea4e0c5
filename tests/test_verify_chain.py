"""Verification over an InputChain: consecutive steps that share state written in place (a decode step's cache)."""

from __future__ import annotations

import torch

from graphopt.fresh_inputs import InputChain
from graphopt.verify import ErrorBudget, Verifier


class CacheStep(torch.nn.Module):
    """Writes ``x * w`` at ``cache[pos]`` and returns the sum of the cache up to ``pos``: each step reads what
    the steps before it wrote."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor, pos: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
        cache.index_copy_(0, pos, (x * self.scale)[None])
        return cache[: int(pos) + 1].sum(0)


def _steps(chained: bool, steps: int = 6) -> tuple[list, torch.Tensor]:
    torch.manual_seed(0)
    xs = [torch.rand(4, 3) + 0.5 for _ in range(steps)]  # positive: the sums do not cancel
    cache = torch.zeros(steps, 4, 3)
    reference = CacheStep()
    sets = []
    with torch.no_grad():
        for i, x in enumerate(xs):
            state = cache if chained else cache.clone()
            sets.append(((x, torch.tensor([i]), state), {}))
            reference(x, torch.tensor([i]), cache)  # the reference's own writes fill the cache as decoding would
    return (InputChain(sets) if chained else sets), cache


def _verifier(sets: list) -> Verifier:
    (x, pos, state), _ = sets[0]
    return Verifier(CacheStep(), (x, pos, state.clone()), {}, input_sets=sets)


def test_a_chain_lets_the_candidate_read_what_it_wrote_so_its_cache_error_adds_up():
    chained, cache = _steps(chained=True)
    snapshots, _ = _steps(chained=False)
    off = CacheStep(scale=1.01)  # 1% off in what it writes
    in_chain = _verifier(chained).check(off, ErrorBudget(rel_l2=1.0))
    on_snapshots = _verifier(snapshots).check(off, ErrorBudget(rel_l2=1.0))
    # at the last step: on exact snapshots only the newest entry is off, in the chain every entry it wrote is
    last_in_chain, last_on_snapshots = in_chain.outputs[-1].rel_l2, on_snapshots.outputs[-1].rel_l2
    assert last_in_chain > 3 * last_on_snapshots
    assert abs(last_in_chain - 0.01) < 1e-4


def test_a_chain_is_put_back_after_each_check_and_an_exact_candidate_passes():
    chained, cache = _steps(chained=True)
    before = cache.clone()
    verifier = _verifier(chained)
    assert verifier.chained
    assert torch.equal(cache, before)
    assert verifier.check(CacheStep(scale=1.05), ErrorBudget(rel_l2=1.0)).ok
    assert torch.equal(cache, before)  # the candidate's writes are undone once the chain has run
    assert verifier.check(CacheStep()).ok


def test_a_chain_stopped_by_a_failing_candidate_is_put_back():
    chained, cache = _steps(chained=True)
    before = cache.clone()
    verifier = _verifier(chained)

    class Breaks(CacheStep):
        def forward(self, x, pos, cache):
            if int(pos) == 3:
                raise RuntimeError("no")
            return super().forward(x * 2, pos, cache)

    numerics = verifier.check(Breaks())
    assert not numerics.ok and "failed to run" in numerics.reason
    assert torch.equal(cache, before)


def test_optimize_takes_an_input_chain_as_verify_inputs_and_leaves_the_shared_state_as_it_was():
    import graphopt

    class Step(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)

        def forward(self, x, pos, keep, cache):
            cache.index_copy_(0, pos, self.lin(x)[None])
            return (cache * keep[:, None, None]).sum(0)

    torch.manual_seed(0)
    steps, cache = 5, torch.zeros(5, 4, 3)
    chain = InputChain(((torch.rand(4, 3), torch.tensor([i]), (torch.arange(steps) <= i).float(), cache), {})
                       for i in range(steps))
    before = cache.clone()
    example = (torch.rand(4, 3), torch.tensor([0]), (torch.arange(steps) <= 0).float(), torch.zeros(steps, 4, 3))
    result = graphopt.optimize(Step().eval(), example, verify_inputs=chain)
    assert result.report.verification_inputs["chained"]
    assert result.report.verification_inputs["sets"] == ["example"] + ["user-given"] * steps
    assert result.report.final_numerics.ok
    assert torch.equal(cache, before)
