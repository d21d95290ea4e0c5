"""Capture: the ladder, CaptureError's explanation, and calling conventions kept."""

from __future__ import annotations

import sys
from collections import namedtuple

import pytest
import torch
import torch.nn as nn

import graphopt
from tests.support.helpers import assert_outputs_close, call, op_targets

capture_mod = sys.modules["graphopt.capture"]  # the module (graphopt.capture is the function)


class BranchesOnValue(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(x)
        if y.sum() > 0:  # data-dependent: no graph can follow this
            return y * 2
        return y


def test_branch_on_tensor_value_is_a_capture_error_naming_the_branch(capfd):
    with pytest.raises(graphopt.CaptureError) as info:
        graphopt.capture(BranchesOnValue(), (torch.randn(2, 4),))
    err = info.value
    assert [a.route for a in err.attempts] == ["export(strict=False)", "export(strict=True)", "symbolic_trace"]
    text = str(err)
    assert "if y.sum() > 0:" in text  # the user's source line
    assert "test_capture.py" in text
    assert "branches on a tensor's value" in err.hint and "torch.cond" in err.hint
    for attempt in err.attempts:
        assert attempt.source.startswith("test_capture.py:"), attempt
    # torch's own partial-graph dumps of the failing routes are held back, kept on the attempt
    printed = capfd.readouterr()
    assert "def forward" not in printed.err and "def forward" not in printed.out
    assert any("def forward" in a.diagnostics for a in err.attempts)


def test_capture_error_is_not_a_bare_torch_error():
    """Whatever torch raises inside, the user gets a CaptureError (a RuntimeError subclass)."""
    class RenormalizeUntilSmall(nn.Module):
        def forward(self, x):
            while x.norm() > 1.0:  # how often the loop runs depends on the values
                x = x / 2
            return x

    with pytest.raises(graphopt.CaptureError) as info:
        graphopt.capture(RenormalizeUntilSmall(), (torch.randn(2, 4) * 10,))
    assert "while x.norm() > 1.0:" in str(info.value)
    assert "torch.cond" in info.value.hint
    assert isinstance(info.value, RuntimeError)


class RefusesUnderCompile(nn.Module):
    """A kernel wrapper that has no compile/export path (libraries do this with
    ``torch.compiler.is_compiling()``). Both export routes see the flag and
    stop; ``torch.fx.symbolic_trace`` does not set it, so the fx route captures
    the eager path and the traced module is then exported to ATen."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            raise NotImplementedError("this kernel wrapper has no torch.compile/export path")
        return torch.relu(self.proj(x))


def test_symbolic_trace_route_catches_what_export_cannot():
    model, x = RefusesUnderCompile().eval(), torch.randn(3, 8)
    cap = graphopt.capture(model, (x,))
    assert cap.route == "symbolic_trace"
    assert [a.route for a in cap.attempts] == ["export(strict=False)", "export(strict=True)"]
    assert all("RefusesUnderCompile" in a.source or "test_capture.py" in a.source for a in cap.attempts)
    # the same canonical ATen-level graph as the export routes give
    assert op_targets(cap.module) == ["aten.linear", "aten.relu"]
    assert all("val" in n.meta for n in cap.module.graph.nodes if n.op in ("placeholder", "get_attr", "call_function"))
    assert_outputs_close(call(model, (x,)), call(cap.module, (x,)))


def test_ladder_order_and_first_success_wins(monkeypatch):
    calls = []
    real_export = capture_mod._export

    def spy(model, args, kwargs, dynamic_shapes, strict):
        calls.append(("traced" if isinstance(model, torch.fx.GraphModule) else "model", strict))
        if not isinstance(model, torch.fx.GraphModule):
            raise RuntimeError(f"refused strict={strict}")
        return real_export(model, args, kwargs, dynamic_shapes, strict)

    monkeypatch.setattr(capture_mod, "_export", spy)
    cap = graphopt.capture(nn.Linear(4, 2), (torch.randn(1, 4),))
    assert calls == [("model", False), ("model", True), ("traced", False)]
    assert cap.route == "symbolic_trace"
    assert [a.message for a in cap.attempts] == ["refused strict=False", "refused strict=True"]


def test_plain_model_uses_the_first_route():
    cap = graphopt.capture(nn.Linear(4, 2), (torch.randn(1, 4),))
    assert cap.route == "export(strict=False)" and cap.attempts == []
    assert cap.exported_program is not None


Pair = namedtuple("Pair", ["scores", "hidden"])


class KeywordModel(nn.Module):
    """Positional + keyword inputs, an optional mask, a namedtuple and a dict out."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 6)

    def forward(self, x, *, mask=None, temperature: float = 1.0):
        h = self.proj(x)
        if mask is not None:
            h = h.masked_fill(mask[..., None] == 0, 0.0)
        return {"pair": Pair(h.softmax(-1) / temperature, h), "sum": h.sum(-1)}


def test_kwargs_and_output_structure_are_preserved():
    model = KeywordModel().eval()
    x = torch.randn(2, 5, 6)
    mask = torch.ones(2, 5, dtype=torch.long)
    cap = graphopt.capture(model, (x,), {"mask": mask})
    x2, mask2 = torch.randn(2, 5, 6), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    out = call(cap.module, (x2,), {"mask": mask2})
    assert isinstance(out, dict) and isinstance(out["pair"], Pair)
    assert_outputs_close(call(model, (x2,), {"mask": mask2}), out)
    result = graphopt.optimize(model, (x,), {"mask": mask})
    assert_outputs_close(call(model, (x2,), {"mask": mask2}), call(result.module, (x2,), {"mask": mask2}))


def test_model_output_structure_is_preserved():
    from transformers.modeling_outputs import BaseModelOutput

    class ReturnsModelOutput(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, input_ids=None, inputs_embeds=None):
            h = self.proj(inputs_embeds)
            return BaseModelOutput(last_hidden_state=h, hidden_states=(inputs_embeds, h))

    model = ReturnsModelOutput().eval()
    e = torch.randn(1, 3, 4)
    result = graphopt.optimize(model, (), {"inputs_embeds": e})
    out = call(result.module, (), {"inputs_embeds": e * 2})
    assert type(out) is BaseModelOutput
    assert_outputs_close(call(model, (), {"inputs_embeds": e * 2}), out)


def test_capture_restores_training_flags_and_rejects_non_modules():
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5)).train()
    model[1].eval()  # a mixed state must come back exactly
    graphopt.capture(model, (torch.randn(2, 3),))
    assert model.training and model[0].training and not model[1].training
    with pytest.raises(TypeError, match="nn.Module"):
        graphopt.capture(lambda x: x, (torch.randn(2),))
