"""Fold eval-mode batch norm into the convolution (or linear) before it.

Rewrites:
    batch_norm(conv{1,2,3}d(x, w, b, ...), gamma, beta, mean, var, training=False, eps)
        -> conv{1,2,3}d(x, w', b', ...)
    batch_norm(linear(x, w, b), ...) -> linear(x, w', b')   (BatchNorm1d after Linear)

with ``w' = w * gamma / sqrt(var + eps)`` per output channel and ``b'`` to
match (``torch.nn.utils.fusion.fuse_conv_bn_weights`` /
``fuse_linear_bn_weights`` compute them). The folded weights are new
tensors; the user's parameters are untouched.

Declines: batch norm in training mode or without running statistics, a conv
whose output has other users besides the batch norm (the unnormalised value
is still needed), weights that are not constants, a linear whose output is
not 2-D (batch norm normalizes dim 1, the linear's features are the last dim).
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from graphopt import ir
from graphopt.pass_infra import OptimizeContext, Pass, PassResult
from graphopt.report import Declined

aten = torch.ops.aten

_CONVS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default}
_BATCH_NORMS = {aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default}


def _bn_parts(bn: fx.Node) -> tuple | None:
    """(input, gamma, beta, mean, var, eps) of an inference batch norm, else None."""
    if bn.target == aten.batch_norm.default:
        x, gamma, beta, mean, var, training, _momentum, eps = bn.args[:8]
        if training:
            return None
    else:  # _native_batch_norm_legit_no_training(x, w, b, mean, var, momentum, eps) -> (out, ...)
        x, gamma, beta, mean, var, _momentum, eps = bn.args[:7]
    return x, gamma, beta, mean, var, eps


def _const(gm: fx.GraphModule, node: object) -> torch.Tensor | None:
    if node is None:
        return None
    if isinstance(node, fx.Node) and node.op == "get_attr":
        return ir.get_attr_value(gm, node)
    raise ValueError("not a constant")


class FoldConvBatchNorm(Pass):
    name = "fold_conv_bn"
    summary = "fold eval-mode BatchNorm into the preceding Conv/Linear weights"

    def call(self, gm: fx.GraphModule, ctx: OptimizeContext) -> PassResult:
        folded, declined, involved = 0, [], []
        for bn in list(gm.graph.nodes):
            if bn.op != "call_function" or bn.target not in _BATCH_NORMS:
                continue
            parts = _bn_parts(bn)
            if parts is None:
                declined.append(Declined(bn.name, "batch norm in training mode"))
                continue
            prod, gamma_n, beta_n, mean_n, var_n, eps = parts
            if not isinstance(prod, fx.Node) or prod.op != "call_function" or \
                    prod.target not in _CONVS | {aten.linear.default}:
                continue
            if len(prod.users) != 1:
                declined.append(Declined(bn.name, f"{prod.name} has other users besides the batch norm"))
                continue
            out_shape = ir.shape_of(prod)
            if prod.target == aten.linear.default and (out_shape is None or len(out_shape) != 2):
                # batch norm normalizes dim 1; a linear's features are its last dim: same only for 2-D
                declined.append(Declined(bn.name, f"batch norm normalizes dim 1 of {prod.name}, whose features are "
                                         f"its last dim (rank {len(out_shape) if out_shape else '?'}, not 2)"))
                continue
            if mean_n is None or var_n is None:
                declined.append(Declined(bn.name, "batch norm without running statistics"))
                continue
            try:
                w = _const(gm, prod.args[1])
                b = _const(gm, prod.args[2] if len(prod.args) > 2 else prod.kwargs.get("bias"))
                gamma, beta = _const(gm, gamma_n), _const(gm, beta_n)
                mean, var = _const(gm, mean_n), _const(gm, var_n)
            except ValueError:
                declined.append(Declined(bn.name, "weights or statistics are not constants"))
                continue
            out_ch = w.shape[0]
            gamma = gamma if gamma is not None else torch.ones(out_ch, dtype=w.dtype)
            beta = beta if beta is not None else torch.zeros(out_ch, dtype=w.dtype)
            with torch.no_grad():
                if prod.target == aten.linear.default:
                    new_w, new_b = fuse_linear_bn_weights(w, b, mean, var, eps, gamma, beta)
                else:
                    new_w, new_b = fuse_conv_bn_weights(w, b, mean, var, eps, gamma, beta)
            w_name = ir.register_constant(gm, f"{prod.name}_weight", new_w.detach().clone())
            b_name = ir.register_constant(gm, f"{prod.name}_bias", new_b.detach().clone())
            with gm.graph.inserting_before(prod):
                w_node, b_node = gm.graph.get_attr(w_name), gm.graph.get_attr(b_name)
            args = list(prod.args)
            args[1] = w_node
            if len(args) > 2:
                args[2] = b_node
            else:
                args.append(b_node)
            prod.args = tuple(args)
            if bn.target == aten.batch_norm.default:
                bn.replace_all_uses_with(prod)
            else:  # tuple result: only element 0 may be used
                for user in list(bn.users):
                    if user.target.__name__ == "getitem" and user.args[1] == 0:
                        user.replace_all_uses_with(prod)
            folded += 1
            involved.append(prod.name)
        gm.graph.eliminate_dead_code()
        notes = [f"folded {folded} batch norms into conv/linear weights"] if folded else []
        return PassResult(gm, folded > 0, notes, declined, involved)
