"""graphopt::int8_linear and graphopt::fp8_linear: kernels vs reference, .pt2, ONNX in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import graphopt
from graphopt.ops import fp8_linear, int8_linear
from graphopt.precision.target import PrecisionTarget
from graphopt.target import KernelProbes, probes
from tests.support.precision_models import QuantModule as _QuantModule


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
    q, s = int8_linear.quantize_weight(w, pair_safe=scheme in int8_linear.PAIR_SAFE_SCHEMES)
    ref = int8_linear.int8_linear_reference(x, q, s, b, scheme)
    out = torch.ops.graphopt.int8_linear(x, q, s, b, scheme)
    assert out.shape == (2, 24, 48)
    assert _rel(out, ref) < 1e-5  # fbgemm (u8/u7 on x86) or the reference itself
    assert _rel(out, torch.nn.functional.linear(x, w, b)) < 2e-2


def _saturating_case():
    """Activations that quantize to 255 against weights whose adjacent channels are both large."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(8, 256, generator=g) * 0.2 + 0.8
    x[:, 0] = -0.05  # per-row max 1, tensor min just below 0: nearly every value lands on 250..255
    w = torch.randn(32, 256, generator=g).abs() * 0.05  # same-sign pairs: the int16 step's worst case
    return x, w


def test_pair_safe_weights_bound_adjacent_channel_sums():
    _, w = _saturating_case()
    plain, _ = int8_linear.quantize_weight(w)
    safe, scale = int8_linear.quantize_weight(w, pair_safe=True)
    assert not int8_linear.is_pair_safe(plain)  # 127-sized neighbours: 255 * 254 overflows int16
    assert int8_linear.is_pair_safe(safe)
    pairs = safe[:, 0::2].int() + safe[:, 1::2].int()
    assert int(pairs.abs().max()) <= int8_linear.PAIR_LIMIT
    assert _rel(safe.float() * scale[:, None], w) < 2e-2  # the coarser step still represents W


@pytest.mark.skipif(not int8_linear.fbgemm_available(), reason="needs fbgemm (x86)")
def test_u8_kernel_is_exact_with_pair_safe_weights_where_plain_weights_saturate():
    """What the probe checks, on a bigger case: the fbgemm kernel with 8-bit activations equals
    the exact integer reference with pair-safe weights; the op never runs the kernel on weights
    that are not pair-safe (it falls back to the reference)."""
    x, w = _saturating_case()
    safe, s = int8_linear.quantize_weight(w, pair_safe=True)
    if probes.fbgemm_u8_exact():
        got = torch.ops.graphopt.int8_linear(x, safe, s, None, "per_token_u8")
        assert _rel(got, int8_linear.int8_linear_reference(x, safe, s, None, "per_token_u8")) < 1e-5
    plain, ps = int8_linear.quantize_weight(w)
    raw = torch.ops.quantized.linear_dynamic(x / x.abs().amax(-1, keepdim=True), int8_linear._pack(plain, ps), False)
    exact = int8_linear.int8_linear_reference(x, plain, ps, None, "per_token_u8") / x.abs().amax(-1, keepdim=True)
    saturates = _rel(raw, exact) > 1e-3  # AVX2 without VNNI: yes; VNNI CPUs: no
    op = torch.ops.graphopt.int8_linear(x, plain, ps, None, "per_token_u8")
    assert _rel(op, int8_linear.int8_linear_reference(x, plain, ps, None, "per_token_u8")) < 1e-5
    if saturates:
        assert _rel(raw * x.abs().amax(-1, keepdim=True), torch.nn.functional.linear(x, w)) > 1e-2


@pytest.mark.skipif(not int8_linear.onednn_available(), reason="needs oneDNN's quantized linear (x86)")
def test_onednn_kernel_is_exact_with_pair_safe_weights_where_plain_weights_saturate():
    """per_token_sym_u8 runs oneDNN with activations up to 255: with pair-safe weights it equals
    the exact integer product; plain weights reach the kernel only where it does not saturate them
    (VNNI), and the op equals its reference either way."""
    x, w = _saturating_case()
    safe, s = int8_linear.quantize_weight(w, pair_safe=True)
    q, row = int8_linear._quantize_sym_u8(x)
    assert int(q.max()) == 255 and int(q.min()) >= 1  # the full range is used
    exact = ((q.double() - 128) @ safe.double().t()) * s.double()
    if probes.onednn_u8_exact():
        got = int8_linear._onednn_gemm(q, int8_linear._onednn_pack(safe), s, torch.zeros(32, dtype=torch.long))
        assert _rel(got.double(), exact) < 1e-6
        op = torch.ops.graphopt.int8_linear(x, safe, s, None, "per_token_sym_u8")
        assert _rel(op, int8_linear.int8_linear_reference(x, safe, s, None, "per_token_sym_u8")) < 1e-5
    plain, ps = int8_linear.quantize_weight(w)
    op = torch.ops.graphopt.int8_linear(x, plain, ps, None, "per_token_sym_u8")  # falls back to the reference
    assert _rel(op, int8_linear.int8_linear_reference(x, plain, ps, None, "per_token_sym_u8")) < 1e-5
    assert _rel(op, torch.nn.functional.linear(x, w)) < 1e-2


@pytest.mark.skipif(not int8_linear.onednn_available(), reason="needs oneDNN's quantized linear (x86)")
def test_plain_weight_probes_tell_whether_the_kernels_saturate():
    """onednn_plain_exact / fbgemm_plain_exact agree with what the kernels do on a bigger saturating
    case (True on VNNI CPUs, False on AVX2), and the pass's choice of weights follows them."""
    x, w = _saturating_case()
    plain, ps = int8_linear.quantize_weight(w)
    assert not int8_linear.is_pair_safe(plain)
    q, _ = int8_linear._quantize_sym_u8(x)
    got = int8_linear._onednn_gemm(q, int8_linear._onednn_pack(plain), ps, torch.zeros(32, dtype=torch.long))
    exact = ((q.double() - 128) @ plain.double().t()) * ps.double()
    assert (_rel(got.double(), exact) < 1e-6) == probes.onednn_plain_exact()
    assert KernelProbes().weights_need_pair_safety("per_token_sym_u8") == (not probes.onednn_plain_exact())
    if int8_linear.fbgemm_available():
        xn = x / x.abs().amax(-1, keepdim=True)
        raw = torch.ops.quantized.linear_dynamic(xn, int8_linear._pack(plain, ps), False)
        exact_u8 = int8_linear._exact_u8_product(xn, plain, ps)
        assert (_rel(raw.double(), exact_u8) < 1e-6) == probes.fbgemm_plain_exact()
    for scheme in ("per_token_u7", "per_token_s8"):  # 7-bit and symmetric int8 never saturate
        assert not KernelProbes().weights_need_pair_safety(scheme)
    target = PrecisionTarget.detect("cpu")
    if target.int8_scheme is not None:
        assert target.int8_pair_safe == KernelProbes().weights_need_pair_safety(target.int8_scheme)


def test_sym_u8_quantization_rounds_half_up_to_127_levels_each_side():
    x = torch.tensor([[1.0, -1.0, 0.5 / 127, -0.5 / 127, 0.0, 0.3]])
    q, s = int8_linear._quantize_sym_u8(x)
    assert q.dtype == torch.uint8 and torch.allclose(s, torch.tensor([[1 / 127]]))
    assert (q.int() - 128).tolist() == [[127, -127, 1, 0, 0, round(0.3 * 127)]]


@pytest.mark.parametrize("scheme", int8_linear.ACTIVATION_SCHEMES)
def test_input_shift_takes_the_shared_component_out_of_the_range(scheme):
    """int8_linear(x, ..., b + W mu, shift=mu) is linear(x, W, b), with a much finer activation
    step when every token shares a large component."""
    g = torch.Generator().manual_seed(2)
    common = torch.randn(128, generator=g) * 3
    x = torch.randn(4, 32, 128, generator=g) + common  # a shared component 3x the per-token part
    w, b = torch.randn(64, 128, generator=g) * 0.05, torch.randn(64, generator=g)
    q, s = int8_linear.quantize_weight(w, pair_safe=scheme in int8_linear.PAIR_SAFE_SCHEMES)
    mu = x.reshape(-1, 128).mean(0)
    fp32 = torch.nn.functional.linear(x, w, b)
    plain = torch.ops.graphopt.int8_linear(x, q, s, b, scheme)
    shifted = torch.ops.graphopt.int8_linear(x, q, s, b + w @ mu, scheme, mu)
    ref = int8_linear.int8_linear_reference(x, q, s, b + w @ mu, scheme, mu)
    assert _rel(shifted, ref) < 1e-5
    assert _rel(shifted, fp32) < 0.5 * _rel(plain, fp32)


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


@pytest.mark.parametrize("scheme,shifted", [(s, False) for s in int8_linear.ACTIVATION_SCHEMES]
                         + [("per_token_u8", True), ("per_token_sym_u8", True)])
def test_onnx_translation_runs_in_onnxruntime(tmp_path, linear_case, scheme, shifted):
    x, w, b = linear_case
    x = x + 2.0 if shifted else x
    m = _QuantModule(w, b, scheme, x.reshape(-1, x.shape[-1]).mean(0) if shifted else None)
    ep = torch.export.export(m, (x,))
    prog = torch.onnx.export(ep, (x,), dynamo=True, custom_translation_table=graphopt.ops.onnx_translations(),
                             opset_version=21)
    path = tmp_path / "q.onnx"
    prog.save(str(path))
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    ops = {n.op_type for n in model.graph.node}
    assert "MatMulInteger" in ops and "QuantizeLinear" in ops and "DequantizeLinear" in ops
    subs = sum(n.op_type == "Sub" for n in model.graph.node)
    # the zero-point range of the per-tensor schemes, and the input shift
    assert subs == (scheme in ("per_token_u8", "per_token_u7")) + shifted
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outs = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    fp32 = torch.nn.functional.linear(x, w, b)
    torch_out = m(x)
    assert _rel(torch.from_numpy(np.asarray(outs[0])), torch_out[0]) < 1e-3  # ORT implements the same op
    assert _rel(torch.from_numpy(np.asarray(outs[0])), fp32) < 2e-2  # and stays within the budget
    assert _rel(torch.from_numpy(np.asarray(outs[1])), torch.nn.functional.linear(x, w)) < 5e-2


def _scaled_case(m: int):
    """Rows and output channels over three decades: a scale applied along the wrong axis shows at once."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(m, 64, generator=g) * torch.logspace(-1, 2, m)[:, None]
    w = torch.randn(48, 64, generator=g) * torch.logspace(-3, 0, 48)[:, None]
    return x, w, torch.randn(48, generator=g)


def _cpu_kernel_or_skip(fn, *args):
    try:
        return fn(*args)
    except (RuntimeError, NotImplementedError) as e:  # a torch build without the CPU kernel
        pytest.skip(f"this torch has no CPU implementation: {str(e)[:120]}")


@pytest.mark.parametrize("m", [5, 48])  # _int_mm needs more than 16 rows: 5 goes through the padding
@pytest.mark.parametrize("with_bias, with_shift", [(True, False), (False, False), (True, True)])
def test_int_mm_path_matches_the_reference(m, with_bias, with_shift):
    """The CUDA kernel path (``torch._int_mm``), run where torch also implements it: on the CPU.

    The op only dispatches to it on CUDA, so without this test the conventions of the call
    (operand layout, which axis each scale applies to, the row padding) would first be exercised
    on a GPU.
    """
    x, w, b = _scaled_case(m)
    q, s = int8_linear.quantize_weight(w, pair_safe=False)
    bias = b if with_bias else None
    shift = x.mean(0) if with_shift else None
    got = _cpu_kernel_or_skip(int8_linear._int_mm_s8, x, q, s, bias, shift)
    ref = int8_linear.int8_linear_reference(x, q, s, bias, "per_token_s8", shift)
    assert got.shape == ref.shape == (m, 48)
    assert _rel(got, ref) < 1e-6  # integer accumulation: the same numbers up to fp32 rounding
    for j in (0, 47):  # the smallest and the largest output channel are both right
        assert _rel(got[:, j], ref[:, j]) < 1e-5


@pytest.mark.parametrize("with_bias", [True, False])
def test_scaled_mm_path_matches_the_reference(with_bias):
    """The fp8 kernel path (``torch._scaled_mm`` with row-wise scales), run on the CPU where torch has it.

    Both round the fp32 accumulation to bf16; they may round the bias sum differently, so they
    agree to bf16 precision (unit roundoff 2**-9), far tighter than a scale on the wrong axis.
    """
    x, w, b = _scaled_case(48)
    q, s = fp8_linear.quantize_weight(w)
    bias = b if with_bias else None
    got = _cpu_kernel_or_skip(fp8_linear._scaled_mm, x, q, s, bias)
    ref = fp8_linear.fp8_linear_reference(x, q, s, bias)
    assert got.shape == ref.shape == (48, 48) and got.dtype == x.dtype
    assert _rel(got, ref) < 4e-3
    for j in (0, 47):
        assert _rel(got[:, j], ref[:, j]) < 8e-3
    assert _rel(got, torch.nn.functional.linear(x, w, bias)) < 5e-2
