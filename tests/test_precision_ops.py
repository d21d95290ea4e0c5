"""graphopt::int8_linear and graphopt::fp8_linear: kernels vs reference, .pt2, ONNX in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import graphopt
from graphopt.ops import fp8_linear, int8_linear


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture
def linear_case():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 24, 64, generator=g)
    w = torch.randn(48, 64, generator=g) * 0.05
    b = torch.randn(48, generator=g)
    return x, w, b


def test_int8_weight_quantization_is_per_channel(linear_case):
    _, w, _ = linear_case
    w = w * torch.linspace(0.1, 10, w.shape[0])[:, None]  # rows of very different ranges
    q, s = int8_linear.quantize_weight(w)
    assert q.dtype == torch.int8 and s.shape == (w.shape[0],)
    assert int(q.abs().amax(1).min()) == 127  # every row uses its full range
    deq = q.float() * s[:, None]
    assert _rel(deq[0], w[0]) < 1e-2  # the smallest row is as accurate as the largest
    assert _rel(deq[-1], w[-1]) < 1e-2


@pytest.mark.parametrize("scheme", int8_linear.ACTIVATION_SCHEMES)
def test_int8_kernel_matches_reference_and_fp32(linear_case, scheme):
    x, w, b = linear_case
    q, s = int8_linear.quantize_weight(w)
    ref = int8_linear.int8_linear_reference(x, q, s, b, scheme)
    out = torch.ops.graphopt.int8_linear(x, q, s, b, scheme)
    assert out.shape == (2, 24, 48)
    assert _rel(out, ref) < 1e-5  # fbgemm (u7 on x86) or the reference itself
    assert _rel(out, torch.nn.functional.linear(x, w, b)) < 2e-2


def test_int8_per_token_scales_follow_each_row(linear_case):
    x, w, b = linear_case
    x = x * torch.logspace(-3, 3, x.shape[1])[None, :, None]  # tokens over six decades
    q, s = int8_linear.quantize_weight(w)
    out = torch.ops.graphopt.int8_linear(x, q, s, None, "per_token_u7")
    ref = torch.nn.functional.linear(x, w)
    # per-token: even the smallest rows keep their relative accuracy (per-tensor would zero them)
    assert _rel(out[:, 0], ref[:, 0]) < 3e-2
    assert _rel(out[:, -1], ref[:, -1]) < 3e-2


def test_fp8_reference_is_within_its_budget(linear_case):
    x, w, b = linear_case
    q, s = fp8_linear.quantize_weight(w)
    assert q.dtype == torch.float8_e4m3fn
    out = torch.ops.graphopt.fp8_linear(x, q, s, b)
    assert _rel(out, torch.nn.functional.linear(x, w, b)) < 5e-2
    assert not fp8_linear.fp8_supported("cpu")


class _QuantModule(torch.nn.Module):
    def __init__(self, w, b, scheme):
        super().__init__()
        q, s = int8_linear.quantize_weight(w)
        self.register_buffer("q", q)
        self.register_buffer("s", s)
        self.register_buffer("b", b)
        fq, fs = fp8_linear.quantize_weight(w)
        self.register_buffer("fq", fq)
        self.register_buffer("fs", fs)
        self.scheme = scheme

    def forward(self, x):
        h = torch.ops.graphopt.int8_linear(x, self.q, self.s, self.b, self.scheme)
        return h, torch.ops.graphopt.fp8_linear(x, self.fq, self.fs, None)


@pytest.mark.parametrize("scheme", int8_linear.ACTIVATION_SCHEMES)
def test_ops_save_load_pt2(tmp_path, linear_case, scheme):
    x, w, b = linear_case
    m = _QuantModule(w, b, scheme)
    ep = torch.export.export(m, (x,))
    targets = {str(n.target) for n in ep.graph.nodes}
    assert "graphopt.int8_linear.default" in targets and "graphopt.fp8_linear.default" in targets
    torch.export.save(ep, tmp_path / "q.pt2")
    loaded = torch.export.load(tmp_path / "q.pt2").module()
    for a, e in zip(loaded(x), m(x)):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("scheme", int8_linear.ACTIVATION_SCHEMES)
def test_onnx_translation_runs_in_onnxruntime(tmp_path, linear_case, scheme):
    x, w, b = linear_case
    m = _QuantModule(w, b, scheme)
    ep = torch.export.export(m, (x,))
    prog = torch.onnx.export(ep, (x,), dynamo=True, custom_translation_table=graphopt.ops.onnx_translations(),
                             opset_version=21)
    path = tmp_path / "q.onnx"
    prog.save(str(path))
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    ops = {n.op_type for n in model.graph.node}
    assert "MatMulInteger" in ops and "QuantizeLinear" in ops and "DequantizeLinear" in ops
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outs = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    fp32 = torch.nn.functional.linear(x, w, b)
    torch_out = m(x)
    assert _rel(torch.from_numpy(np.asarray(outs[0])), torch_out[0]) < 1e-3  # ORT implements the same op
    assert _rel(torch.from_numpy(np.asarray(outs[0])), fp32) < 2e-2  # and stays within the budget
    assert _rel(torch.from_numpy(np.asarray(outs[1])), torch.nn.functional.linear(x, w)) < 5e-2
