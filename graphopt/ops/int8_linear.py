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
    so ``255 * 128 <= 32767``), and :func:`fbgemm_u8_exact` probes the kernel
    once with adversarial values to confirm the pairing and the absence of
    saturation; where the probe fails, the op runs the reference instead and
    the precision pass uses ``per_token_u7``. CPUs with VNNI (AVX512-VNNI,
    AVX-VNNI) accumulate ``u8 x s8`` products in int32 without that step: where
    :func:`fbgemm_plain_exact` / :func:`onednn_plain_exact` confirm it, plain
    per-channel weights run on the kernels too (:func:`weights_need_pair_safety`).
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
    :func:`onednn_u8_exact` probes the kernel once; with VNNI
    (:func:`onednn_plain_exact`) plain weights are exact.
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
torchao's CPU int8 path was not faster here (docs/precision.md).
"""

from __future__ import annotations

import functools
import logging
import threading
import warnings
from typing import Any, Optional

import torch
from torch.utils.weak import WeakTensorKeyDictionary

log = logging.getLogger(__name__)

ACTIVATION_SCHEMES = ("per_token_sym_u8", "per_token_u8", "per_token_u7", "per_token_s8")
#: schemes whose kernels multiply uint8 activations over the full 8-bit range (need pair-safe weights)
PAIR_SAFE_SCHEMES = ("per_token_sym_u8", "per_token_u8")
#: zero point of ``per_token_sym_u8`` (symmetric int8 values stored as uint8)
SYM_ZERO_POINT = 128
#: activation range of the fbgemm schemes (uint8 with a zero point)
_QMAX = {"per_token_u8": 255, "per_token_u7": 127}
#: |q[2i] + q[2i+1]| of pair-safe weights: 255 * 128 = 32640 <= 32767 (int16)
PAIR_LIMIT = 128
_TINY = 1e-30

_packed: WeakTensorKeyDictionary = WeakTensorKeyDictionary()
_onednn_packed: WeakTensorKeyDictionary = WeakTensorKeyDictionary()
_packed_lock = threading.Lock()


def _pair_sums(w: torch.Tensor) -> torch.Tensor:
    """``w[:, 2i] + w[:, 2i+1]`` (an odd last column pairs with zero)."""
    if w.shape[1] % 2:
        w = torch.nn.functional.pad(w, (0, 1))
    return w[:, 0::2] + w[:, 1::2]


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


#: probe weight rows (repeated over 64 input channels, and negated): pair-safe, with the large values
#: placed so that a pairing other than ``(2i, 2i+1)`` (``(2i+1, 2i+2)``, ``(i, i+2)``) would saturate
_PAIR_SAFE_PATTERNS = [(64, 64), (127, 1, 1, 127), (127, 1, 127, 1), (-64, -64), (-127, -1, -1, -127),
                       (100, 28, -128, 0)]
#: plain weights whose adjacent channels are both at +-127: ``vpmaddubsw``'s int16 pair sum
#: (``255 * 254``) saturates on them
_PLAIN_PATTERNS = [(127, 127), (-127, -127), (127, 127, -127, -127), (127, -127, 127, 127)]
_PROBE_K = 64


def _probe_weights(patterns: list[tuple[int, ...]]) -> torch.Tensor:
    rows = [torch.tensor(p * (_PROBE_K // len(p)), dtype=torch.int8) for p in patterns]
    return torch.stack(rows + [-r for r in rows])


def _fbgemm_exact(w: torch.Tensor, what: str) -> bool:
    """fbgemm's dynamic linear with 8-bit activations at 255 against ``w``, vs the exact product."""
    if not fbgemm_available():
        return False
    x = torch.ones(4, _PROBE_K)
    x[:, 0] = 0.0  # min 0, max 1: every other activation quantizes to 255
    s = torch.full((w.shape[0],), 0.01)
    try:
        got = torch.ops.quantized.linear_dynamic(x, _pack(w, s), False).double()
    except Exception as exc:  # pragma: no cover - kernel missing at run time
        log.info("fbgemm %s probe failed to run: %s", what, exc)
        return False
    return bool(torch.allclose(got, _exact_u8_product(x, w, s), rtol=1e-6, atol=1e-6))


@functools.cache
def fbgemm_u8_exact() -> bool:
    """Probe: do pair-safe weights give exact int32 products with 8-bit activations here?

    Activations at 255 (the top of the uint8 range) against weights whose
    adjacent-channel sums sit at the limit, with both signs and with the large
    values placed so that a different pairing would saturate
    (``_PAIR_SAFE_PATTERNS``). True on VNNI CPUs (no int16 step) and on
    AVX2 fbgemm (pairs ``(2i, 2i+1)``); False sends ``per_token_u8`` to the
    reference implementation and makes the pass choose ``per_token_u7``.
    """
    w = _probe_weights(_PAIR_SAFE_PATTERNS)
    if not is_pair_safe(w):  # pragma: no cover - the patterns are built pair-safe
        raise AssertionError("probe weights must be pair-safe")
    ok = _fbgemm_exact(w, "u8")
    if not ok and fbgemm_available():
        log.info("fbgemm saturates pair-safe weights with 8-bit activations here: using per_token_u7")
    return ok


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


def _onednn_exact(w: torch.Tensor, what: str) -> bool:
    """oneDNN's u8 x s8 GEMM on activations at 255 (and 0, 1, 128) against ``w``, vs the exact product."""
    if not onednn_available():
        return False
    q = torch.full((4, _PROBE_K), 255, dtype=torch.uint8)
    q[1, ::2] = 0
    q[2, 1::2] = 1
    q[3, ::4] = SYM_ZERO_POINT
    s = torch.full((w.shape[0],), 0.01)
    try:
        got = _onednn_gemm(q, _onednn_pack(w), s, torch.zeros(w.shape[0], dtype=torch.long)).double()
    except Exception as exc:  # pragma: no cover - kernel missing at run time
        log.info("oneDNN %s probe failed to run: %s", what, exc)
        return False
    exact = ((q.double() - SYM_ZERO_POINT) @ w.double().t()) * s.double()
    return bool(torch.allclose(got, exact, rtol=1e-6, atol=1e-6))


@functools.cache
def onednn_u8_exact() -> bool:
    """Probe: does oneDNN give exact int32 products for full-range uint8 activations and pair-safe weights?

    The adversarial pair-safe weights of :func:`fbgemm_u8_exact`. False (or
    oneDNN missing) makes the pass use fbgemm's schemes instead.
    """
    ok = _onednn_exact(_probe_weights(_PAIR_SAFE_PATTERNS), "u8")
    if not ok and onednn_available():
        log.info("oneDNN saturates pair-safe weights with 8-bit activations here: not using per_token_sym_u8")
    return ok


@functools.cache
def onednn_plain_exact() -> bool:
    """Probe: does oneDNN's u8 x s8 GEMM give exact int32 products for *any* int8 weights here?

    True on CPUs where oneDNN multiplies with VNNI (``vpdpbusd`` accumulates
    u8 x s8 products straight into int32) or AMX; False on AVX2 without VNNI,
    where the int16 pair step saturates (``_PLAIN_PATTERNS``). Where True,
    weights need not be pair-safe (:func:`weights_need_pair_safety`): a finer
    weight step for free.
    """
    return _onednn_exact(_probe_weights(_PLAIN_PATTERNS), "plain-weight")


@functools.cache
def fbgemm_plain_exact() -> bool:
    """Probe: does fbgemm's dynamic linear (8-bit activations) give exact products for any int8 weights?

    True on VNNI CPUs, False on AVX2 (int16 pair saturation); see :func:`onednn_plain_exact`.
    """
    return _fbgemm_exact(_probe_weights(_PLAIN_PATTERNS), "plain-weight")


def weights_need_pair_safety(scheme: str) -> bool:
    """True when ``scheme``'s kernel on this machine saturates plain int8 weights (quantize them pair-safe).

    Only the full-range uint8 schemes can saturate, and only on kernels
    without VNNI (:func:`onednn_plain_exact`, :func:`fbgemm_plain_exact`).
    """
    if scheme == "per_token_sym_u8":
        return not onednn_plain_exact()
    if scheme == "per_token_u8":
        return not fbgemm_plain_exact()
    return False


def prepack(weight_int8: torch.Tensor, weight_scale: torch.Tensor, scheme: str = "per_token_u8") -> bool:
    """Pack ``weight_int8`` for ``scheme``'s CPU kernel now (optimize time).

    Returns False where that kernel is unavailable (the op then runs its
    reference, or ``torch._int_mm`` on CUDA).
    """
    if weight_int8.device.type != "cpu":
        return False
    if scheme == "per_token_sym_u8":
        if not onednn_available():
            return False
        with _packed_lock:
            if weight_int8 not in _onednn_packed:
                _onednn_packed[weight_int8] = (_onednn_pack(weight_int8), is_pair_safe(weight_int8),
                                               torch.zeros(weight_int8.shape[0], dtype=torch.long))
        return True
    if not fbgemm_available():
        return False
    with _packed_lock:
        if weight_int8 not in _packed:
            _packed[weight_int8] = (_pack(weight_int8, weight_scale), is_pair_safe(weight_int8))
    return True


def _packed_for(weight_int8: torch.Tensor, weight_scale: torch.Tensor) -> tuple[Any, bool]:
    packed = _packed.get(weight_int8)
    if packed is None:
        prepack(weight_int8, weight_scale)
        packed = _packed[weight_int8]
    return packed


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


def _onednn_packed_for(weight_int8: torch.Tensor, weight_scale: torch.Tensor) -> tuple[Any, bool, torch.Tensor]:
    packed = _onednn_packed.get(weight_int8)
    if packed is None:
        prepack(weight_int8, weight_scale, "per_token_sym_u8")
        packed = _onednn_packed[weight_int8]
    return packed


def _kernel_takes(pair_safe: bool, scheme: str) -> bool:
    """Can ``scheme``'s kernel run these weights exactly here? If not, say once per scheme that the op
    runs its reference instead."""
    if pair_safe or not weights_need_pair_safety(scheme):
        return True
    _warn_not_pair_safe(scheme)
    return False


@functools.cache
def _warn_not_pair_safe(scheme: str) -> None:
    log.warning("int8_linear %s with weights that are not pair-safe, on a CPU whose kernel would saturate "
                "them (no VNNI): running the reference (quantize them with quantize_weight(w, pair_safe=True), "
                "or optimize with precision_int8_pair_safe=True for graphs that run on such CPUs)", scheme)


def _onednn_usable(x: torch.Tensor, weight_int8: torch.Tensor,
                   weight_scale: torch.Tensor) -> tuple[Any, torch.Tensor] | None:
    """``(packed weight, weight zero points)`` when oneDNN can run this call, else None."""
    if x.device.type != "cpu" or not onednn_u8_exact():
        return None
    packed, pair_safe, zero_points = _onednn_packed_for(weight_int8, weight_scale)
    return (packed, zero_points) if _kernel_takes(pair_safe, "per_token_sym_u8") else None


def _fbgemm(x: torch.Tensor, weight_int8: torch.Tensor, weight_scale: torch.Tensor, bias: Optional[torch.Tensor],
            input_shift: Optional[torch.Tensor], reduce_range: bool) -> torch.Tensor:
    packed, _ = _packed_for(weight_int8, weight_scale)
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


def _fbgemm_ok(x: torch.Tensor, weight_int8: torch.Tensor, weight_scale: torch.Tensor, activation: str) -> bool:
    if x.device.type != "cpu" or not fbgemm_available():
        return False
    if activation == "per_token_u7":
        return True
    if activation != "per_token_u8" or not fbgemm_u8_exact():
        return False
    return _kernel_takes(_packed_for(weight_int8, weight_scale)[1], "per_token_u8")


@torch.library.custom_op("graphopt::int8_linear", mutates_args=())
def int8_linear(x: torch.Tensor, weight_int8: torch.Tensor, weight_scale: torch.Tensor,
                bias: Optional[torch.Tensor], activation: str,
                input_shift: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Dynamically quantized linear: see the module docstring for the schemes."""
    onednn = _onednn_usable(x, weight_int8, weight_scale) if activation == "per_token_sym_u8" else None
    if onednn is not None:
        return _onednn_sym(x, *onednn, weight_scale, bias, input_shift)
    if _fbgemm_ok(x, weight_int8, weight_scale, activation):
        return _fbgemm(x, weight_int8, weight_scale, bias, input_shift, activation == "per_token_u7")
    if activation == "per_token_s8" and _int_mm_ok(x, weight_int8):
        return _int_mm_s8(x, weight_int8, weight_scale, bias, input_shift)
    return int8_linear_reference(x, weight_int8, weight_scale, bias, activation, input_shift)


@int8_linear.register_fake
def _int8_linear_fake(x, weight_int8, weight_scale, bias, activation, input_shift=None):
    return x.new_empty(*x.shape[:-1], weight_int8.shape[0])


def int8_linear_onnx(x, weight_int8, weight_scale, bias, activation: str = "per_token_u8", input_shift=None):
    """ONNX translation: shift, per-token scaling, ``QuantizeLinear`` + ``MatMulInteger``, dequantize."""
    from onnxscript import opset18 as op

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
    import onnx

    return onnx.helper.make_tensor("zero_point", onnx.TensorProto.UINT8, [], [value])


ONNX_TRANSLATIONS = {torch.ops.graphopt.int8_linear.default: int8_linear_onnx}
