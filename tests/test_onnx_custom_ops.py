"""graphopt's custom operators export through graphopt.ops.onnx_translations(); failures name the op."""

from __future__ import annotations

import os
import types

import onnx
import pytest
import torch
from onnxscript import opset18 as op

import graphopt
import graphopt.ops


@torch.library.custom_op("graphopt_test::scaled_relu", mutates_args=())
def scaled_relu(x: torch.Tensor, scale: float) -> torch.Tensor:
    """A stand-in for a graphopt operator: relu(x) * scale."""
    return torch.relu(x) * scale


@scaled_relu.register_fake
def _(x: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.empty_like(x)


def scaled_relu_onnx(x, scale: float):
    return op.Mul(op.Relu(x), op.CastLike(scale, x))


def scaled_relu_onnx_wrong(x, scale: float):  # forgets the scale: onnxruntime must disagree
    return op.Relu(x)


class UsesCustomOp(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.graphopt_test.scaled_relu(self.fc(x), 3.0)


def _register(monkeypatch, translation) -> None:
    module = types.SimpleNamespace(ONNX_TRANSLATIONS={torch.ops.graphopt_test.scaled_relu.default: translation})
    monkeypatch.setattr(graphopt.ops, "OP_MODULES", [module])


def test_translation_table_comes_from_the_op_modules(monkeypatch):
    assert graphopt.ops.onnx_translations() == {}
    _register(monkeypatch, scaled_relu_onnx)
    assert graphopt.ops.onnx_translations() == {torch.ops.graphopt_test.scaled_relu.default: scaled_relu_onnx}


def test_custom_op_exports_through_its_translation(monkeypatch, tmp_path):
    _register(monkeypatch, scaled_relu_onnx)
    torch.manual_seed(0)
    info = graphopt.export_onnx(UsesCustomOp(), tmp_path / "m.onnx", (torch.randn(4, 8),), dynamic="batch")
    ops = [n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node]
    assert "Relu" in ops and "Mul" in ops
    assert info.numerics.ok and info.numerics.inputs_checked == 4


def test_op_without_translation_fails_naming_it_and_leaves_no_file(tmp_path):
    with pytest.raises(graphopt.OnnxExportError, match=r"graphopt_test\.scaled_relu\.default") as err:
        graphopt.export_onnx(UsesCustomOp(), tmp_path / "m.onnx", (torch.randn(4, 8),))
    assert err.value.ops == ["graphopt_test.scaled_relu.default"]
    assert "test_onnx_custom_ops.py" in str(err.value)  # the model's source line that calls it
    assert os.listdir(tmp_path) == []


def test_a_wrong_translation_is_an_error_not_a_warning(monkeypatch, tmp_path):
    _register(monkeypatch, scaled_relu_onnx_wrong)
    with pytest.raises(graphopt.OnnxMismatchError, match="relative L2") as err:
        graphopt.export_onnx(UsesCustomOp(), tmp_path / "m.onnx", (torch.randn(4, 8),))
    assert not err.value.numerics.ok and err.value.numerics.rel_l2 > 0.1
    assert os.listdir(tmp_path) == []
