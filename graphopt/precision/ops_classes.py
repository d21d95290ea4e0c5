"""How each ATen op behaves under reduced precision.

* :data:`COMPUTE_OPS` -- matmuls, convolutions, attention: the ops worth
  running in bf16/fp16/fp8/int8.
* :data:`ISLAND_OPS` -- ops kept in fp32 whatever the plan, with the reason
  the report gives (softmax, norms, reductions, exp/log): low precision there
  is what produces NaNs and silent accuracy loss.
* :data:`FOLLOW_OPS` -- cheap ops that run in the precision of their inputs
  (views, activations, elementwise arithmetic), so a low-precision region
  does not need a cast around each of them.

Anything not listed runs in fp32 (unknown ops are never converted).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from graphopt import ir
from graphopt.opsets import SOFTMAX_FORMS_INCLUDING_SAFE

aten = torch.ops.aten

FLOAT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
FP16_MAX = 65504.0

COMPUTE_OPS = {
    aten.linear.default, aten.matmul.default, aten.mm.default, aten.bmm.default, aten.addmm.default,
    aten.baddbmm.default, aten.einsum.default, aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
    aten.convolution.default, aten.conv_transpose1d.default, aten.conv_transpose2d.input,
    aten.scaled_dot_product_attention.default,
}

#: ops whose weight-bearing form has a scaled fp16 variant (x / s, op in fp16, * s)
SCALABLE_OPS = {aten.linear.default, aten.matmul.default, aten.mm.default, aten.addmm.default}

_NORMS = {aten.layer_norm.default, aten.native_layer_norm.default, aten.group_norm.default,
          aten.native_group_norm.default, aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default,
          aten.instance_norm.default}
if hasattr(aten, "rms_norm"):
    _NORMS.add(aten.rms_norm.default)
_REDUCTIONS = {aten.sum.default, aten.sum.dim_IntList, aten.mean.default, aten.mean.dim, aten.var.correction,
               aten.var.dim, aten.std.correction, aten.std.dim, aten.var_mean.correction, aten.prod.default,
               aten.cumsum.default, aten.norm.ScalarOpt_dim, aten.linalg_vector_norm.default,
               aten.logsumexp.default}
_EXP_LOG = {aten.exp.default, aten.log.default, aten.log1p.default, aten.expm1.default, aten.pow.Tensor_Scalar,
            aten.pow.Tensor_Tensor, aten.rsqrt.default, aten.sqrt.default, aten.reciprocal.default}

ISLAND_OPS: dict[object, str] = {}
ISLAND_OPS.update({op: "softmax island" for op in SOFTMAX_FORMS_INCLUDING_SAFE})
ISLAND_OPS.update({op: "norm island" for op in _NORMS})
ISLAND_OPS.update({op: "reduction island" for op in _REDUCTIONS})
ISLAND_OPS.update({op: "exp/log island" for op in _EXP_LOG})

FOLLOW_OPS = set(ir.VIEW_OPS) | {
    aten.clone.default, aten.contiguous.default, aten.relu.default, aten.gelu.default, aten.silu.default,
    aten.tanh.default, aten.sigmoid.default, aten.hardtanh.default, aten.leaky_relu.default, aten.neg.default,
    aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar, aten.add.Tensor, aten.add.Scalar,
    aten.sub.Tensor, aten.sub.Scalar, aten.dropout.default, aten.cat.default, aten.stack.default,
    aten.where.self, aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.constant_pad_nd.default,
    aten.max_pool2d.default, aten.avg_pool2d.default, aten.adaptive_avg_pool2d.default, aten.relu_.default,
    aten.flatten.using_ints, operator.getitem,
}


def is_float_tensor(node: object) -> bool:
    val = ir.tensor_meta(node)
    return val is not None and val.dtype.is_floating_point


def island_reason(node: fx.Node) -> str | None:
    """Why ``node`` stays fp32 (None: it may run in low precision)."""
    return ISLAND_OPS.get(node.target) if node.op == "call_function" else None


def _consumers_through_views(node: fx.Node) -> list[fx.Node]:
    out, frontier, seen = [], list(node.users), set()
    while frontier:
        u = frontier.pop()
        if u in seen:
            continue
        seen.add(u)
        if u.op == "call_function" and u.target in ir.VIEW_OPS:
            frontier.extend(u.users)
        else:
            out.append(u)
    return out


def is_residual_add(node: fx.Node) -> bool:
    """An add of two same-shape activations feeding a norm, another such add or the output.

    That is the residual stream of a transformer/ResNet; keeping it in fp32
    stops rounding error from accumulating layer after layer.
    """
    if node.op != "call_function" or node.target not in (aten.add.Tensor, aten.sub.Tensor):
        return False
    a, b = node.args[0], node.args[1] if len(node.args) > 1 else None
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or ir.is_constant(a) or ir.is_constant(b):
        return False
    if ir.shape_of(a) is None or ir.shape_of(a) != ir.shape_of(b):
        return False
    for user in _consumers_through_views(node):
        if user.op == "output" or user.target in _NORMS:
            return True
        if user.target in (aten.add.Tensor, aten.sub.Tensor) and ir.shape_of(user) == ir.shape_of(node):
            return True
        if user.target in _EXP_LOG or user.target in _REDUCTIONS or user.target == aten._to_copy.default:
            return True  # a hand-written norm (x.pow(2).mean(...)) reads the stream
    return False
