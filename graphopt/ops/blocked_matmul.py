"""``graphopt::blocked_matmul`` and ``graphopt::blocked_linear``: matmuls computed tile by tile.

``blocked_matmul(a, b, block_m, block_n, block_k)`` equals ``a @ b`` for
``a: (..., M, K)``, ``b: (..., K, N)`` (batch dimensions broadcast like
``torch.matmul``); ``blocked_linear(x, weight, bias, block_rows, block_cols,
block_k)`` equals ``F.linear(x, weight, bias)``. The output is written tile by
tile (rows x columns); the reduction over K is split into blocks of
``block_k`` whose partial products are accumulated in fp32 when the inputs are
fp16/bf16 (each block is multiplied in fp32 too, so no partial sum is rounded
to the low precision). A block of ``0`` or ``>=`` the dimension means "whole".

Working memory beyond the output: one ``block_m x block_n`` accumulator plus
the fp32 copies of one A and one B block (low precision with a K split only).

ONNX: translated unblocked (``MatMul`` [+ ``Add``]); ONNX Runtime plans its
own memory, and the result is the same up to summation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from graphopt.ops._blocking import LOW_PRECISION, accumulation_dtype, n_blocks, onnx_transpose_last2, spans
from graphopt.ops.declare import OpCall, OpCost, OpDeclaration, io_cost, numel

__all__ = ["blocked_matmul", "blocked_linear", "matmul_workspace_bytes", "DECLARATIONS"]


def _tile_product(a: Tensor, b: Tensor, block_k: int, out_dtype: torch.dtype) -> Tensor:
    """``a @ b`` for one output tile, the K reduction split into ``block_k`` blocks."""
    k = a.shape[-1]
    if n_blocks(k, block_k) == 1:
        return torch.matmul(a, b)
    acc_dtype = accumulation_dtype(out_dtype)
    acc = None
    for k0, k1 in spans(k, block_k):
        a_blk, b_blk = a[..., k0:k1], b[..., k0:k1, :]
        if a.dtype in LOW_PRECISION:
            a_blk, b_blk = a_blk.to(acc_dtype), b_blk.to(acc_dtype)
        part = torch.matmul(a_blk, b_blk)
        acc = part if acc is None else acc.add_(part)
    return acc.to(out_dtype)


@torch.library.custom_op("graphopt::blocked_matmul", mutates_args=())
def blocked_matmul(a: Tensor, b: Tensor, block_m: int, block_n: int, block_k: int) -> Tensor:
    """``a @ b`` computed in ``block_m x block_n`` output tiles, K split in ``block_k`` blocks."""
    if a.ndim < 2 or b.ndim < 2:
        return torch.matmul(a, b)
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    m, n = a.shape[-2], b.shape[-1]
    a = a.expand(*batch, *a.shape[-2:])
    b = b.expand(*batch, *b.shape[-2:])
    out_dtype = torch.promote_types(a.dtype, b.dtype)
    out = torch.empty(*batch, m, n, dtype=out_dtype, device=a.device)
    for m0, m1 in spans(m, block_m):
        a_rows = a[..., m0:m1, :]
        for n0, n1 in spans(n, block_n):
            out[..., m0:m1, n0:n1] = _tile_product(a_rows, b[..., :, n0:n1], block_k, out_dtype)
    return out


@blocked_matmul.register_fake
def _blocked_matmul_fake(a: Tensor, b: Tensor, block_m: int, block_n: int, block_k: int) -> Tensor:
    return torch.matmul(a, b)  # fake tensors: shape/dtype only


@torch.library.custom_op("graphopt::blocked_linear", mutates_args=())
def blocked_linear(x: Tensor, weight: Tensor, bias: Tensor | None, block_rows: int, block_cols: int,
                   block_k: int) -> Tensor:
    """``F.linear(x, weight, bias)`` computed in ``block_rows x block_cols`` tiles, K in ``block_k`` blocks."""
    k = x.shape[-1]
    n = weight.shape[0]
    rows = x.reshape(-1, k)
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    out = torch.empty(rows.shape[0], n, dtype=out_dtype, device=x.device)
    w_t = weight.t()
    for r0, r1 in spans(rows.shape[0], block_rows):
        x_blk = rows[r0:r1]
        for c0, c1 in spans(n, block_cols):
            b_blk = bias[c0:c1] if bias is not None else None
            if n_blocks(k, block_k) == 1:
                tile = F.linear(x_blk, weight[c0:c1], b_blk)
            else:
                tile = _tile_product(x_blk, w_t[:, c0:c1], block_k, out_dtype)
                if b_blk is not None:
                    tile = tile.add_(b_blk)
            out[r0:r1, c0:c1] = tile
    return out.reshape(*x.shape[:-1], n)


@blocked_linear.register_fake
def _blocked_linear_fake(x: Tensor, weight: Tensor, bias: Tensor | None, block_rows: int, block_cols: int,
                         block_k: int) -> Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0], dtype=torch.promote_types(x.dtype, weight.dtype))


def matmul_workspace_bytes(rows: int, cols: int, k: int, block_rows: int, block_cols: int, block_k: int,
                           batch: int, dtype: torch.dtype) -> int:
    """Bytes the blocked matmul needs beyond its inputs and output (one tile's temporaries)."""
    bm = rows if block_rows <= 0 else min(rows, block_rows)
    bn = cols if block_cols <= 0 else min(cols, block_cols)
    tile = batch * bm * bn * dtype.itemsize
    if n_blocks(k, block_k) == 1:
        return tile
    bk = min(k, block_k)
    acc = accumulation_dtype(dtype).itemsize
    return batch * (2 * bm * bn * acc + (bm * bk + bk * bn) * acc)


# ---------------------------------------------------------------- ONNX (unblocked)

def _blocked_matmul_onnx(a, b, block_m: int = 0, block_n: int = 0, block_k: int = 0):
    from onnxscript import opset18 as op  # lazy: only an ONNX export loads onnxscript (start-up speed)

    return op.MatMul(a, b)


def _blocked_linear_onnx(x, weight, bias=None, block_rows: int = 0, block_cols: int = 0, block_k: int = 0):
    from onnxscript import opset18 as op  # lazy: only an ONNX export loads onnxscript (start-up speed)

    out = op.MatMul(x, onnx_transpose_last2(op, weight))
    return op.Add(out, bias) if bias is not None else out


# ---------------------------------------------------------------- declarations

def _matmul_workspace(call: OpCall) -> int:
    a, b = call.tensor("a"), call.tensor("b")
    if a is None or b is None or a.ndim < 2 or b.ndim < 2:
        return 0
    batch = numel(torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]))
    return matmul_workspace_bytes(a.shape[-2], b.shape[-1], a.shape[-1], int(call["block_m"]), int(call["block_n"]),
                                  int(call["block_k"]), batch, a.dtype)


def _linear_workspace(call: OpCall) -> int:
    x, w = call.tensor("x"), call.tensor("weight")
    if x is None or w is None:
        return 0
    return matmul_workspace_bytes(numel(x.shape[:-1]), w.shape[0], x.shape[-1], int(call["block_rows"]),
                                  int(call["block_cols"]), int(call["block_k"]), 1, x.dtype)


def _cost(first_input: str):
    def cost(call: OpCall) -> OpCost:
        """The unblocked matmul's FLOPs, ``2 * numel(out) * K``; inputs read and output written once."""
        x, out = call.tensor(first_input), call.out
        return io_cost(call, 0 if x is None or out is None else 2 * out.numel() * x.shape[-1], "matmul")

    return cost


DECLARATIONS = (
    OpDeclaration(torch.ops.graphopt.blocked_matmul.default, cost=_cost("a"), workspace=_matmul_workspace,
                  onnx=_blocked_matmul_onnx),
    OpDeclaration(torch.ops.graphopt.blocked_linear.default, cost=_cost("x"), workspace=_linear_workspace,
                  onnx=_blocked_linear_onnx),
)
