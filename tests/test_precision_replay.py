"""SuffixReplay: one node replaced, only what depends on it recomputed -- the same outputs as a rebuilt graph."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import graphopt
from tests.support.precision_models import encoderish_model as _model
import graphopt.passes.precision.run as precision_run
from graphopt import ir
from graphopt.precision.replay import SuffixReplay, recorded_bytes


class TwoBranches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.left, self.right, self.head = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.relu(self.left(x))
        b = torch.tanh(self.right(x))
        return self.head(a + b), b * 2


def _linears(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == torch.ops.aten.linear.default]


def test_replay_with_a_node_replaced_equals_the_rewritten_graph():
    model = TwoBranches().eval()
    x = torch.randn(8, 16)
    gm = graphopt.capture(model, (x,)).module
    replay = SuffixReplay(gm, ir.flat_inputs((x,), {}, gm))
    for node in _linears(gm):
        def doubled(args, kwargs, target=node.target):
            return target(*args, **kwargs) * 2.0

        got = replay.run(node.name, doubled)
        rewritten = ir.copy_graph_module(gm)
        twin = next(n for n in rewritten.graph.nodes if n.name == node.name)
        with rewritten.graph.inserting_after(twin):
            scaled = rewritten.graph.call_function(torch.ops.aten.mul.Tensor, (twin, 2.0))
        twin.replace_all_uses_with(scaled, delete_user_cb=lambda user: user is not scaled)
        rewritten.recompile()
        expected = rewritten(x)
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=0, atol=0)
    unchanged = replay.run(_linears(gm)[0].name, lambda args, kwargs: torch.ops.aten.linear.default(*args, **kwargs))
    for g, e in zip(unchanged, model(x)):
        torch.testing.assert_close(g, e)


def test_replay_recomputes_only_what_depends_on_the_node():
    model = TwoBranches().eval()
    x = torch.randn(8, 16)
    gm = graphopt.capture(model, (x,)).module
    replay = SuffixReplay(gm, ir.flat_inputs((x,), {}, gm))
    left, right, _head = _linears(gm)
    names = {n.name for n in replay.downstream(left)}
    assert right.name not in names and "tanh" not in names  # the other branch keeps its recorded values
    assert left.name in names and any(n.startswith("relu") for n in names)
    assert recorded_bytes(gm) > 8 * 16 * 4


def test_the_search_ranks_the_same_with_and_without_replay(monkeypatch):
    """Whole-model sensitivities (and so the kept nodes and their reasons) are the same whether the
    single-node runs replay the graph or rebuild it."""
    def plan_of(max_bytes):
        monkeypatch.setattr(precision_run, "REPLAY_MAX_BYTES", max_bytes)
        model, args = _model()
        result = graphopt.optimize(model, args, precision="int8", error_budget=4e-3)
        rec = result.report.record("precision")
        assert any(d.reason.startswith("kept fp32: over budget") for d in rec.declined)  # the search ranked
        notes = [n for n in rec.notes if "rebuild the graph" in n]
        return [(e["node"], e["precision"], e["reason"]) for e in result.report.extra["precision"]], notes

    replayed, notes_replayed = plan_of(2 << 30)
    rebuilt, notes_rebuilt = plan_of(0)
    assert replayed == rebuilt
    assert not notes_replayed and notes_rebuilt  # the fallback says why


class InPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        bias = torch.ones_like(h)
        bias.add_(h)  # written in place, like T5's position_bias.add_(mask)
        return self.b(bias)


def test_graphs_that_write_in_place_are_not_replayed():
    from graphopt.precision.replay import writes_in_place

    model = InPlace().eval()
    x = torch.randn(8, 16)
    gm = graphopt.capture(model, (x,)).module
    if not writes_in_place(gm):  # pragma: no cover - depends on the torch version's capture
        pytest.skip("this torch's capture functionalized the in-place add: nothing to decline")
    assert not writes_in_place(graphopt.capture(TwoBranches().eval(), (x,)).module)
    result = graphopt.optimize(model, (x,), precision="int8", error_budget=1e-4)
    notes = result.report.record("precision").notes
    assert any("writes values in place" in n for n in notes), notes
