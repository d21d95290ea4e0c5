"""Weight-only quantized linears: int8 per channel and group-wise int4 weights, bf16 activations.

    y = int8_weight_only_linear(x, weight_int8, weight_scale, bias)
      = bf16(bf16(x) @ (weight_int8 * weight_scale[:, None]).T) + bias       (returned in x's dtype)
    y = int4_weight_only_linear(x, packed_weight, scales_and_zeros, group_size, bias)
      = bf16(bf16(x) @ W4.T) + bias,   W4[n, k] = (q[n, k] - 8) * scale[k // G, n] + zero[k // G, n]

For decoding with a language model, where every linear is a matrix-vector
product (a few rows of ``x``) and the time goes into reading the weights,
fewer weight bytes are what makes a linear faster: the activations are not
quantized, they are only rounded to bf16 for the kernel.

Storage (what the graph holds, device-independent, what :func:`quantize_int8_weight_only` and
:func:`quantize_int4` return):

``int8``
    ``weight_int8`` ``[N, K]`` int8, symmetric per output channel;
    ``weight_scale`` ``[N]`` bf16 (the kernel's scale dtype; the quantization
    divides by the bf16-rounded scale, so the kernel's and the reference's
    weights are the same numbers).
``int4``
    ``packed_weight`` ``[N, K / 2]`` uint8, two unsigned 4-bit values
    ``q`` (0..15) per byte, the even input channel in the high nibble (the
    layout CUDA's ``torch._convert_weight_to_int4pack`` takes);
    ``scales_and_zeros`` ``[K / G, N, 2]`` bf16 (torch's layout:
    ``scale = (max - min) / 15`` and ``zero = min + 8 * scale`` per group of
    ``G`` input channels of one output channel, asymmetric; ``min`` and
    ``max`` are the group's, each pulled in by the factor of
    :data:`INT4_CLIP_FACTORS` that gives the group the least squared rounding
    error: a lone large weight would otherwise spread the 16 levels over
    values the rest never take -- the fitted clipping AWQ and llama.cpp apply,
    here without activations).

Kernels: CPU: ``torch._weight_int8pack_mm`` (int8) and
``torch._weight_int4pack_mm_for_cpu`` on the weight converted once by
``torch._convert_weight_to_int4pack_for_cpu`` (int4; output channels padded to
a multiple of 16, which the CPU packing needs). CUDA (int4; written against
torch's documented layouts, *not run here*: no GPU was available):
``torch._weight_int4pack_mm`` on ``torch._convert_weight_to_int4pack``
(``inner_k_tiles`` 8, 4 or 2 as ``K`` allows). A kernel's layout of a weight
is made once per weight tensor (:func:`prepack`, at optimize time, or on first
use after ``torch.export.load``) and kept as long as the weight lives.
Anything else -- another device, shapes a kernel refuses -- runs the
reference (:func:`int8_weight_only_reference`, :func:`int4_weight_only_reference`:
dequantize, then matmul), which is the ops' definition and computes the same
numbers as the kernels up to the order of the fp32 sums.

Cost: a linear's FLOPs (``2 * rows * N * K``); bytes read are the stored
tensors' (int8: 1 byte per weight, int4: half a byte, plus the bf16 scales).
ONNX: the weight is dequantized (nibbles unpacked with ``BitShift`` /
``BitwiseAnd``) and multiplied with ``MatMul``; ``x`` and the product are
rounded through bf16 as the kernels round them.
"""

from __future__ import annotations

import threading
from typing import Any, Optional

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from graphopt.ops.declare import OpDeclaration, linear_cost

__all__ = ["GROUP_SIZES", "int4_group_size", "int4_kernel", "int4_weight_only_reference", "int8_kernel",
           "int4_kernel_call", "int8_kernel_call",
           "int8_weight_only_reference", "kernel_layout", "prepack", "quantize_int4", "quantize_int8_weight_only",
           "unpack_int4"]

#: int4 group sizes, largest first: the quantizer takes the largest that divides ``in_features``
GROUP_SIZES = (128, 64, 32)
#: the factors each int4 group's range is tried at (1: its min and max), the one with the least squared error kept.
#: Five: 13 (1 down to 0.7 by 0.025) lowered Gaussian weights' squared error by 11.1% against these 10.3%, at twice
#: the time (a 32000 x 512 weight: about 2.1 s against 0.25 s for min-max alone, 2 threads)
INT4_CLIP_FACTORS = (1.0, 0.95, 0.9, 0.85, 0.8)
#: the CPU int4 packing wants the output channels in multiples of this
_CPU_N_MULTIPLE = 16
_TINY = 1e-12

#: kernel layouts by stored weight: (device type, packed weight, scales for the kernel, rows padded)
_kernel_layouts: WeakTensorKeyDictionary = WeakTensorKeyDictionary()
_lock = threading.Lock()


# ---------------------------------------------------------------------------------------------- quantization
def quantize_int8_weight_only(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: ``(weight_int8 [N, K], scale [N] bf16)``."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(_TINY).to(torch.bfloat16)
    q = torch.round(w / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def int4_group_size(in_features: int) -> int | None:
    """The largest of :data:`GROUP_SIZES` dividing ``in_features`` (None: none does, int4 is declined)."""
    return next((g for g in GROUP_SIZES if in_features % g == 0), None)


def quantize_int4(weight: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Group-wise asymmetric int4: ``(packed_weight [N, K/2] uint8, scales_and_zeros [K/G, N, 2] bf16, G)``.

    ``group_size`` None: the largest of :data:`GROUP_SIZES` dividing ``K``;
    raises ValueError when none does (or the one given does not divide ``K``).
    """
    w = weight.detach().float()
    n, k = w.shape
    g = group_size if group_size is not None else int4_group_size(k)
    if g is None or k % g != 0:
        raise ValueError(f"in_features {k} is not divisible by any int4 group size {GROUP_SIZES}"
                         if g is None else f"in_features {k} is not divisible by the group size {g}")
    groups = w.reshape(n, k // g, g)
    scale, zero = _int4_scales(groups)
    # quantize against the stored (bf16) scale and zero, so the weights the kernels see are these numbers
    q = _int4_levels(groups, scale.float(), zero.float())
    q = q.reshape(n, k).to(torch.uint8)
    packed = (q[:, 0::2] << 4) | q[:, 1::2]
    scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()  # [K/G, N, 2]
    return packed.contiguous(), scales_and_zeros, g


def _int4_levels(groups: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The 4-bit values ``q`` (0..15, float) of ``groups`` ``[N, K/G, G]`` at each group's ``scale`` and ``zero``."""
    return torch.round((groups - zero[..., None]) / scale[..., None] + 8.0).clamp_(0, 15)


def _int4_scales(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's bf16 ``(scale, zero)``: from its min and max scaled by the :data:`INT4_CLIP_FACTORS` factor
    whose stored (bf16) scale and zero round the group with the least squared error (weights beyond the range
    clamp to its ends); factor 1 is among them, so no group rounds worse than at its own min and max."""
    lo0, hi0 = groups.amin(dim=-1), groups.amax(dim=-1)
    best_scale = best_zero = best = None
    for factor in INT4_CLIP_FACTORS:
        lo, hi = lo0 * factor, hi0 * factor
        scale = ((hi - lo) / 15.0).clamp_min(_TINY).to(torch.bfloat16)
        zero = (lo + 8.0 * scale.float()).to(torch.bfloat16)
        s, z = scale.float(), zero.float()
        err = ((_int4_levels(groups, s, z) - 8.0) * s[..., None] + z[..., None] - groups).square_().sum(dim=-1)
        if best is None:
            best_scale, best_zero, best = scale, zero, err
            continue
        better = err < best
        best = torch.where(better, err, best)
        best_scale, best_zero = torch.where(better, scale, best_scale), torch.where(better, zero, best_zero)
    return best_scale, best_zero


def unpack_int4(packed_weight: torch.Tensor) -> torch.Tensor:
    """The 4-bit values ``q`` (0..15) of ``packed_weight``, ``[N, K]`` uint8."""
    hi, lo = packed_weight >> 4, packed_weight & 0x0F
    return torch.stack([hi, lo], dim=-1).reshape(packed_weight.shape[0], -1)


def dequantize_int4(packed_weight: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """The fp32 weight ``[N, K]`` the int4 op multiplies by."""
    q = unpack_int4(packed_weight).float()
    n, k = q.shape
    sz = scales_and_zeros.float().transpose(0, 1)  # [N, K/G, 2]
    w = (q.reshape(n, k // group_size, group_size) - 8.0) * sz[..., :1] + sz[..., 1:]
    return w.reshape(n, k)


# ---------------------------------------------------------------------------------------------- references
def _finish(y_bf16: torch.Tensor, bias: Optional[torch.Tensor], lead: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """``y_bf16`` in ``dtype`` plus the bias (in ``dtype``), shaped ``(*lead, N)``."""
    y = y_bf16.reshape(*lead, -1)
    if bias is not None and bias.dtype == dtype and dtype in (torch.float32, torch.bfloat16):
        return torch.add(bias, y)  # one op: type promotion casts y to dtype (about 1 us less per call)
    y = y.to(dtype)
    return y + bias.to(dtype) if bias is not None else y


def int8_weight_only_reference(x: torch.Tensor, weight_int8: torch.Tensor, weight_scale: torch.Tensor,
                               bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The int8 op's definition in plain torch (any device): bf16 x, fp32 sums, bf16 product, bias in x's dtype."""
    lead, k = x.shape[:-1], x.shape[-1]
    xb = x.reshape(-1, k).to(torch.bfloat16).float()
    y = (xb @ weight_int8.float().t()) * weight_scale.float()
    return _finish(y.to(torch.bfloat16), bias, lead, x.dtype)


def int4_weight_only_reference(x: torch.Tensor, packed_weight: torch.Tensor, scales_and_zeros: torch.Tensor,
                               group_size: int, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The int4 op's definition in plain torch (any device): dequantize, then as the int8 reference."""
    lead, k = x.shape[:-1], x.shape[-1]
    xb = x.reshape(-1, k).to(torch.bfloat16).float()
    y = xb @ dequantize_int4(packed_weight, scales_and_zeros, group_size).t()
    return _finish(y.to(torch.bfloat16), bias, lead, x.dtype)


# ---------------------------------------------------------------------------------------------- kernels
def int8_kernel(device: torch.device | str) -> bool:
    """True where ``torch._weight_int8pack_mm`` runs the int8 op (CPU builds of torch that have it)."""
    return torch.device(device).type == "cpu" and hasattr(torch, "_weight_int8pack_mm")


def int4_kernel(device: torch.device | str) -> bool:
    """True where torch has an int4 kernel for ``device``: the CPU one, or CUDA's (tinygemm) on a GPU."""
    device = torch.device(device)
    if device.type == "cpu":
        return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
    return device.type == "cuda" and torch.cuda.is_available() and hasattr(torch.ops.aten, "_weight_int4pack_mm")


def _inner_k_tiles(k: int) -> int | None:
    return next((t for t in (8, 4, 2) if k % (t * 16) == 0), None)


def _int4_layout(packed_weight: torch.Tensor, scales_and_zeros: torch.Tensor) -> Optional[tuple]:
    """``(packed for the kernel, scales_and_zeros, rows padded)`` on the weight's device, or None (no kernel)."""
    n, k = packed_weight.shape[0], packed_weight.shape[1] * 2
    device = packed_weight.device
    if device.type == "cpu" and int4_kernel(device):
        pad = -n % _CPU_N_MULTIPLE
        q = unpack_int4(packed_weight).to(torch.int32)
        sz = scales_and_zeros
        if pad:
            q = torch.cat([q, q.new_full((pad, k), 8)])
            sz = torch.cat([sz, sz.new_zeros(sz.shape[0], pad, 2)], dim=1)
        return torch._convert_weight_to_int4pack_for_cpu(q, 1), sz.contiguous(), pad
    if device.type == "cuda" and int4_kernel(device) and n % 8 == 0 and _inner_k_tiles(k) is not None:
        return torch._convert_weight_to_int4pack(packed_weight.contiguous(), _inner_k_tiles(k)), \
            scales_and_zeros.contiguous(), 0
    return None


def prepack(weight: torch.Tensor, scales: torch.Tensor) -> bool:
    """Make the kernel's layout of a stored weight now (optimize time); False where the reference runs.

    ``weight`` is ``weight_int8`` (int8, its scales are used as they are) or
    ``packed_weight`` (uint8, converted for the CPU or CUDA int4 kernel).
    """
    with _lock:
        if weight in _kernel_layouts:
            return _kernel_layouts[weight] is not None
        layout = _int4_layout(weight, scales) if weight.dtype == torch.uint8 else None
        if weight.dtype == torch.int8:
            # the int8 kernel reads the stored weight itself (a layout holding it would keep its key alive)
            layout = (None, scales.to(torch.bfloat16), 0) if int8_kernel(weight.device) else None
        _kernel_layouts[weight] = layout
        return layout is not None


def kernel_layout(weight: torch.Tensor, scales: torch.Tensor) -> Optional[tuple]:
    """The kernel's layout of a stored weight (made now if not yet, :func:`prepack`), None where the reference
    runs: int4 ``(packed for the kernel, scales_and_zeros, rows padded)``, int8 ``(None, bf16 scales, 0)``."""
    layout = _kernel_layouts.get(weight, False)
    if layout is False:
        prepack(weight, scales)
        layout = _kernel_layouts.get(weight)
    return layout


def _kernel_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The kernels take floating x on the weight's device (not under tracing: fake tensors run the fake kernel)."""
    return x.device == weight.device and x.dtype.is_floating_point and x.numel() > 0


def int8_kernel_call(x: torch.Tensor, weight_int8: torch.Tensor, scale_bf16: torch.Tensor,
                     bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The int8 op's kernel path in aten ops (``scale_bf16``: the kernel's scales, :func:`kernel_layout`); the op
    calls it, and :mod:`graphopt.ops.kernel_calls` puts it in a graph in the op's place."""
    lead, k = x.shape[:-1], x.shape[-1]
    y = torch._weight_int8pack_mm(x.reshape(-1, k).to(torch.bfloat16).contiguous(), weight_int8, scale_bf16)
    return _finish(y, bias, lead, x.dtype)


def int4_kernel_call(x: torch.Tensor, packed_kernel: torch.Tensor, group_size: int, sz_kernel: torch.Tensor,
                     pad: int, out_features: int, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The int4 op's kernel path in aten ops, on the weight's kernel layout (:func:`kernel_layout`: the packed
    weight, its scales and zeros, the rows it pads); the op calls it, as :func:`int8_kernel_call`."""
    lead, k = x.shape[:-1], x.shape[-1]
    xb = x.reshape(-1, k).to(torch.bfloat16).contiguous()
    if packed_kernel.device.type == "cpu":
        y = torch._weight_int4pack_mm_for_cpu(xb, packed_kernel, group_size, sz_kernel)
    else:
        y = torch._weight_int4pack_mm(xb, packed_kernel, group_size, sz_kernel)
    if pad:
        y = y[:, :out_features]
    return _finish(y, bias, lead, x.dtype)


@torch.library.custom_op("graphopt::int8_weight_only_linear", mutates_args=())
def int8_weight_only_linear(x: torch.Tensor, weight_int8: torch.Tensor, weight_scale: torch.Tensor,
                            bias: Optional[torch.Tensor]) -> torch.Tensor:
    """int8 weights per channel, bf16 activations (see the module docstring)."""
    layout = kernel_layout(weight_int8, weight_scale) if _kernel_ok(x, weight_int8) else None
    if layout is None:
        return int8_weight_only_reference(x, weight_int8, weight_scale, bias)
    return int8_kernel_call(x, weight_int8, layout[1], bias)


@int8_weight_only_linear.register_fake
def _int8_weight_only_fake(x, weight_int8, weight_scale, bias):
    return x.new_empty(*x.shape[:-1], weight_int8.shape[0])


@torch.library.custom_op("graphopt::int4_weight_only_linear", mutates_args=())
def int4_weight_only_linear(x: torch.Tensor, packed_weight: torch.Tensor, scales_and_zeros: torch.Tensor,
                            group_size: int, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Group-wise int4 weights, bf16 activations (see the module docstring)."""
    layout = kernel_layout(packed_weight, scales_and_zeros) if _kernel_ok(x, packed_weight) else None
    if layout is None:
        return int4_weight_only_reference(x, packed_weight, scales_and_zeros, group_size, bias)
    packed, sz, pad = layout
    return int4_kernel_call(x, packed, group_size, sz, pad, packed_weight.shape[0], bias)


@int4_weight_only_linear.register_fake
def _int4_weight_only_fake(x, packed_weight, scales_and_zeros, group_size, bias):
    return x.new_empty(*x.shape[:-1], packed_weight.shape[0])


# ---------------------------------------------------------------------------------------------- ONNX
def _through_bf16(op: Any, v: Any) -> Any:
    return op.CastLike(op.Cast(v, to=16), v)  # BFLOAT16: round as the kernels round


def _onnx_linear(op: Any, x: Any, w: Any, bias: Any) -> Any:
    """``bf16(bf16(x) @ w.T) + bias`` with ``w`` an fp32 ``[N, K]`` weight."""
    y = _through_bf16(op, op.MatMul(_through_bf16(op, x), op.Transpose(op.CastLike(w, x), perm=[1, 0])))
    return op.Add(y, bias) if bias is not None else y


def int8_weight_only_onnx(x, weight_int8, weight_scale, bias):
    """ONNX translation: dequantize the int8 weight per channel, then MatMul."""
    from onnxscript import opset18 as op  # lazy: only an ONNX export loads onnxscript (start-up speed)

    scale = op.Unsqueeze(op.Cast(weight_scale, to=1), op.Constant(value_ints=[1]))
    return _onnx_linear(op, x, op.Mul(op.Cast(weight_int8, to=1), scale), bias)


def int4_weight_only_onnx(x, packed_weight, scales_and_zeros, group_size: int, bias):
    """ONNX translation: unpack the nibbles, dequantize per group, then MatMul."""
    from onnxscript import opset18 as op  # lazy: only an ONNX export loads onnxscript (start-up speed)

    hi = op.BitShift(packed_weight, op.Constant(value=_onnx_u8_scalar(4)), direction="RIGHT")
    lo = op.BitwiseAnd(packed_weight, op.Constant(value=_onnx_u8_scalar(15)))
    minus_one = op.Constant(value_ints=[-1])
    q = op.Concat(op.Unsqueeze(hi, minus_one), op.Unsqueeze(lo, minus_one), axis=-1)  # [N, K/2, 2]
    n = op.Shape(packed_weight, start=0, end=1)
    q = op.Reshape(op.Cast(q, to=1), op.Concat(n, minus_one, op.Constant(value_ints=[group_size]), axis=0))
    sz = op.Transpose(op.Cast(scales_and_zeros, to=1), perm=[1, 0, 2])  # [N, K/G, 2]
    scale = op.Slice(sz, op.Constant(value_ints=[0]), op.Constant(value_ints=[1]), op.Constant(value_ints=[2]))
    zero = op.Slice(sz, op.Constant(value_ints=[1]), op.Constant(value_ints=[2]), op.Constant(value_ints=[2]))
    w = op.Add(op.Mul(op.Sub(q, op.Constant(value_float=8.0)), scale), zero)  # [N, K/G, G]
    w = op.Reshape(w, op.Concat(n, minus_one, axis=0))
    return _onnx_linear(op, x, w, bias)


def _onnx_u8_scalar(value: int):
    import onnx  # lazy: only an ONNX export loads onnx (start-up speed)

    return onnx.helper.make_tensor("value", onnx.TensorProto.UINT8, [], [value])


DECLARATIONS = (
    OpDeclaration(torch.ops.graphopt.int8_weight_only_linear.default, cost=linear_cost("x", "weight_int8"),
                  onnx=int8_weight_only_onnx),
    OpDeclaration(torch.ops.graphopt.int4_weight_only_linear.default, cost=linear_cost("x", "packed_weight"),
                  onnx=int4_weight_only_onnx),
)
