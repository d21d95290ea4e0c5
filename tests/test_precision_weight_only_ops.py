"""graphopt::int8_weight_only_linear and graphopt::int4_weight_only_linear: quantizers, kernels vs references,
fake kernels under torch.export, declared cost, ONNX in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

import graphopt
from graphopt.cost import node_cost
from graphopt.ops import weight_only_linear as wo

CPU_INT8 = wo.int8_kernel("cpu")
CPU_INT4 = wo.int4_kernel("cpu")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _case(n: int = 48, k: int = 96, rows: tuple = (2, 5), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*rows, k, generator=g), torch.randn(n, k, generator=g) * 0.05, torch.randn(n, generator=g)


class WeightOnly(torch.nn.Module):
    """Both ops on one input, weights quantized from ``w``."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None) -> None:
        super().__init__()
        q, s = wo.quantize_int8_weight_only(w)
        p, sz, g = wo.quantize_int4(w)
        for name, t in (("q", q), ("s", s), ("p", p), ("sz", sz), ("b", b)):
            self.register_buffer(name, t)
        self.g = g

    def forward(self, x):
        return (torch.ops.graphopt.int8_weight_only_linear(x, self.q, self.s, self.b),
                torch.ops.graphopt.int4_weight_only_linear(x, self.p, self.sz, self.g, self.b))


def test_int8_weights_are_symmetric_per_channel_with_bf16_scales():
    _, w, _ = _case()
    q, s = wo.quantize_int8_weight_only(w)
    assert q.dtype == torch.int8 and q.shape == w.shape and s.dtype == torch.bfloat16 and s.shape == (48,)
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127
    assert (q.abs().amax(dim=1) >= 126).all()  # every row uses its range (the bf16 scale rounds a little)
    assert _rel(q.float() * s.float()[:, None], w) < 1e-2


@pytest.mark.parametrize("k, group", [(256, 128), (192, 64), (96, 32), (1376, 32)])
def test_int4_group_size_is_the_largest_dividing_in_features(k, group):
    assert wo.int4_group_size(k) == group
    _, w, _ = _case(k=k)
    packed, sz, g = wo.quantize_int4(w)
    assert g == group and packed.shape == (48, k // 2) and packed.dtype == torch.uint8
    assert sz.shape == (k // group, 48, 2) and sz.dtype == torch.bfloat16


def test_int4_declines_in_features_no_group_size_divides():
    assert wo.int4_group_size(100) is None
    with pytest.raises(ValueError, match="not divisible by any int4 group size"):
        wo.quantize_int4(torch.randn(16, 100))


def test_int4_format_is_torch_s_asymmetric_groups_with_the_even_channel_in_the_high_nibble(monkeypatch):
    """Dequantize by hand from the documented format: scale = (max - min) / 15, zero = min + 8 * scale,
    w = (q - 8) * scale + zero; a swapped nibble order or a transposed scale layout fails here."""
    monkeypatch.setattr(wo, "INT4_CLIP_FACTORS", (1.0,))  # each group's own min and max: the format by hand
    _, w, _ = _case(n=32, k=64)
    packed, sz, g = wo.quantize_int4(w, group_size=32)
    q = torch.empty(32, 64)
    q[:, 0::2], q[:, 1::2] = (packed >> 4).float(), (packed & 15).float()
    assert torch.equal(wo.unpack_int4(packed).float(), q) and q.max() <= 15
    groups = w.reshape(32, 2, 32)
    lo, hi = groups.amin(-1), groups.amax(-1)
    scale = ((hi - lo) / 15).to(torch.bfloat16).float()
    torch.testing.assert_close(sz[..., 0].float().t(), scale)
    torch.testing.assert_close(sz[..., 1].float().t(), (lo + 8 * scale).to(torch.bfloat16).float())
    by_hand = ((q.reshape(32, 2, 32) - 8) * sz[..., 0].float().t()[..., None] + sz[..., 1].float().t()[..., None])
    torch.testing.assert_close(wo.dequantize_int4(packed, sz, g), by_hand.reshape(32, 64))
    assert (by_hand.reshape(32, 64) - w).abs().max() <= (hi - lo).max() / 15  # within a step (rounding, bf16)


@pytest.mark.parametrize("outliers", [False, True])
def test_int4_fitted_clipping_rounds_each_group_no_worse_than_its_min_and_max(monkeypatch, outliers):
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(3))
    if outliers:  # one large weight in every group: min-max spreads the levels over values the rest never take
        w[:, ::128] *= 8
    packed, sz, g = wo.quantize_int4(w)
    fitted = (wo.dequantize_int4(packed, sz, g) - w).square().reshape(64, -1, g).sum(-1)
    monkeypatch.setattr(wo, "INT4_CLIP_FACTORS", (1.0,))
    packed, sz, g = wo.quantize_int4(w)
    min_max = (wo.dequantize_int4(packed, sz, g) - w).square().reshape(64, -1, g).sum(-1)
    assert bool((fitted <= min_max).all())  # per group: factor 1 (its min and max) is among those tried
    assert float(fitted.sum()) < 0.95 * float(min_max.sum())  # measured: 10% less (Gaussian), 7.5% (outliers)


@pytest.mark.parametrize("n, rows", [(48, (2, 5)), (40, (1,)), (37, (3, 1))])  # 40, 37: the CPU packing pads N
@pytest.mark.parametrize("with_bias", [True, False])
def test_kernels_match_their_references_and_stay_near_fp32(n, rows, with_bias):
    x, w, b = _case(n=n, rows=rows)
    b = b if with_bias else None
    q, s = wo.quantize_int8_weight_only(w)
    p, sz, g = wo.quantize_int4(w)
    assert wo.prepack(q, s) == CPU_INT8 and wo.prepack(p, sz) == CPU_INT4
    y8 = torch.ops.graphopt.int8_weight_only_linear(x, q, s, b)
    y4 = torch.ops.graphopt.int4_weight_only_linear(x, p, sz, g, b)
    assert y8.shape == y4.shape == (*rows, n) and y8.dtype == y4.dtype == torch.float32
    assert _rel(y8, wo.int8_weight_only_reference(x, q, s, b)) < 1e-4  # the same numbers, sums in another order
    assert _rel(y4, wo.int4_weight_only_reference(x, p, sz, g, b)) < 1e-4
    fp32 = F.linear(x, w, b)
    assert _rel(y8 - (b if with_bias else 0), fp32 - (b if with_bias else 0)) < 1.5e-2
    assert _rel(y4 - (b if with_bias else 0), fp32 - (b if with_bias else 0)) < 0.15  # 4 bits, one group per row


@pytest.mark.skipif(not CPU_INT8 or not CPU_INT4, reason="this torch has no CPU weight-only kernels")
def test_the_cpu_kernels_are_the_ones_that_run(monkeypatch):
    x, w, b = _case()
    module = WeightOnly(w, b)
    calls = []
    for name in ("_weight_int8pack_mm", "_weight_int4pack_mm_for_cpu"):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    module(x)
    assert calls == ["_weight_int8pack_mm", "_weight_int4pack_mm_for_cpu"]


def test_bf16_input_gives_bf16_output():
    x, w, b = _case()
    y8, y4 = WeightOnly(w, b)(x.to(torch.bfloat16))
    assert y8.dtype == y4.dtype == torch.bfloat16


def test_fake_kernels_export_save_and_load(tmp_path):
    x, w, b = _case()
    module = WeightOnly(w, b)
    ep = torch.export.export(module, (x,))
    nodes = {str(n.target): n for n in ep.graph.nodes if n.op == "call_function"}
    for op in ("graphopt.int8_weight_only_linear.default", "graphopt.int4_weight_only_linear.default"):
        assert tuple(nodes[op].meta["val"].shape) == (2, 5, 48)
    torch.export.save(ep, tmp_path / "wo.pt2")
    loaded = torch.export.load(tmp_path / "wo.pt2").module()
    for got, want in zip(loaded(x), module(x)):
        torch.testing.assert_close(got, want)


def test_declared_cost_counts_the_quantized_weight_bytes():
    x, w, b = _case(rows=(3,))
    gm = torch.export.export(WeightOnly(w, None), (x,)).module()
    costs = {str(n.target): node_cost(n) for n in gm.graph.nodes if n.op == "call_function"
             and "weight_only" in str(n.target)}
    c8 = costs["graphopt.int8_weight_only_linear.default"]
    c4 = costs["graphopt.int4_weight_only_linear.default"]
    assert c8.flops == c4.flops == 2 * 3 * 48 * 96
    x_bytes, out_bytes = 3 * 96 * 4, 3 * 48 * 4
    assert c8.bytes_read == x_bytes + 48 * 96 + 48 * 2  # int8 weight, bf16 scales
    assert c4.bytes_read == x_bytes + 48 * 96 // 2 + (96 // 32) * 48 * 2 * 2  # int4 weight, bf16 scales and zeros
    assert c8.bytes_written == c4.bytes_written == out_bytes


@pytest.mark.parametrize("with_bias", [True, False])
def test_onnx_translation_passes_the_checker_and_matches_in_onnxruntime(tmp_path, with_bias):
    """The translation as written (no constant folding: the nibbles are unpacked in the graph), and
    graphopt.export_onnx's file (the exporter folds the unpacking into a uint8 initializer)."""
    x, w, b = _case(n=48, k=192)  # int4 groups of 64: several groups per row
    module = WeightOnly(w, b if with_bias else None)
    ep = torch.export.export(module, (x,))
    prog = torch.onnx.export(ep, (x,), dynamo=True, custom_translation_table=graphopt.ops.onnx_translations(),
                             opset_version=21, optimize=False)
    path = tmp_path / "wo.onnx"
    prog.save(str(path))
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert {"BitShift", "BitwiseAnd", "MatMul"} <= {n.op_type for n in model.graph.node}
    stored = {i.name: i.data_type for i in model.graph.initializer}
    assert stored["p"] == onnx.TensorProto.UINT8 and stored["q"] == onnx.TensorProto.INT8
    graphopt.export_onnx(module, tmp_path / "graphopt.onnx", (x,))
    want = module(x)
    fp32 = F.linear(x, w, b if with_bias else None)
    for file in (path, tmp_path / "graphopt.onnx"):
        sess = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
        outs = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
        for got, ref in zip(outs, want):
            assert _rel(torch.from_numpy(np.asarray(got)), ref) < 1e-3  # the same bf16 roundings
        assert _rel(torch.from_numpy(np.asarray(outs[1])), fp32) < 0.15
