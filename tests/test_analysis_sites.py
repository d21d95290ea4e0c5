"""The site layer's linear site and the shared op sets: what each finds, and the reasons it declines."""

from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

import graphopt
from graphopt import opsets
from graphopt.passes.analysis.sites.linear import find_linear_sites, linear_site
from graphopt.passes.precision.quantized_linears import quantizable_linears

aten = torch.ops.aten


def _graph(model: nn.Module, *args: torch.Tensor):
    return graphopt.capture(model.eval(), args).module


class ThreeForms(nn.Module):
    """nn.Linear, x @ W and x @ W.T on one input."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(8, 6)
        self.w_in_out = nn.Parameter(torch.randn(8, 5))
        self.w_out_in = nn.Parameter(torch.randn(4, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.lin(x), x @ self.w_in_out, x @ self.w_out_in.T], -1)


class ComputedWeight(nn.Module):
    """A weight computed from a parameter at run time, and a linear by a transposed weight."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.w * 2.0) + F.linear(x, self.w.t().t().contiguous())


def test_every_form_is_one_linear_site_with_its_effective_weight():
    gm = _graph(ThreeForms(), torch.randn(2, 3, 8))
    sites = find_linear_sites(gm)
    assert [s.kind for s in sites] == ["linear", "matmul", "matmul"]
    assert [(s.in_features, s.out_features) for s in sites] == [(8, 6), (8, 5), (8, 4)]
    assert [s.weight_transposed for s in sites] == [False, False, True]
    model = ThreeForms()
    expected = [model.lin.weight.t(), model.w_in_out, model.w_out_in.t()]
    for site, want in zip(sites, expected):
        assert site.declined is None
        torch.testing.assert_close(site.effective_weight(gm), want)


def test_a_computed_weight_is_a_site_with_the_reason_it_is_not_a_stored_one():
    gm = _graph(ComputedWeight(), torch.randn(2, 8))
    found = [s for n in gm.graph.nodes if (s := linear_site(n)) is not None]
    assert found and all(s.declined == "the weight is not a stored constant" for s in found)
    assert find_linear_sites(gm) == []
    # the precision pass quantizes any constant weight, so it takes them all
    quantizable, declined = quantizable_linears(gm)
    assert sorted(quantizable) == sorted(s.node.name for s in found) and not declined


def test_activation_matmul_is_no_linear_site_and_precision_says_why():
    class Scores(nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
            return q @ k.transpose(-1, -2)

    gm = _graph(Scores(), torch.randn(2, 4, 8), torch.randn(2, 4, 8))
    assert all(linear_site(n) is None for n in gm.graph.nodes)
    _, declined = quantizable_linears(gm)
    assert set(declined.values()) == {"no constant weight (activation x activation matmul)"}


def test_split_slice_of_a_merged_projection():
    class Merged(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(8, 12)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a, b = self.proj(x).split([4, 8], -1)
            return a.sum(-1) + b.sum(-1)

    gm = _graph(Merged(), torch.randn(2, 8))
    getitems = [n for n in gm.graph.nodes if n.target is operator.getitem]
    assert [linear_site(n) for n in getitems] == [None, None]  # only when asked for
    slices = [linear_site(n, allow_split=True) for n in getitems]
    assert [(s.out_slice, s.out_features, s.in_features) for s in slices] == [((0, 4), 4, 8), ((4, 12), 8, 8)]


def test_inactive_dropout():
    def dropout(*args, **kwargs):
        graph = torch.fx.Graph()
        x = graph.placeholder("x")
        return graph.call_function(aten.dropout.default, (x, *args), kwargs)

    assert opsets.is_inactive_dropout(dropout(0.1, False))
    assert opsets.is_inactive_dropout(dropout(0.0, True))
    assert opsets.is_inactive_dropout(dropout(p=0.1, train=False))
    assert not opsets.is_inactive_dropout(dropout(0.1, True))


def test_narrower_sets_are_inside_the_wider_ones():
    assert opsets.DTYPE_CASTS < opsets.CASTS < opsets.CASTS_INCLUDING_DEVICE
    assert opsets.IDENTITY_OPS < opsets.IDENTITY_LIKE
    assert opsets.RESHAPES < opsets.RESHAPES_AND_EXPAND
    assert opsets.SPLITS < opsets.SPLITS_AND_UNBINDS
    assert opsets.SOFTMAX | opsets.LOG_SOFTMAX == opsets.SOFTMAX_FORMS < opsets.SOFTMAX_FORMS_INCLUDING_SAFE


def test_one_ffn_walk_serves_the_analysis_and_the_blocked_planner():
    """One FFNChain per closing linear carries both views; each consumer filters (issue 15)."""
    from graphopt.examples_models import cnn
    from graphopt.passes.analysis.blockable_ffn import check_blockable_ffn, is_blockable_ffn_candidate
    from graphopt.passes.analysis.blockable_sites import find_blockable_sites
    from graphopt.passes.analysis.ffn_chains import FFNChains
    from graphopt.passes.analysis.sites.ffn import find_ffn_chains
    from graphopt.pattern import Decline
    from tests.support._blocked_models import FFNStack

    gm = graphopt.capture(FFNStack(gated=True).eval(), (torch.randn(2, 8, 32),)).module
    chains = find_ffn_chains(gm)
    assert len(chains) == 2 and all(c.reported and is_blockable_ffn_candidate(c) for c in chains)
    for c in chains:
        assert c.down is c.lin_out.node and c.gate is c.lin_gate.node and c.up is c.lin_in.node
        assert c.activation_name == "silu" and c.declined is None and check_blockable_ffn(c) is c
    sites = [s for s in find_blockable_sites(gm)[0] if s.kind == "ffn"]
    assert [s.name for s in sites] == [c.name for c in chains]
    # the CNN's 2048 -> 64 -> 10 head: a rewrite-view chain the analysis does not report
    model, args = cnn()
    gm = graphopt.capture(model, args).module
    (head,) = find_ffn_chains(gm)
    assert not head.reported and is_blockable_ffn_candidate(head)
    assert FFNChains().analyze(gm, None) == []

    class Softplus(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 24), nn.Linear(24, 8)

        def forward(self, x):
            return x + self.b(F.softplus(self.a(x)))

    gm = graphopt.capture(Softplus().eval(), (torch.randn(2, 5, 8),)).module
    (chain,) = find_ffn_chains(gm)
    assert chain.reported and chain.activation_name is None and "not one graphopt knows" in chain.declined
    try:
        check_blockable_ffn(chain)
    except Decline as exc:
        assert "not one graphopt knows" in str(exc)
    else:
        raise AssertionError("an unknown activation must be declined")
