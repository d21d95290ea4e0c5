"""``graphopt::int8_linear``: dynamically quantized linear layer.

    y = int8_linear(x, weight_int8, weight_scale, bias, activation, input_shift=None)
      = (x - input_shift) @ W.T + bias,   W ~= weight_int8 * weight_scale[:, None]

``weight_int8`` is ``[N, K]`` int8 quantized per output channel
(symmetric, ``weight_scale`` ``[N]`` fp32). ``input_shift`` (``[K]``, optional)
is subtracted from ``x`` before it is quantized: the precision pass sets it to
the calibrated mean of each input channel and folds ``W @ shift`` into
``bias`` in fp32, which is exact algebra and takes the component every token
shares out of the quantization range (see :mod:`graphopt.precision.quantize`).
Activations are quantized at run time with a scale per token (row of ``x``),
in one of four schemes -- each is the one a fast kernel implements:

``"per_token_u8"`` (x86 CPUs, fbgemm, 8-bit activations)
    each row is divided by its absolute maximum, then the normalised tensor is
    quantized per tensor to uint8 (0..255) with a zero point, as
    ``torch.ops.quantized.linear_dynamic(..., reduce_range=False)`` does; the
    int32 product is dequantized and multiplied back by the row's maximum.
    Without VNNI, fbgemm multiplies uint8 activations by int8 weights with
    ``vpmaddubsw``, which adds the products of adjacent input channels
    ``(2i, 2i+1)`` in int16 *with saturation*: ``255 * (127 + 127)`` does not
    fit. The weights of this scheme are therefore quantized *pair-safe*
    (:func:`quantize_weight` with ``pair_safe=True``: ``|q[2i] + q[2i+1]| <= 128``,
    so ``255 * 128 <= 32767``), and :func:`graphopt.target.probes.fbgemm_u8_exact` probes the kernel
    once with adversarial values to confirm the pairing and the absence of
    saturation; where the probe fails, the op runs the reference instead and
    the precision pass uses ``per_token_u7``. CPUs with VNNI (AVX512-VNNI,
    AVX-VNNI) accumulate ``u8 x s8`` products in int32 without that step: where
    :func:`~graphopt.target.probes.fbgemm_plain_exact` /
    :func:`~graphopt.target.probes.onednn_plain_exact` confirm it, plain
    per-channel weights run on the kernels too (:meth:`~graphopt.target.probes.KernelProbes.weights_need_pair_safety`).
``"per_token_sym_u8"`` (x86 CPUs, oneDNN, 8-bit activations, preferred)
    symmetric per row: ``s = amax(|x_row|) / 127`` and
    ``q = floor(x * (127 / amax) + 128.5)`` -- ``x / s`` rounded half up to
    ``-127..127`` and stored as uint8 around the zero point 128, which is what
    ``torch.ops.onednn.qlinear_pointwise`` (oneDNN's u8 x s8 GEMM, the kernel of
    torch's x86 inductor quantization) takes. The int32 product is scaled by
    the weight scales in the kernel and by ``s`` per row afterwards. Measured
    about 1.2x faster than fbgemm's dynamic linear on the development CPU
    (docs/precision.md). Without VNNI the weights must be pair-safe, as for
    ``per_token_u8`` (oneDNN multiplies with the same ``vpmaddubsw``), and
    :func:`~graphopt.target.probes.onednn_u8_exact` probes the kernel once; with VNNI
    (:func:`~graphopt.target.probes.onednn_plain_exact`) plain weights are exact.
``"per_token_u7"`` (x86 CPUs, fbgemm, ``reduce_range=True``)
    the same with a 7-bit range (0..127): exact for any int8 weights, twice
    the activation step.
``"per_token_s8"`` (CUDA, ``torch._int_mm``)
    symmetric int8 per row: ``scale = amax(|x_row|) / 127``.

Kernels: CPU + ``per_token_sym_u8`` runs oneDNN's ``qlinear_pointwise`` on
weights packed once (:func:`prepack`); CPU + ``per_token_u8``/``per_token_u7`` runs fbgemm's
``quantized::linear_dynamic`` on weights packed once (:func:`prepack`, called
at optimize time; a weight met for the first time, e.g. after
``torch.export.load``, is packed on first use); CUDA + ``per_token_s8`` runs
``torch._int_mm``; anything else runs :func:`int8_linear_reference`, the
definition of the op in plain torch. The fake kernel keeps graphs exportable
(``.pt2``); :func:`int8_linear_onnx` translates the op to ONNX
``QuantizeLinear`` + ``MatMulInteger`` (exact int32 products, no saturation).

We call the quantized kernels of ``torch.ops.quantized`` directly (not
``torch.ao.quantization.quantize_dynamic``, which swaps nn.Modules, and is
deprecated) because a graph rewrite needs an operator, not a module swap;
torchao's CPU int8 path was not faster here (docs/precision.md). The shared
int8 arithmetic is in :mod:`graphopt.target.int8_kernels`. Cost: a linear's
FLOPs (``2 * rows * N * K``), so an int8 graph analyses like its fp32 one.
"""

from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from graphopt.ops.declare import OpDeclaration, linear_cost
# _pack, _onednn_pack, _onednn_gemm and _exact_u8_product are read from here by tests and benchmarks
from graphopt.target.int8_kernels import (  # noqa: F401
    _QMAX, _TINY, PAIR_LIMIT, SYM_ZERO_POINT, _asym_params, _exact_u8_product, _onednn_gemm, _onednn_pack, _pack,
    _pair_sums, _quantize_like_fbgemm, _quantize_sym_u8, _row_absmax, fbgemm_available, is_pair_safe,
    onednn_available,
)
from graphopt.target.probes import KernelProbes

log = logging.getLogger(__name__)

ACTIVATION_SCHEMES = ("per_token_sym_u8", "per_token_u8", "per_token_u7", "per_token_s8")
#: schemes whose kernels multiply uint8 activations over the full 8-bit range (need pair-safe weights)
PAIR_SAFE_SCHEMES = ("per_token_sym_u8", "per_token_u8")


@dataclass(frozen=True)
class _PackedWeight:
    """A weight packed for a CPU kernel, and whether that kernel computes it exactly here (probed once).

    ``exact``: the kernel's int32 products are exact for these weights
    (8-bit activations: the probe passed, and the weights are pair-safe or the
    kernel has VNNI). ``saturates``: the kernel would saturate these weights
    (not pair-safe, no VNNI): the op runs its reference and says so once.
    """

    packed: Any
    exact: bool
    saturates: bool
    zero_points: torch.Tensor | None = None


#: packed weights by weight tensor: the kernels' own state, kept as long as the weight lives
_packed: WeakTensorKeyDictionary = WeakTensorKeyDictionary()
_onednn_packed: WeakTensorKeyDictionary = WeakTensorKeyDictionary()
_packed_lock = threading.Lock()


def quantize_weight(weight: torch.Tensor, pair_safe: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: ``(weight_int8 [N, K], scale [N] fp32)``.

    ``pair_safe``: the scale also covers the sums of adjacent input channels,
    so that ``|q[2i] + q[2i+1]| <= 128`` (what ``per_token_u8`` needs on
    fbgemm without VNNI); it costs about 1.3x the weight step on Gaussian
    weights, instead of 2x for the activation step of ``per_token_u7``.
    """
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    if pair_safe:
        amax = torch.maximum(amax, _pair_sums(w).abs().amax(dim=1))
    scale = (amax / 127.0).clamp_min(1e-12)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def _kernel_exact(pair_safe: bool, u8_exact: bool, plain_exact: Any) -> tuple[bool, bool]:
    """(exact, saturates) of a full-range uint8 kernel for weights that are (not) pair-safe."""
    if not u8_exact:
        return False, False
    if pair_safe or plain_exact():
        return True, False
    return False, True


def prepack(weight_int8: torch.Tensor, weight_scale: torch.Tensor, scheme: str = "per_token_u8",
            probes: KernelProbes | None = None) -> bool:
    """Pack ``weight_int8`` for ``scheme``'s CPU kernel now (optimize time).

    ``probes``: this machine's kernel probes (the optimizer's
    ``ctx.target.probes``; None: probed afresh for this weight). Returns False
    where that kernel is unavailable (the op then runs its reference, or
    ``torch._int_mm`` on CUDA).
    """
    if weight_int8.device.type != "cpu":
        return False
    probes = probes or KernelProbes()
    pair_safe = is_pair_safe(weight_int8)
    if scheme == "per_token_sym_u8":
        if not onednn_available():
            return False
        with _packed_lock:
            if weight_int8 not in _onednn_packed:
                exact, saturates = _kernel_exact(pair_safe, probes.onednn_u8_exact,
                                                 lambda: probes.onednn_plain_exact)
                _onednn_packed[weight_int8] = _PackedWeight(
                    _onednn_pack(weight_int8), exact, saturates, torch.zeros(weight_int8.shape[0], dtype=torch.long))
        return True
    if not fbgemm_available():
        return False
    with _packed_lock:
        if weight_int8 not in _packed:
            exact, saturates = _kernel_exact(pair_safe, probes.fbgemm_u8_exact, lambda: probes.fbgemm_plain_exact)
            _packed[weight_int8] = _PackedWeight(_pack(weight_int8, weight_scale), exact, saturates)
    return True


def _packed_for(weight_int8: torch.Tensor, weight_scale: torch.Tensor, scheme: str) -> _PackedWeight | None:
    """The packed weight for ``scheme``'s kernel (packed on first use, e.g. after ``torch.export.load``)."""
    table = _onednn_packed if scheme == "per_token_sym_u8" else _packed
    packed = table.get(weight_int8)
    if packed is None and prepack(weight_int8, weight_scale, scheme):
        packed = table[weight_int8]
    return packed


def int8_linear_reference(x: torch.Tensor, weight_int8: torch.Tensor, weight_scale: torch.Tensor,
                          bias: Optional[torch.Tensor], activation: str = "per_token_u8",
                          input_shift: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The op's definition in plain torch (any device; exact integer products in fp32)."""
    xf = x.float()
    if input_shift is not None:
        xf = xf - input_shift.float()
    w = weight_int8.float()
    if activation in _QMAX:
        qmax = _QMAX[activation]
        row = xf.abs().amax(dim=-1, keepdim=True).clamp_min(_TINY)
        xn = xf / row
        scale, inv, zp = _asym_params(xn, qmax)
        q = _quantize_like_fbgemm(xn, inv, zp)
        acc = torch.matmul(q - zp, w.t())
        y = acc * (scale * weight_scale) * row
    elif activation == "per_token_sym_u8":
        q_u8, row = _quantize_sym_u8(xf)
        y = torch.matmul(q_u8.float() - SYM_ZERO_POINT, w.t()) * weight_scale * row
    elif activation == "per_token_s8":
        row = (xf.abs().amax(dim=-1, keepdim=True) / 127.0).clamp_min(_TINY)
        q = torch.clamp(torch.round(xf / row), -127, 127)
        y = torch.matmul(q, w.t()) * weight_scale * row
    else:
        raise ValueError(f"unknown int8 activation scheme {activation!r}; use one of {ACTIVATION_SCHEMES}")
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def _onednn_sym(x: torch.Tensor, packed: Any, zero_points: torch.Tensor, weight_scale: torch.Tensor,
                bias: Optional[torch.Tensor], input_shift: Optional[torch.Tensor]) -> torch.Tensor:
    lead, k = x.shape[:-1], x.shape[-1]
    xf = x.float().reshape(-1, k)
    if input_shift is not None:
        q, s = _quantize_sym_u8(xf - input_shift.float(), inplace=True)
    else:
        q, s = _quantize_sym_u8(xf)
    y = _onednn_gemm(q, packed, weight_scale, zero_points)
    # in place: a second output of this size measured ~10 % of the op (allocation, first touch)
    y = torch.addcmul(bias.float(), y, s, out=y) if bias is not None else y.mul_(s)
    return y.reshape(*lead, -1).to(x.dtype)


@functools.cache
def _warn_not_pair_safe(scheme: str) -> None:  # once per scheme and process: a log message, not a probe
    log.warning("int8_linear %s with weights that are not pair-safe, on a CPU whose kernel would saturate "
                "them (no VNNI): running the reference (quantize them with quantize_weight(w, pair_safe=True), "
                "or optimize with precision_int8_pair_safe=True for graphs that run on such CPUs)", scheme)


def _cpu_kernel(x: torch.Tensor, weight_int8: torch.Tensor, weight_scale: torch.Tensor,
                scheme: str) -> _PackedWeight | None:
    """The packed weight when ``scheme``'s CPU kernel runs this call exactly, else None."""
    if x.device.type != "cpu":
        return None
    packed = _packed_for(weight_int8, weight_scale, scheme)
    if packed is None:
        return None
    if scheme == "per_token_u7" or packed.exact:
        return packed
    if packed.saturates:
        _warn_not_pair_safe(scheme)
    return None


def _fbgemm(x: torch.Tensor, packed: Any, bias: Optional[torch.Tensor], input_shift: Optional[torch.Tensor],
            reduce_range: bool) -> torch.Tensor:
    xf = x.float().contiguous()
    if input_shift is not None:
        d = xf - input_shift.float()  # a fresh tensor: normalised in place below
        row = _row_absmax(d)
        d.div_(row)
    else:
        row = _row_absmax(xf)
        d = xf / row
    y = torch.ops.quantized.linear_dynamic(d, packed, reduce_range)
    y = torch.addcmul(bias.float(), y, row, out=y) if bias is not None else y.mul_(row)
    return y.to(x.dtype)


def _int_mm_s8(x: torch.Tensor, weight_int8: torch.Tensor, weight_scale: torch.Tensor,
               bias: Optional[torch.Tensor], input_shift: Optional[torch.Tensor]) -> torch.Tensor:
    lead, k = x.shape[:-1], x.shape[-1]
    xf = x.reshape(-1, k).float()
    if input_shift is not None:
        xf = xf - input_shift.float()
    row = (xf.abs().amax(dim=-1, keepdim=True) / 127.0).clamp_min(_TINY)
    q = torch.clamp(torch.round(xf / row), -127, 127).to(torch.int8)
    m = q.shape[0]
    if m <= 16:  # _int_mm needs more than 16 rows
        q = torch.cat([q, q.new_zeros(17 - m, k)])
    acc = torch._int_mm(q, weight_int8.t())[:m]
    y = acc.float() * weight_scale * row
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*lead, -1).to(x.dtype)


def _int_mm_ok(x: torch.Tensor, weight_int8: torch.Tensor) -> bool:
    n, k = weight_int8.shape
    return x.is_cuda and k % 8 == 0 and n % 8 == 0


@torch.library.custom_op("graphopt::int8_linear", mutates_args=())
def int8_linear(x: torch.Tensor, weight_int8: torch.Tensor, weight_scale: torch.Tensor,
                bias: Optional[torch.Tensor], activation: str,
                input_shift: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Dynamically quantized linear: see the module docstring for the schemes."""
    if activation in ("per_token_sym_u8", "per_token_u8", "per_token_u7"):
        kernel = _cpu_kernel(x, weight_int8, weight_scale, activation)
        if kernel is not None and activation == "per_token_sym_u8":
            return _onednn_sym(x, kernel.packed, kernel.zero_points, weight_scale, bias, input_shift)
        if kernel is not None:
            return _fbgemm(x, kernel.packed, bias, input_shift, activation == "per_token_u7")
    if activation == "per_token_s8" and _int_mm_ok(x, weight_int8):
        return _int_mm_s8(x, weight_int8, weight_scale, bias, input_shift)
    return int8_linear_reference(x, weight_int8, weight_scale, bias, activation, input_shift)


@int8_linear.register_fake
def _int8_linear_fake(x, weight_int8, weight_scale, bias, activation, input_shift=None):
    return x.new_empty(*x.shape[:-1], weight_int8.shape[0])


def int8_linear_onnx(x, weight_int8, weight_scale, bias, activation: str = "per_token_u8", input_shift=None):
    """ONNX translation: shift, per-token scaling, ``QuantizeLinear`` + ``MatMulInteger``, dequantize."""
    from onnxscript import opset18 as op  # lazy: only an ONNX export loads onnxscript (start-up speed)

    if input_shift is not None:
        x = op.Sub(x, input_shift)
    w_t = op.Transpose(weight_int8, perm=[1, 0])
    row_max = op.ReduceMax(op.Abs(x), op.Constant(value_ints=[-1]), keepdims=1)
    tiny = op.CastLike(op.Constant(value_float=_TINY), x)
    if activation == "per_token_sym_u8":
        amax = op.Max(row_max, tiny)
        inv = op.Mul(op.Reciprocal(amax), op.CastLike(op.Constant(value_float=127.0), x))
        t = op.Add(op.Mul(x, inv), op.CastLike(op.Constant(value_float=128.5), x))
        q = op.Cast(op.Floor(t), to=2)  # UINT8
        zp = op.Constant(value=_onnx_u8_scalar(SYM_ZERO_POINT))
        acc = op.MatMulInteger(q, w_t, zp)
        row = op.Div(amax, op.CastLike(op.Constant(value_float=127.0), x))
        y = op.Mul(op.Mul(op.CastLike(acc, x), weight_scale), row)
    elif activation == "per_token_s8":
        row = op.Max(op.Div(row_max, op.CastLike(op.Constant(value_float=127.0), x)), tiny)
        q = op.Cast(op.Clip(op.Round(op.Div(x, row)), op.CastLike(op.Constant(value_float=-127.0), x),
                            op.CastLike(op.Constant(value_float=127.0), x)), to=3)  # INT8
        acc = op.MatMulInteger(q, w_t)
        y = op.Mul(op.Mul(op.CastLike(acc, x), weight_scale), row)
    else:
        qmax = float(_QMAX.get(activation, 127))
        row = op.Max(row_max, tiny)
        xn = op.Div(x, row)
        zero = op.CastLike(op.Constant(value_float=0.0), x)
        lo = op.Min(op.ReduceMin(xn, keepdims=0), zero)
        hi = op.Max(op.ReduceMax(xn, keepdims=0), zero)
        scale = op.Div(op.Sub(hi, lo), op.CastLike(op.Constant(value_float=qmax), x))
        scale = op.Where(op.Equal(scale, zero), op.CastLike(op.Constant(value_float=0.1), x), scale)
        zp_f = op.Clip(op.Round(op.Div(op.Neg(lo), scale)), zero, op.CastLike(op.Constant(value_float=qmax), x))
        zp = op.Cast(zp_f, to=2)  # UINT8
        q = op.QuantizeLinear(xn, scale, zp)
        acc = op.MatMulInteger(q, w_t, zp)
        y = op.Mul(op.Mul(op.CastLike(acc, x), op.Mul(scale, weight_scale)), row)
    if bias is not None:
        y = op.Add(y, bias)
    return y


def _onnx_u8_scalar(value: int):
    import onnx  # lazy: only an ONNX export loads onnx (start-up speed)

    return onnx.helper.make_tensor("zero_point", onnx.TensorProto.UINT8, [], [value])


DECLARATIONS = (
    OpDeclaration(torch.ops.graphopt.int8_linear.default, cost=linear_cost("x", "weight_int8"),
                  onnx=int8_linear_onnx),
)
