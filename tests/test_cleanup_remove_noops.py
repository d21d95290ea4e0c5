"""remove_noops: eval dropout, identities, no-op casts / views / slices, x*1 and x+0 go; real work stays."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import graphopt
from graphopt import OptimizeContext, ir
from graphopt.passes.cleanup.remove_noops import RemoveNoOps
from tests.support.helpers import aliasing, assert_outputs_close, call, capture_for_pass, op_targets, run_pass

aten = torch.ops.aten


class NoOps(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        y = self.drop(x).to(torch.float32).clone().view(2, 3).contiguous()
        z = (y * 1 + 0)[:, :3].detach().expand(2, 3)
        return z.double(), F.dropout(z, 0.3, training=True)


def _captured():
    return capture_for_pass(NoOps().eval(), (torch.randn(2, 3),))


def test_golden_ops_and_idempotence():
    gm, ctx = _captured()
    assert op_targets(gm) == ["aten.dropout", "aten._assert_tensor_metadata", "aten.to", "aten.clone", "aten.view",
                              "aten.mul", "aten.add", "aten.alias", "aten.detach", "aten.expand",
                              "aten._assert_tensor_metadata", "aten.to", "aten.dropout"]
    first = run_pass(RemoveNoOps(), gm, ctx)
    assert first.modified
    # left: the dtype asserts export adds for .to(), the real cast to float64, training-mode dropout
    assert op_targets(first.module) == ["aten._assert_tensor_metadata", "aten._assert_tensor_metadata",
                                        "aten.to", "aten.dropout"]
    assert "removed 1 x aten.dropout" in first.notes and "removed 1 x aten.view" in first.notes
    second = run_pass(RemoveNoOps(), first.module, ctx)
    assert not second.modified


def test_numerics_unchanged():
    model = NoOps().eval()
    gm, ctx = _captured()
    out = run_pass(RemoveNoOps(), gm, ctx).module
    x = torch.randn(2, 3)
    ref, got = call(model, (x,)), call(out, (x,))
    assert_outputs_close(ref[0], got[0])  # [1] is a random dropout draw
    assert got[1].shape == ref[1].shape


def test_declines_training_dropout_with_its_reason():
    gm, ctx = _captured()
    result = run_pass(RemoveNoOps(), gm, ctx)
    assert [(d.site, d.reason) for d in result.declined] == [
        ("dropout_1", "dropout in training mode draws random values; kept")]


def test_declines_a_copy_that_is_mutated_in_place_later():
    """clone(x) then add_ on the clone: dropping the clone would mutate the caller's x."""
    g = fx.Graph()
    x = g.placeholder("x")
    copy = g.call_function(aten.clone.default, (x,))
    g.call_function(aten.add_.Tensor, (copy, 1.0))
    g.output(copy)
    gm = fx.GraphModule(nn.Module(), g)
    inp = torch.zeros(3)
    ir.refresh_meta(gm, [inp])
    result = run_pass(RemoveNoOps(), gm, OptimizeContext(flat_inputs=[inp]))
    assert not result.modified
    assert [d.reason for d in result.declined] == ["its input or result is mutated in place later"]
    out = result.module(inp)
    assert torch.equal(out, torch.ones(3)) and torch.equal(inp, torch.zeros(3))


def test_keeps_casts_and_views_that_change_something():
    class RealWork(nn.Module):
        def forward(self, x):
            return x.to(torch.float16), x.view(3, 2), x[:, :2], x * 2, x + 1

    gm, ctx = capture_for_pass(RealWork(), (torch.randn(2, 3),))
    result = run_pass(RemoveNoOps(), gm, ctx)
    assert not result.modified


def test_declines_a_returned_copy_of_an_input_or_weight():
    """`return x.clone()`: without the copy the caller would get its own tensor (or the weight) back."""
    class ReturnsCopies(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, x):
            h = torch.relu(x)
            return x.clone(), self.w.detach().clone(), h, h.clone(), torch.sin(x).clone()

    model = ReturnsCopies()
    gm, ctx = capture_for_pass(model, (torch.zeros(3),))
    result = run_pass(RemoveNoOps(), gm, ctx)
    reasons = {d.site: d.reason for d in result.declined}
    assert len(reasons) == 3 and all("output would alias" in r for r in reasons.values()), reasons
    assert sorted(r.split(":")[0] for r in reasons.values()) == [
        "output would alias a weight", "output would alias an input", "output would alias another output"]
    assert op_targets(result.module).count("aten.clone") == 3   # sin(x).clone() went: sin's result is private
    x = torch.zeros(3)
    outs = call(result.module, (x,))
    assert_outputs_close(call(model, (x,)), outs)
    assert aliasing(outs, (x,), model, result.module) == set()


class Neutral(nn.Module):
    """Only neutral elementwise ops: eager returns a fresh tensor, never the input itself."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


FRESH = {"x*1": lambda x: x * 1, "x+0": lambda x: x + 0, "x/1": lambda x: x / 1, "x-0": lambda x: x - 0,
         "(x+0)*1": lambda x: (x + 0) * 1, "(x*1).view": lambda x: (x * 1).view(6),
         "x*1, x+0": lambda x: (x * 1, x + 0), "x.float()*1": lambda x: x.float() * 1}
ALIASED = {"x": lambda x: x, "x.float()": lambda x: x.float(), "x.detach()": lambda x: x.detach(),
           "x.view": lambda x: x.view(6), "x[:, :]": lambda x: x[:, :]}


@pytest.mark.parametrize("name", sorted(FRESH))
def test_a_fresh_output_never_becomes_the_input(name):
    """The held-out random models of issue 21: after the pass, `x * 1` returned the caller's own tensor."""
    model = Neutral(FRESH[name])
    gm, ctx = capture_for_pass(model, (torch.randn(2, 3),))
    result = run_pass(RemoveNoOps(), gm, ctx)
    assert any(d.reason.startswith("output would alias an input") for d in result.declined), result.declined
    x = torch.randn(2, 3)
    expected, got = call(model, (x,)), call(result.module, (x,))
    assert_outputs_close(expected, got)
    for out in (got if isinstance(got, tuple) else (got,)):
        assert out.data_ptr() != x.data_ptr()
    assert aliasing(got, (x,), result.module) == aliasing(expected, (x,), model) == set()


@pytest.mark.parametrize("name", sorted(FRESH))
def test_optimize_keeps_outputs_apart_from_inputs(name):
    model = Neutral(FRESH[name])
    x = torch.randn(2, 3)
    result = graphopt.optimize(model, (x,))
    got, expected = result.module(x), model(x)
    assert_outputs_close(expected, got)
    before = x.clone()
    for out in (got if isinstance(got, tuple) else (got,)):
        assert out.data_ptr() != x.data_ptr()
        out.add_(1)  # the caller writes into its output: its input stays as it was
    assert torch.equal(x, before)


@pytest.mark.parametrize("name", sorted(ALIASED))
def test_an_output_that_aliased_its_input_still_does(name):
    model = Neutral(ALIASED[name])
    x = torch.randn(2, 3)
    assert model(x).data_ptr() == x.data_ptr()  # eager PyTorch returns the input's memory
    got = graphopt.optimize(model, (x,)).module(x)
    assert got.data_ptr() == x.data_ptr() and torch.equal(got, model(x))


def test_metadata_asserts_on_computed_values_go_and_on_inputs_stay():
    class Casts(nn.Module):
        def forward(self, ids, x):
            mask = (ids > 0).to(torch.int64)  # export asserts the cast's result and the input
            return x * mask.to(x.dtype)

    args = (torch.tensor([[0, 3, 5]]), torch.randn(1, 3))
    gm, ctx = capture_for_pass(Casts(), args)
    asserts = [n for n in gm.graph.nodes if n.op == "call_function"
               and n.target == torch.ops.aten._assert_tensor_metadata.default]
    on_inputs = [n for n in asserts if n.args[0].op == "placeholder"]
    assert len(asserts) > len(on_inputs), "the test needs asserts on computed values"
    out = run_pass(RemoveNoOps(), gm, ctx).module
    left = [n for n in out.graph.nodes if n.op == "call_function"
            and n.target == torch.ops.aten._assert_tensor_metadata.default]
    assert len(left) == len(on_inputs) and all(n.args[0].op == "placeholder" for n in left)
    assert torch.equal(call(out, args), call(Casts(), args))


def test_declines_a_copy_mutated_through_a_cast_that_returns_it():
    """clone(p).to(int64).add_(1): the cast returns its input, so the add writes the clone; without it, p."""
    class Counter(nn.Module):
        def forward(self, x, position):
            advanced = position.clone().to(torch.int64)
            advanced.add_(1)
            return x + advanced

    position = torch.tensor(4)
    gm, ctx = capture_for_pass(Counter(), (torch.zeros(2), position))
    out = run_pass(RemoveNoOps(), gm, ctx).module
    assert torch.equal(call(out, (torch.zeros(2), position)), torch.full((2,), 5))
    assert int(position) == 4, "the caller's tensor was advanced"
