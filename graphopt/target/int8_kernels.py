"""This machine's int8 CPU kernels (fbgemm, oneDNN) as torch exposes them, and the arithmetic they compute.

``graphopt::int8_linear`` (:mod:`graphopt.ops.int8_linear`) runs them, its
reference implementation computes the same numbers with the same functions,
and :mod:`graphopt.target.probes` runs them on adversarial values:

* weights: :func:`is_pair_safe` (``|q[2i] + q[2i+1]| <= 128``, see
  :mod:`graphopt.ops.int8_linear`);
* fbgemm: :func:`fbgemm_available`, weight packing (``_pack``), its
  quantization parameters (``_asym_params``, ``_quantize_like_fbgemm``) and
  the exact product it should compute (``_exact_u8_product``);
* oneDNN: :func:`onednn_available`, packing and the u8 x s8 GEMM
  (``_onednn_pack``, ``_onednn_gemm``), the symmetric per-row quantization
  (``_quantize_sym_u8``).

The kernel and the reference use these same functions, so they quantize
bit-identically.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

#: zero point of ``per_token_sym_u8`` (symmetric int8 values stored as uint8)
SYM_ZERO_POINT = 128
#: activation range of the fbgemm schemes (uint8 with a zero point)
_QMAX = {"per_token_u8": 255, "per_token_u7": 127}
#: |q[2i] + q[2i+1]| of pair-safe weights: 255 * 128 = 32640 <= 32767 (int16)
PAIR_LIMIT = 128
_TINY = 1e-30


def _pair_sums(w: torch.Tensor) -> torch.Tensor:
    """``w[:, 2i] + w[:, 2i+1]`` (an odd last column pairs with zero)."""
    if w.shape[1] % 2:
        w = torch.nn.functional.pad(w, (0, 1))
    return w[:, 0::2] + w[:, 1::2]


def is_pair_safe(weight_int8: torch.Tensor) -> bool:
    """True when ``|q[2i] + q[2i+1]| <= 128`` for every row (no int16 saturation with uint8 activations)."""
    return bool(_pair_sums(weight_int8.to(torch.int32)).abs().max() <= PAIR_LIMIT) if weight_int8.numel() else True


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


def _exact_u8_product(x: torch.Tensor, weight_int8: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """What ``linear_dynamic(x, W, reduce_range=False)`` computes without saturation, in float64."""
    scale, inv, zp = _asym_params(x.float(), 255)
    q = _quantize_like_fbgemm(x.float(), inv, zp).double()
    return ((q - zp.double()) @ weight_int8.double().t()) * scale.double() * weight_scale.double()


def onednn_available() -> bool:
    """True when torch ships oneDNN's quantized linear (``onednn::qlinear_pointwise``, x86 CPUs)."""
    ops = getattr(torch.ops, "onednn", None)
    try:
        return bool(torch.backends.mkldnn.is_available() and ops is not None
                    and hasattr(ops, "qlinear_pointwise") and hasattr(ops, "qlinear_prepack"))
    except Exception:  # pragma: no cover - stripped builds
        return False


def _onednn_pack(weight_int8: torch.Tensor) -> Any:
    return torch.ops.onednn.qlinear_prepack(weight_int8.contiguous(), None)


def _onednn_gemm(q_u8: torch.Tensor, packed: Any, weight_scale: torch.Tensor,
                 weight_zero_point: torch.Tensor) -> torch.Tensor:
    """``(q_u8 - 128) @ W_int8.T * weight_scale`` in fp32, by oneDNN (no bias, no activation scale)."""
    return torch.ops.onednn.qlinear_pointwise(q_u8, 1.0, SYM_ZERO_POINT, packed, weight_scale.float(),
                                              weight_zero_point, None, 1.0, 0, torch.float32, "none", [], "")


def _asym_params(xn: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(scale, inverse scale, zero point)`` as fbgemm's dynamic linear chooses them for ``xn``.

    Mirrors ``quant_utils::ChooseQuantizationParams(min, max, 0, qmax)``: the
    scale in float64, the zero point from whichever end loses less, rounded
    half to even; the scale is then stored in fp32 and the kernel multiplies
    by its fp32 inverse.
    """
    lo = xn.min().clamp(max=0).double()
    hi = xn.max().clamp(min=0).double()
    scale = (hi - lo) / qmax
    bad = (scale.float() == 0) | torch.isinf(1.0 / scale.float())
    scale = torch.where(bad, torch.full_like(scale, 0.1), scale)
    from_min, from_max = -lo / scale, qmax - hi / scale
    err_min, err_max = -(lo / scale).abs(), qmax - (hi / scale).abs()
    zero_point = torch.round(torch.where(err_min < err_max, from_min, from_max)).clamp(0, qmax).float()
    scale32 = scale.float()
    return scale32, 1.0 / scale32, zero_point


def _quantize_like_fbgemm(xn: torch.Tensor, inverse_scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """``clamp(nearbyint(zp + x * inv), 0, 255)`` with one rounding, as fbgemm's fused multiply-add does.

    fbgemm clamps to 8 bits in both schemes (a 7-bit range can round up to 128).
    """
    t = (zero_point.double() + xn.double() * inverse_scale.double()).float()
    return torch.clamp(torch.round(t), 0, 255)


def _row_absmax(d: torch.Tensor) -> torch.Tensor:
    # max(amax, -amin): two plain reductions, measured faster than abs().amax() (no temporary)
    return torch.maximum(d.amax(dim=-1, keepdim=True), d.amin(dim=-1, keepdim=True).neg_()).clamp_min_(_TINY)


def _quantize_sym_u8(d: torch.Tensor, inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q uint8, s)`` of ``per_token_sym_u8``: ``q = floor(d * (127 / amax_row) + 128.5)``, ``s = amax_row / 127``.

    ``floor`` is the conversion to an integer (``t`` lies in ``[1.5, 255.5]``),
    through int16: torch's fp32 -> int16 conversion measured 2-3x faster
    than fp32 -> uint8 on the development CPUs, and int16 -> uint8 is exact
    for these values. The kernel and the reference share this function, so
    they quantize bit-identically. ``inplace`` reuses ``d`` (a temporary of
    the caller).
    """
    amax = _row_absmax(d)
    t = d.mul_(amax.reciprocal().mul_(127.0)) if inplace else d.mul(amax.reciprocal().mul_(127.0))
    return t.add_(128.5).to(torch.int16).to(torch.uint8), amax.div_(127.0)
