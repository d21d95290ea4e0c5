"""graphopt's custom operators export through graphopt.ops.onnx_translations(); failures name the op."""

from __future__ import annotations

import os

import onnx
import pytest
import torch

import graphopt
import graphopt.ops
from tests.support.onnx_support import UsesCustomOp, register_translation, scaled_relu_onnx, scaled_relu_onnx_wrong


def test_translation_table_comes_from_the_op_modules(monkeypatch):
    assert torch.ops.graphopt_test.scaled_relu.default not in graphopt.ops.onnx_translations()
    register_translation(monkeypatch, scaled_relu_onnx)
    assert graphopt.ops.onnx_translations() == {torch.ops.graphopt_test.scaled_relu.default: scaled_relu_onnx}


def test_custom_op_exports_through_its_translation(monkeypatch, tmp_path):
    register_translation(monkeypatch, scaled_relu_onnx)
    torch.manual_seed(0)
    info = graphopt.export_onnx(UsesCustomOp(), tmp_path / "m.onnx", (torch.randn(4, 8),), dynamic="batch")
    ops = [n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node]
    assert "Relu" in ops and "Mul" in ops
    assert info.numerics.ok and info.numerics.inputs_checked == 4


def test_op_without_translation_fails_naming_it_and_leaves_no_file(tmp_path):
    with pytest.raises(graphopt.OnnxExportError, match=r"graphopt_test\.scaled_relu\.default") as err:
        graphopt.export_onnx(UsesCustomOp(), tmp_path / "m.onnx", (torch.randn(4, 8),))
    assert err.value.ops == ["graphopt_test.scaled_relu.default"]
    assert "onnx_support.py" in str(err.value)  # the model's source line that calls it
    assert os.listdir(tmp_path) == []


def test_a_wrong_translation_is_an_error_not_a_warning(monkeypatch, tmp_path):
    register_translation(monkeypatch, scaled_relu_onnx_wrong)
    with pytest.raises(graphopt.OnnxMismatchError, match="relative L2") as err:
        graphopt.export_onnx(UsesCustomOp(), tmp_path / "m.onnx", (torch.randn(4, 8),))
    assert not err.value.numerics.ok and err.value.numerics.rel_l2 > 0.1
    assert os.listdir(tmp_path) == []
