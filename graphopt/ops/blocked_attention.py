"""``graphopt::blocked_attention``: attention with an arbitrary bias in O(T x block) memory.

``blocked_attention(q, k, v, bias, mask, mask_value, scale, q_block, kv_block, softcap=0.0)``
equals, for ``q: (..., Tq, D)``, ``k: (..., Tk, D)``, ``v: (..., Tk, Dv)``::

    s = (q @ k.transpose(-2, -1)) * scale
    s = softcap * tanh(s / softcap)       # if softcap > 0 (Gemma 2's attn_logit_softcapping)
    s = s + bias                          # if bias is given (broadcast to (..., Tq, Tk))
    s = s.masked_fill(mask, mask_value)   # if mask is given (bool, True = filled)
    softmax(s, -1) @ v

(Rabe & Staats, "Self-attention does not need O(n^2) memory"; the online
softmax of Milakov & Gimelshein.) Queries are processed ``q_block`` rows at a
time; within a query block the keys are processed ``kv_block`` at a time with
a running maximum and running sum, so the scores never exist beyond one
``q_block x kv_block`` tile per batch x head. With ``kv_block`` >= Tk a query
block is computed exactly like the unblocked formula (one softmax). The bias
and the mask are read through broadcast views of their tiles: a
``(1, H, 1, Tk)`` ALiBi bias or a ``(B, 1, 1, Tk)`` padding mask is never
expanded. Low-precision inputs keep the running statistics and the output
accumulator in fp32.

Rows whose every key is filled with ``-inf`` give NaN, as ``softmax`` does.

ONNX: translated unblocked (``MatMul``, ``Add``, ``Where``, ``Softmax``,
``MatMul``): ONNX Runtime plans its own memory; the result is the same up to
rounding.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from graphopt.ops._blocking import LOW_PRECISION, n_blocks, onnx_transpose_last2, spans
from graphopt.ops.declare import OpCall, OpCost, OpDeclaration, io_cost, numel

__all__ = ["blocked_attention", "attention_workspace_bytes", "DECLARATIONS"]


def _tile(t: Tensor | None, rows: tuple[int, int], cols: tuple[int, int]) -> Tensor | None:
    """The (rows, cols) tile of a bias/mask broadcastable over the last two axes (a view)."""
    if t is None:
        return None
    if t.shape[-2] != 1:
        t = t[..., rows[0]:rows[1], :]
    if t.shape[-1] != 1:
        t = t[..., cols[0]:cols[1]]
    return t


def _scores(q_blk: Tensor, k_blk: Tensor, bias: Tensor | None, mask: Tensor | None, mask_value: float,
            scale: float, dtype: torch.dtype, softcap: float = 0.0) -> Tensor:
    s = torch.matmul(q_blk, k_blk.transpose(-2, -1))
    if s.dtype != dtype:
        s = s.to(dtype)
    if scale != 1.0:
        s.mul_(scale)
    if softcap > 0:
        s.div_(softcap).tanh_().mul_(softcap)
    if bias is not None:
        s = s + bias if s.shape != torch.broadcast_shapes(s.shape, bias.shape) else s.add_(bias)
    if mask is not None:
        s = s.masked_fill(mask, mask_value) if s.shape != torch.broadcast_shapes(s.shape, mask.shape) \
            else s.masked_fill_(mask, mask_value)
    return s


def _at_least_2d(t: Tensor | None) -> Tensor | None:
    if t is None or t.ndim >= 2:
        return t
    return t.reshape((1,) * (2 - t.ndim) + tuple(t.shape))


def _batch_shape(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, mask: Tensor | None) -> torch.Size:
    shapes = [q.shape[:-2], k.shape[:-2], v.shape[:-2]]
    shapes += [t.shape[:-2] for t in (bias, mask) if t is not None]
    return torch.broadcast_shapes(*shapes)


@torch.library.custom_op("graphopt::blocked_attention", mutates_args=())
def blocked_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, mask: Tensor | None,
                      mask_value: float, scale: float, q_block: int, kv_block: int, softcap: float = 0.0) -> Tensor:
    """softmax(softcap(q k^T * scale) + bias, masked) v, ``q_block`` queries x ``kv_block`` keys at a time."""
    tq, tk = q.shape[-2], k.shape[-2]
    bias, mask = _at_least_2d(bias), _at_least_2d(mask)
    batch = _batch_shape(q, k, v, bias, mask)
    q = q.expand(*batch, *q.shape[-2:])
    k = k.expand(*batch, *k.shape[-2:])
    v = v.expand(*batch, *v.shape[-2:])
    out_dtype = v.dtype
    work = torch.float32 if q.dtype in LOW_PRECISION else q.dtype
    out = torch.empty(*batch, tq, v.shape[-1], dtype=out_dtype, device=q.device)
    single_kv = n_blocks(tk, kv_block) == 1
    for i0, i1 in spans(tq, q_block):
        q_blk = q[..., i0:i1, :]
        if single_kv:
            s = _scores(q_blk, k, _tile(bias, (i0, i1), (0, tk)), _tile(mask, (i0, i1), (0, tk)),
                        mask_value, scale, work, softcap)
            p = torch.softmax(s, dim=-1)
            del s
            out[..., i0:i1, :] = torch.matmul(p.to(v.dtype), v)
            continue
        row_max = torch.full((*batch, i1 - i0, 1), -math.inf, dtype=work, device=q.device)
        row_sum = torch.zeros((*batch, i1 - i0, 1), dtype=work, device=q.device)
        acc = torch.zeros((*batch, i1 - i0, v.shape[-1]), dtype=work, device=q.device)
        for j0, j1 in spans(tk, kv_block):
            s = _scores(q_blk, k[..., j0:j1, :], _tile(bias, (i0, i1), (j0, j1)), _tile(mask, (i0, i1), (j0, j1)),
                        mask_value, scale, work, softcap)
            new_max = torch.maximum(row_max, s.amax(dim=-1, keepdim=True))
            # rows with every key so far at -inf: subtract 0 instead of -inf (no NaN from -inf - -inf)
            safe_max = torch.where(torch.isinf(new_max) & (new_max < 0), torch.zeros_like(new_max), new_max)
            correction = torch.exp(row_max - safe_max)
            p = torch.exp(s.sub_(safe_max))
            del s
            row_sum.mul_(correction).add_(p.sum(dim=-1, keepdim=True))
            acc.mul_(correction).add_(torch.matmul(p.to(v.dtype), v[..., j0:j1, :]).to(work))
            del p
            row_max = new_max
        out[..., i0:i1, :] = acc.div_(row_sum).to(out_dtype)
    return out


@blocked_attention.register_fake
def _blocked_attention_fake(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, mask: Tensor | None,
                            mask_value: float, scale: float, q_block: int, kv_block: int,
                            softcap: float = 0.0) -> Tensor:
    batch = _batch_shape(q, k, v, _at_least_2d(bias), _at_least_2d(mask))
    return v.new_empty(*batch, q.shape[-2], v.shape[-1])


def attention_workspace_bytes(batch_heads: int, tq: int, tk: int, dv: int, q_block: int, kv_block: int,
                              dtype: torch.dtype) -> int:
    """Bytes :func:`blocked_attention` allocates beyond its inputs and output, at most."""
    bq = tq if q_block <= 0 else min(tq, q_block)
    bk = tk if kv_block <= 0 else min(tk, kv_block)
    item = 4 if dtype in LOW_PRECISION else dtype.itemsize
    tile = batch_heads * bq * bk * item
    if n_blocks(tk, kv_block) == 1:
        return 2 * tile + batch_heads * bq * dv * item  # scores, probabilities, p @ v
    # scores/p tile (+ a transient of the same size), accumulator, p @ v, row statistics
    return 2 * tile + 2 * batch_heads * bq * dv * item + 4 * batch_heads * bq * item


# ---------------------------------------------------------------- ONNX (unblocked)

def _blocked_attention_onnx(q, k, v, bias=None, mask=None, mask_value: float = -math.inf, scale: float = 1.0,
                            q_block: int = 0, kv_block: int = 0, softcap: float = 0.0):
    from onnxscript import opset18 as op  # lazy: only an ONNX export loads onnxscript (start-up speed)

    s = op.MatMul(q, onnx_transpose_last2(op, k))
    if scale != 1.0:
        s = op.Mul(s, op.CastLike(scale, s))
    if softcap > 0:
        s = op.Mul(op.Tanh(op.Div(s, op.CastLike(softcap, s))), op.CastLike(softcap, s))
    if bias is not None:
        s = op.Add(s, op.CastLike(bias, s))
    if mask is not None:
        s = op.Where(mask, op.CastLike(mask_value, s), s)
    return op.MatMul(op.Softmax(s, axis=-1), v)


# ---------------------------------------------------------------- declaration

def _workspace(call: OpCall) -> int:
    q, k, v, out = call.tensor("q"), call.tensor("k"), call.tensor("v"), call.out
    if q is None or k is None or v is None or out is None:
        return 0
    return attention_workspace_bytes(numel(out.shape[:-2]), q.shape[-2], k.shape[-2], v.shape[-1],
                                     int(call["q_block"]), int(call["kv_block"]), q.dtype)


def _cost(call: OpCall) -> OpCost:
    """The unblocked formula's FLOPs; inputs read and output written once (the scores stay in tiles)."""
    q, k, v, out = call.tensor("q"), call.tensor("k"), call.tensor("v"), call.out
    if q is None or k is None or v is None or out is None:
        return io_cost(call, 0, "attention")
    flops = 2 * numel(out.shape[:-2]) * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1])
    return io_cost(call, flops, "attention")


DECLARATIONS = (
    OpDeclaration(torch.ops.graphopt.blocked_attention.default, cost=_cost, workspace=_workspace,
                  onnx=_blocked_attention_onnx),
)
