"""``graphopt::int8_linear``: dynamically quantized linear layer.

    y = int8_linear(x, weight_int8, weight_scale, bias, activation)

``weight_int8`` is ``[N, K]`` int8 quantized per output channel
(symmetric, ``weight_scale`` ``[N]`` fp32: ``W ~= weight_int8 * weight_scale[:, None]``).
Activations are quantized at run time with a scale per token (row of ``x``),
in one of two schemes -- each is the one a fast kernel implements:

``"per_token_u7"`` (x86 CPUs, fbgemm)
    each row is divided by its absolute maximum, then the normalised tensor is
    quantized per tensor to uint8 with a zero point and a 7-bit range (0..127),
    exactly as ``torch.ops.quantized.linear_dynamic(..., reduce_range=True)``
    does; the int32 product is dequantized and multiplied back by the row's
    maximum. The 7-bit range is fbgemm's: AVX2 has no int8 dot product without
    int16 saturation, 7-bit activations keep it exact. Dividing rows by their
    maximum first is what gives the per-token scale on a per-tensor kernel.
``"per_token_s8"`` (CUDA, ``torch._int_mm``)
    symmetric int8 per row: ``scale = amax(|x_row|) / 127``.

Kernels: CPU + ``per_token_u7`` runs fbgemm's ``quantized::linear_dynamic``
on weights packed once (:func:`prepack`, called at optimize time; a weight met
for the first time, e.g. after ``torch.export.load``, is packed on first use);
CUDA + ``per_token_s8`` runs ``torch._int_mm``; anything else runs
:func:`int8_linear_reference`, the definition of the op in plain torch. The
fake kernel keeps graphs exportable (``.pt2``); :func:`int8_linear_onnx`
translates the op to ONNX ``QuantizeLinear`` + ``MatMulInteger``.

We call the quantized kernels of ``torch.ops.quantized`` directly (not
``torch.ao.quantization.quantize_dynamic``, which swaps nn.Modules, and is
deprecated) because a graph rewrite needs an operator, not a module swap;
torchao's CPU int8 path was not faster here (docs/precision.md).
"""

from __future__ import annotations

import logging
import threading
import warnings
from typing import Any, Optional

import torch
from torch.utils.weak import WeakTensorKeyDictionary

log = logging.getLogger(__name__)

ACTIVATION_SCHEMES = ("per_token_u7", "per_token_s8")
_U7_QMAX = 127
_TINY = 1e-30

_packed: WeakTensorKeyDictionary = WeakTensorKeyDictionary()
_packed_lock = threading.Lock()


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: ``(weight_int8 [N, K], scale [N] fp32)``."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def fbgemm_available() -> bool:
    """True when torch ships the x86 quantized kernels (fbgemm / x86 engine)."""
    try:
        engines = torch.backends.quantized.supported_engines
    except Exception:  # pragma: no cover - very old / stripped builds
        return False
    return bool({"fbgemm", "x86"} & set(engines)) and hasattr(torch.ops.quantized, "linear_dynamic")


def _pack(weight_int8: torch.Tensor, weight_scale: torch.Tensor) -> Any:
    with warnings.catch_warnings():  # quantized tensors are deprecated; the kernels are what we use
        warnings.simplefilter("ignore")
        qweight = torch._make_per_channel_quantized_tensor(
            weight_int8.contiguous(), weight_scale.double(), torch.zeros_like(weight_scale, dtype=torch.long), 0
        )
        return torch.ops.quantized.linear_prepack(qweight, None)


def prepack(weight_int8: torch.Tensor, weight_scale: torch.Tensor) -> bool:
    """Pack ``weight_int8`` for fbgemm now (optimize time). Returns False where fbgemm is unavailable."""
    if not fbgemm_available() or weight_int8.device.type != "cpu":
        return False
    with _packed_lock:
        if weight_int8 not in _packed:
            _packed[weight_int8] = _pack(weight_int8, weight_scale)
    return True


def _packed_for(weight_int8: torch.Tensor, weight_scale: torch.Tensor) -> Any:
    packed = _packed.get(weight_int8)
    if packed is None:
        prepack(weight_int8, weight_scale)
        packed = _packed[weight_int8]
    return packed


def _u7_params(xn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fbgemm's ChooseQuantizationParams(min, max, 0, 255, reduce_range=True) on a tensor."""
    lo = xn.min().clamp(max=0).double()
    hi = xn.max().clamp(min=0).double()
    scale = ((hi - lo) / _U7_QMAX).float()
    scale = torch.where(scale == 0, torch.full_like(scale, 0.1), scale)
    zero_point = torch.round(-lo / scale.double()).clamp(0, _U7_QMAX).float()
    return scale, zero_point


def int8_linear_reference(x: torch.Tensor, weight_int8: torch.Tensor, weight_scale: torch.Tensor,
                          bias: Optional[torch.Tensor], activation: str = "per_token_u7") -> torch.Tensor:
    """The op's definition in plain torch (any device; exact integer products in fp32)."""
    xf = x.float()
    w = weight_int8.float()
    if activation == "per_token_u7":
        row = xf.abs().amax(dim=-1, keepdim=True).clamp_min(_TINY)
        xn = xf / row
        scale, zp = _u7_params(xn)
        q = torch.clamp(torch.round(xn / scale) + zp, 0, 255)
        acc = torch.matmul(q - zp, w.t())
        y = acc * (scale * weight_scale) * row
    elif activation == "per_token_s8":
        row = (xf.abs().amax(dim=-1, keepdim=True) / 127.0).clamp_min(_TINY)
        q = torch.clamp(torch.round(xf / row), -127, 127)
        y = torch.matmul(q, w.t()) * weight_scale * row
    else:
        raise ValueError(f"unknown int8 activation scheme {activation!r}; use one of {ACTIVATION_SCHEMES}")
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def _fbgemm_u7(x: torch.Tensor, weight_int8: torch.Tensor, weight_scale: torch.Tensor,
               bias: Optional[torch.Tensor]) -> torch.Tensor:
    packed = _packed_for(weight_int8, weight_scale)
    xf = x.float().contiguous()
    row = xf.abs().amax(dim=-1, keepdim=True).clamp_min_(_TINY)
    y = torch.ops.quantized.linear_dynamic(xf / row, packed, True)
    if bias is not None:
        y = torch.addcmul(bias.float(), y, row)
    else:
        y = y.mul_(row)
    return y.to(x.dtype)


def _int_mm_s8(x: torch.Tensor, weight_int8: torch.Tensor, weight_scale: torch.Tensor,
               bias: Optional[torch.Tensor]) -> torch.Tensor:
    lead, k = x.shape[:-1], x.shape[-1]
    xf = x.reshape(-1, k).float()
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
                bias: Optional[torch.Tensor], activation: str) -> torch.Tensor:
    """Dynamically quantized linear: see the module docstring for the schemes."""
    if activation == "per_token_u7" and x.device.type == "cpu" and fbgemm_available():
        return _fbgemm_u7(x, weight_int8, weight_scale, bias)
    if activation == "per_token_s8" and _int_mm_ok(x, weight_int8):
        return _int_mm_s8(x, weight_int8, weight_scale, bias)
    return int8_linear_reference(x, weight_int8, weight_scale, bias, activation)


@int8_linear.register_fake
def _int8_linear_fake(x, weight_int8, weight_scale, bias, activation):
    return x.new_empty(*x.shape[:-1], weight_int8.shape[0])


def int8_linear_onnx(x, weight_int8, weight_scale, bias, activation: str = "per_token_u7"):
    """ONNX translation: per-token scaling, ``QuantizeLinear`` + ``MatMulInteger``, dequantize."""
    from onnxscript import opset18 as op

    w_t = op.Transpose(weight_int8, perm=[1, 0])
    row_max = op.ReduceMax(op.Abs(x), op.Constant(value_ints=[-1]), keepdims=1)
    tiny = op.CastLike(op.Constant(value_float=_TINY), x)
    if activation == "per_token_s8":
        row = op.Max(op.Div(row_max, op.CastLike(op.Constant(value_float=127.0), x)), tiny)
        q = op.Cast(op.Clip(op.Round(op.Div(x, row)), op.CastLike(op.Constant(value_float=-127.0), x),
                            op.CastLike(op.Constant(value_float=127.0), x)), to=3)  # INT8
        acc = op.MatMulInteger(q, w_t)
        y = op.Mul(op.Mul(op.CastLike(acc, x), weight_scale), row)
    else:
        row = op.Max(row_max, tiny)
        xn = op.Div(x, row)
        zero = op.CastLike(op.Constant(value_float=0.0), x)
        lo = op.Min(op.ReduceMin(xn, keepdims=0), zero)
        hi = op.Max(op.ReduceMax(xn, keepdims=0), zero)
        scale = op.Div(op.Sub(hi, lo), op.CastLike(op.Constant(value_float=float(_U7_QMAX)), x))
        scale = op.Where(op.Equal(scale, zero), op.CastLike(op.Constant(value_float=0.1), x), scale)
        zp_f = op.Clip(op.Round(op.Div(op.Neg(lo), scale)), zero,
                       op.CastLike(op.Constant(value_float=float(_U7_QMAX)), x))
        zp = op.Cast(zp_f, to=2)  # UINT8
        q = op.QuantizeLinear(xn, scale, zp)
        acc = op.MatMulInteger(q, w_t, zp)
        y = op.Mul(op.Mul(op.CastLike(acc, x), op.Mul(scale, weight_scale)), row)
    if bias is not None:
        y = op.Add(y, bias)
    return y


ONNX_TRANSLATIONS = {torch.ops.graphopt.int8_linear.default: int8_linear_onnx}
