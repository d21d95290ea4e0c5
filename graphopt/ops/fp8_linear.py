"""``graphopt::fp8_linear``: linear layer in float8 e4m3 with per-row scales.

    y = fp8_linear(x, weight_fp8, weight_scale, bias)

``weight_fp8`` is ``[N, K]`` ``torch.float8_e4m3fn`` scaled per output row
(``W ~= weight_fp8 * weight_scale[:, None]``, ``weight_scale`` ``[N]`` fp32).
Activations are scaled per row (token) at run time: ``x_scale = amax(|x_row|) / 448``.
The result is accumulated in fp32 and rounded to bf16 (what ``torch._scaled_mm``
returns with row-wise scales), then returned in ``x``'s dtype.

Kernels: CUDA with compute capability >= 8.9 (Ada, Hopper) runs
``torch._scaled_mm``; everything else runs :func:`fp8_linear_reference`, which
emulates the same numbers (values rounded through float8 and bf16) and is the
op's definition. The precision pass only plans fp8 where the fast kernel
exists (:func:`fp8_supported`). ONNX: ``QuantizeLinear``/``DequantizeLinear``
to float8 around a MatMul (QDQ form). Cost: a linear's FLOPs.
"""

from __future__ import annotations

from typing import Optional

import torch

from graphopt.ops.declare import OpDeclaration, linear_cost

E4M3_MAX = 448.0
_TINY = 1e-12


def fp8_supported(device: torch.device | str) -> bool:
    """True where ``torch._scaled_mm`` runs e4m3 matmuls (CUDA, compute capability >= 8.9)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available() or not hasattr(torch, "float8_e4m3fn"):
        return False
    major, minor = torch.cuda.get_device_capability(device)
    return (major, minor) >= (8, 9)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row e4m3: ``(weight_fp8 [N, K], scale [N] fp32)``."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / E4M3_MAX).clamp_min(_TINY)
    return (w / scale[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def _quantize_rows(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (x2d.abs().amax(dim=-1, keepdim=True) / E4M3_MAX).clamp_min(_TINY)
    return (x2d / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def fp8_linear_reference(x: torch.Tensor, weight_fp8: torch.Tensor, weight_scale: torch.Tensor,
                         bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The op's definition in plain torch (any device)."""
    lead, k = x.shape[:-1], x.shape[-1]
    q, xs = _quantize_rows(x.reshape(-1, k).float())
    y = (q.float() @ weight_fp8.float().t()) * xs * weight_scale
    if bias is not None:
        y = y + bias.float()
    return y.to(torch.bfloat16).reshape(*lead, -1).to(x.dtype)


def _scaled_mm(x: torch.Tensor, weight_fp8: torch.Tensor, weight_scale: torch.Tensor,
               bias: Optional[torch.Tensor]) -> torch.Tensor:
    lead, k = x.shape[:-1], x.shape[-1]
    q, xs = _quantize_rows(x.reshape(-1, k).float())
    y = torch._scaled_mm(q, weight_fp8.t(), scale_a=xs, scale_b=weight_scale.reshape(1, -1),
                         bias=None if bias is None else bias.to(torch.bfloat16), out_dtype=torch.bfloat16)
    return y.reshape(*lead, -1).to(x.dtype)


@torch.library.custom_op("graphopt::fp8_linear", mutates_args=())
def fp8_linear(x: torch.Tensor, weight_fp8: torch.Tensor, weight_scale: torch.Tensor,
               bias: Optional[torch.Tensor]) -> torch.Tensor:
    """float8 e4m3 linear with per-row scales (see the module docstring)."""
    n, k = weight_fp8.shape
    if x.is_cuda and k % 16 == 0 and n % 16 == 0 and fp8_supported(x.device):
        return _scaled_mm(x, weight_fp8, weight_scale, bias)
    return fp8_linear_reference(x, weight_fp8, weight_scale, bias)


@fp8_linear.register_fake
def _fp8_linear_fake(x, weight_fp8, weight_scale, bias):
    return x.new_empty(*x.shape[:-1], weight_fp8.shape[0])


def fp8_linear_onnx(x, weight_fp8, weight_scale, bias):
    """ONNX translation (QDQ): x scaled per row, rounded through float8 e4m3, MatMul with the dequantized weight."""
    from onnxscript import opset19 as op  # lazy: only an ONNX export loads onnxscript (start-up speed)

    row = op.Max(op.Div(op.ReduceMax(op.Abs(x), op.Constant(value_ints=[-1]), keepdims=1),
                        op.CastLike(op.Constant(value_float=E4M3_MAX), x)),
                 op.CastLike(op.Constant(value_float=_TINY), x))
    one = op.CastLike(op.Constant(value_float=1.0), x)
    fp8_zero = op.Cast(op.Constant(value_float=0.0), to=17)  # FLOAT8E4M3FN
    xq = op.DequantizeLinear(op.QuantizeLinear(op.Div(x, row), one, fp8_zero), one)
    w = op.Mul(op.Cast(weight_fp8, to=1), op.Unsqueeze(weight_scale, op.Constant(value_ints=[1])))
    y = op.Mul(op.MatMul(xq, op.Transpose(w, perm=[1, 0])), row)
    if bias is not None:
        y = op.Add(y, bias)
    return y


DECLARATIONS = (
    OpDeclaration(torch.ops.graphopt.fp8_linear.default, cost=linear_cost("x", "weight_fp8"), onnx=fp8_linear_onnx),
)
