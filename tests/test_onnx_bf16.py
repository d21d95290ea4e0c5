"""graphopt.onnx.bf16: bf16 arithmetic computed in float32 between casts, so onnxruntime's CPU provider runs it."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

import graphopt
from graphopt.onnx.bf16 import BF16_NATIVE, ComputeBf16InFloat32, compute_bf16_in_float32
from tests.support.onnx_support import rel_l2, run_onnx

BF16 = TensorProto.BFLOAT16


def _bf16(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a).to(torch.bfloat16)


def _bf16_model(w: np.ndarray, b: np.ndarray) -> ir.Model:
    """y = Reshape(MatMul(x, W) + b + x @ 1)  in bf16; x feeds two arithmetic nodes, y is a graph output."""
    w_t = helper.make_tensor("W", BF16, w.shape, _bf16(w).view(torch.int16).numpy().tobytes(), raw=True)
    b_t = helper.make_tensor("B", BF16, b.shape, _bf16(b).view(torch.int16).numpy().tobytes(), raw=True)
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [-1, w.shape[1]])
    nodes = [helper.make_node("MatMul", ["x", "W"], ["xw"]),
             helper.make_node("Add", ["xw", "B"], ["xwb"]),
             helper.make_node("ReduceSum", ["x", "axes"], ["xs"], keepdims=1),
             helper.make_node("Add", ["xwb", "xs"], ["h"]),
             helper.make_node("Reshape", ["h", "shape"], ["y"])]
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", BF16, [4, w.shape[0]])],
                              [helper.make_tensor_value_info("y", BF16, [4, w.shape[1]])],
                              initializer=[w_t, b_t, shape, axes])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    model = ir.from_proto(onnx.shape_inference.infer_shapes(proto))
    return model


def _arithmetic_with_bf16(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph if n.op_type not in BF16_NATIVE
            and any(v is not None and v.dtype == ir.DataType.BFLOAT16 for v in (*n.inputs, *n.outputs))]


def test_rewrite_computes_in_float32_and_rounds_where_the_original_rounds():
    g = np.random.default_rng(0)
    w, b = g.standard_normal((16, 8)).astype(np.float32), g.standard_normal(8).astype(np.float32)
    model = _bf16_model(w, b)
    assert _arithmetic_with_bf16(model) == ["MatMul", "Add", "ReduceSum", "Add"]
    assert compute_bf16_in_float32(model) == 4
    assert _arithmetic_with_bf16(model) == []
    assert [v.name for v in model.graph.outputs] == ["y"] and model.graph.outputs[0].dtype == ir.DataType.BFLOAT16
    casts = [n for n in model.graph if n.op_type == "Cast"]
    widening = [n for n in casts if n.attributes["to"].as_int() == TensorProto.FLOAT]
    # one widening cast per bf16 value read by arithmetic, shared: x (read twice), W, B, and the three
    # rounded intermediates xw, xwb, xs
    assert len(widening) == 6, [n.inputs[0].name for n in widening]
    assert len(casts) - len(widening) == 4  # one rounding cast per rewritten node
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])  # loads now
    assert [o.name for o in session.get_outputs()] == ["y"]

    # numpy cannot feed or fetch bf16: run it between float32 casts
    x = g.standard_normal((4, 16)).astype(np.float32)

    def rnd(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.bfloat16).float()

    xb, wb, bb = _bf16(x).float(), _bf16(w).float(), _bf16(b).float()
    expected = rnd(rnd(rnd(xb @ wb) + bb) + rnd(xb.sum(1, keepdim=True)))
    wrapped = _with_float32_ends(proto)
    (got,) = ort.InferenceSession(wrapped.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x_float": x})
    np.testing.assert_array_equal(got, expected.numpy())  # exactly the bf16 rounding points of the original


def _with_float32_ends(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The model with a float32 input cast to bf16 in front and its bf16 output cast to float32 behind."""
    graph = proto.graph
    (inp,), (out,) = graph.input, graph.output
    shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    out_shape = [d.dim_value for d in out.type.tensor_type.shape.dim]
    nodes = [helper.make_node("Cast", ["x_float"], [inp.name], to=BF16), *graph.node,
             helper.make_node("Cast", [out.name], ["y_float"], to=TensorProto.FLOAT)]
    new = helper.make_graph(nodes, "wrapped", [helper.make_tensor_value_info("x_float", TensorProto.FLOAT, shape)],
                            [helper.make_tensor_value_info("y_float", TensorProto.FLOAT, out_shape)],
                            initializer=list(graph.initializer))
    return helper.make_model(new, opset_imports=list(proto.opset_import), ir_version=proto.ir_version)


def test_nothing_to_do_without_bf16():
    w = np.ones((16, 8), np.float32)
    model = _bf16_model(w, np.ones(8, np.float32))
    for v in (*model.graph.inputs, *model.graph.initializers.values()):
        if v.dtype == ir.DataType.BFLOAT16:
            v.type = ir.TensorType(ir.DataType.FLOAT)
    for node in model.graph:
        for v in node.outputs:
            v.type = ir.TensorType(ir.DataType.FLOAT)
    assert compute_bf16_in_float32(model) == 0
    assert not any(n.op_type == "Cast" for n in model.graph)


def test_node_whose_attribute_fixes_its_output_type_is_declined_with_the_reason():
    nodes = [helper.make_node("EyeLike", ["x"], ["eye"], name="eye_like", dtype=TensorProto.FLOAT),
             helper.make_node("Add", ["x", "x"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", BF16, [4, 4])],
                              [helper.make_tensor_value_info("eye", TensorProto.FLOAT, [4, 4]),
                               helper.make_tensor_value_info("y", BF16, [4, 4])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    model = ir.from_proto(onnx.shape_inference.infer_shapes(proto))
    bf16_pass = ComputeBf16InFloat32()
    assert bf16_pass(model).modified and bf16_pass.rewritten == 1  # the Add
    assert [(d.site, d.reason) for d in bf16_pass.declined] == [
        ("eye_like", "an attribute fixes its output type: left in bf16")]
    again = ComputeBf16InFloat32()
    assert not again(model).modified  # idempotent: the Add now computes in float32


class _Bf16Linear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(64, 64), torch.nn.Linear(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.nn.functional.gelu(self.a(x)))


def test_bf16_plan_exports_and_onnxruntime_keeps_its_rounding(tmp_path):
    """precision='bf16' -> ONNX for onnxruntime: loads, is checked, and computes what torch's bf16 graph
    computes (bf16 rounding kept), not what float32 would."""
    model = _Bf16Linear().eval()
    x = torch.randn(32, 64)
    result = graphopt.optimize(model, (x,), precision="bf16", error_budget=0.05)
    assert result.report.record("precision").status == "applied"
    info = graphopt.export_onnx(result, tmp_path / "bf16.onnx", n_random_inputs=1)
    assert info.numerics.ok and info.rewrites.get("bf16_in_float32", 0) >= 2, info.rewrites
    assert any("computed in float32" in n for n in info.notes), info.notes
    fresh = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    (got,) = run_onnx(str(tmp_path / "bf16.onnx"), [fresh])
    with torch.no_grad():
        in_bf16, in_fp32 = result.module(fresh).float().numpy(), model(fresh).numpy()
    assert rel_l2(in_bf16, got) < 0.25 * rel_l2(in_fp32, got)


def test_standard_target_keeps_bf16_operators(tmp_path):
    """target='standard' is for runtimes with bf16 kernels: the file keeps its bf16 MatMuls, and checking
    it in onnxruntime's CPU provider fails with what to do instead."""
    model = _Bf16Linear().eval()
    result = graphopt.optimize(model, (torch.randn(32, 64),), precision="bf16", error_budget=0.05)
    info = graphopt.export_onnx(result, tmp_path / "std.onnx", target="standard", check=False)
    assert "bf16_in_float32" not in info.rewrites
    proto = onnx.load(str(tmp_path / "std.onnx"))
    assert _arithmetic_with_bf16(ir.from_proto(proto))
    with pytest.raises(graphopt.OnnxExportError, match="target='onnxruntime'"):
        graphopt.export_onnx(result, tmp_path / "std2.onnx", target="standard")
