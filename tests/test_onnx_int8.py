"""graphopt.onnx.int8: the int8 linear's dequantization folded into com.microsoft.MatMulIntegerToFloat."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir
import pytest
import torch

import graphopt
from graphopt.onnx.int8 import MatMulIntegerToFloatPass
from graphopt.onnx.rewrites import rewrite_for_onnxruntime
from tests.support.onnx_support import run_onnx
from tests.support.precision_models import QuantModule as _QuantModule

#: schemes whose export has a constant per-channel scale right after the integer GEMM
FOLDED = {"per_token_sym_u8": True, "per_token_s8": True, "per_token_u8": False, "per_token_u7": False}


def _ops(path) -> list[str]:
    return [(f"{n.domain}." if n.domain else "") + n.op_type for n in onnx.load(str(path)).graph.node]


@pytest.mark.parametrize("scheme", sorted(FOLDED))
def test_fold_is_exact_and_only_where_the_scale_is_a_constant_vector(tmp_path, scheme):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 24, 64, generator=g)
    w, b = torch.randn(48, 64, generator=g) * 0.05, torch.randn(48, generator=g)
    module = _QuantModule(w, b, scheme)
    ort_info = graphopt.export_onnx(module, tmp_path / "ort.onnx", (x,))
    std_info = graphopt.export_onnx(module, tmp_path / "std.onnx", (x,), target="standard")
    ops, std_ops = _ops(tmp_path / "ort.onnx"), _ops(tmp_path / "std.onnx")
    assert "MatMulInteger" in std_ops and "com.microsoft.MatMulIntegerToFloat" not in std_ops
    assert std_info.rewrites == {}
    assert ort_info.declined == []  # an fbgemm scheme's run-time scale is another pattern, not a decline
    if FOLDED[scheme]:
        assert ort_info.rewrites["int8_matmul_to_float"] == 1
        assert "com.microsoft.MatMulIntegerToFloat" in ops and "MatMulInteger" not in ops
        assert ops.count("Cast") == std_ops.count("Cast") - 1  # the int32 -> float cast went into the GEMM
    else:
        assert ort_info.rewrites["int8_matmul_to_float"] == 0 and ops.count("MatMulInteger") == 1
    fresh = torch.randn(2, 24, 64, generator=torch.Generator().manual_seed(5))
    for got, want in zip(run_onnx(str(tmp_path / "ort.onnx"), [fresh]), run_onnx(str(tmp_path / "std.onnx"), [fresh])):
        np.testing.assert_array_equal(got, want)  # an int32 product times a per-column scale, either way


def test_fold_is_idempotent(tmp_path):
    x = torch.randn(2, 24, 64, generator=torch.Generator().manual_seed(0))
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(1)) * 0.05
    graphopt.export_onnx(_QuantModule(w, torch.zeros(48), "per_token_sym_u8"), tmp_path / "m.onnx", (x,))
    model = onnx_ir.load(str(tmp_path / "m.onnx"))
    before = _ops(tmp_path / "m.onnx")
    counts = rewrite_for_onnxruntime(model).counts
    assert counts["int8_matmul_to_float"] == 0  # already folded: nothing new
    onnx_ir.save(model, str(tmp_path / "again.onnx"))
    assert _ops(tmp_path / "again.onnx") == before


def _int8_epilogue(scale_shape: list[int]) -> onnx_ir.Model:
    """Mul(Cast(MatMulInteger(q, W, zp), FLOAT), scale) with a constant scale of ``scale_shape``."""
    from onnx import TensorProto, helper

    w = helper.make_tensor("W", TensorProto.INT8, [8, 4], np.ones(32, np.int8).tobytes(), raw=True)
    zp = helper.make_tensor("zp", TensorProto.UINT8, [], [128])
    scale = helper.make_tensor("scale", TensorProto.FLOAT, scale_shape, [0.5] * int(np.prod(scale_shape)))
    nodes = [helper.make_node("MatMulInteger", ["q", "W", "zp"], ["acc"]),
             helper.make_node("Cast", ["acc"], ["acc_f"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["acc_f", "scale"], ["y"], name="epilogue")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("q", TensorProto.UINT8, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
                              initializer=[w, zp, scale])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    return onnx_ir.from_proto(onnx.shape_inference.infer_shapes(proto))


def test_pass_folds_a_vector_scale_and_declines_another_with_its_reason():
    folded = _int8_epilogue([4])
    fold = MatMulIntegerToFloatPass()
    assert fold(folded).modified and fold.rewritten == 1 and fold.declined == []
    again = MatMulIntegerToFloatPass()
    assert not again(folded).modified and again.rewritten == 0  # idempotent

    kept = _int8_epilogue([1, 4])
    decline = MatMulIntegerToFloatPass()
    assert not decline(kept).modified and decline.rewritten == 0
    assert [(d.site, d.reason) for d in decline.declined] == [("epilogue", "the weight scale is not a vector")]
