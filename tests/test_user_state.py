"""The user's model, inputs and RNG state are untouched by graphopt's entry points (issue 21 item 4)."""

from __future__ import annotations

import torch

import graphopt


class Stateful(torch.nn.Module):
    """A forward that counts its calls in a buffer and doubles its input in place."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.steps += 1
        x.mul_(2)
        return self.lin(x) * 1.0


def _state(model, x):
    return {k: v.clone() for k, v in model.state_dict().items()}, x.clone(), torch.get_rng_state()


def _assert_same(before, model, x):
    state, x0, rng = before
    after = model.state_dict()
    assert state.keys() == after.keys()
    for k in state:
        assert torch.equal(state[k], after[k]), k
    assert torch.equal(x0, x)
    assert torch.equal(rng, torch.get_rng_state())


def test_optimize_leaves_buffers_inputs_and_rng_as_they_were():
    torch.manual_seed(0)
    model, x = Stateful(), torch.randn(2, 4)
    before = _state(model, x)
    result = graphopt.optimize(model, (x,))
    _assert_same(before, model, x)
    assert result.report.final_numerics.ok, result.report.final_numerics.reason
    # the optimized module still does the mutation, as the model does
    y = x.clone()
    result.module(y)
    assert torch.equal(y, x * 2)


def test_capture_and_analyze_leave_state_as_it_was():
    model, x = Stateful(), torch.randn(2, 4)
    before = _state(model, x)
    graphopt.capture(model, (x,))
    graphopt.analyze(model, (x,))
    _assert_same(before, model, x)


def test_export_onnx_and_visualize_leave_state_as_it_was(tmp_path):
    torch.manual_seed(0)
    model, x = Stateful(), torch.randn(2, 4)
    before = _state(model, x)
    result = graphopt.optimize(model, (x,))
    export = graphopt.export_onnx(result, str(tmp_path / "model.onnx"))
    graphopt.visualize(result, str(tmp_path / "graph.html"))
    _assert_same(before, model, x)
    assert export.numerics.ok, export.numerics.reason
