"""Chunked LM head + reduction: the logits exist one token chunk at a time.

When the ``(tokens, vocab)`` logits of an LM head only feed a row-wise
reduction, the head and the reduction are computed ``chunk`` tokens at a time
(all leading dimensions of ``hidden`` flattened). Each chunk holds full
vocabulary rows, so the normalisation is computed exactly as unchunked.

``logits = F.linear(hidden, weight, bias)``, cast to fp32 when ``upcast``,
then ``normalize`` (``"none"``, ``"log_softmax"`` or ``"softmax"`` over the
vocabulary), then:

* ``graphopt::chunked_lm_head_gather(hidden, weight, bias, index, normalize, upcast, chunk)``
  -> ``normalized.gather(-1, index)`` (per-token log-probabilities of labels);
* ``graphopt::chunked_lm_head_argmax(hidden, weight, bias, normalize, upcast, chunk)``
  -> ``normalized.argmax(-1)`` (greedy tokens);
* ``graphopt::chunked_lm_head_topk(hidden, weight, bias, k, largest, normalize, upcast, chunk)``
  -> ``normalized.topk(k, -1, largest)`` (values, indices).

ONNX: translated unblocked (``MatMul``, ``LogSoftmax``/``Softmax``,
``GatherElements``/``ArgMax``/``TopK``); ONNX Runtime plans its own memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from graphopt.ops._blocking import onnx_transpose_last2, spans
from graphopt.ops.declare import OpCall, OpCost, OpDeclaration, io_cost, numel

__all__ = ["chunked_lm_head_gather", "chunked_lm_head_argmax", "chunked_lm_head_topk", "lm_head_workspace_bytes",
           "NORMALIZATIONS", "DECLARATIONS"]

NORMALIZATIONS = ("none", "log_softmax", "softmax")


def _normalized_logits(h: Tensor, weight: Tensor, bias: Tensor | None, normalize: str, upcast: bool) -> Tensor:
    logits = F.linear(h, weight, bias)
    if upcast:
        logits = logits.float()
    if normalize == "log_softmax":
        return torch.log_softmax(logits, dim=-1)
    if normalize == "softmax":
        return torch.softmax(logits, dim=-1)
    if normalize != "none":
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    return logits


def _out_dtype(hidden: Tensor, weight: Tensor, upcast: bool) -> torch.dtype:
    return torch.float32 if upcast else torch.promote_types(hidden.dtype, weight.dtype)


@torch.library.custom_op("graphopt::chunked_lm_head_gather", mutates_args=())
def chunked_lm_head_gather(hidden: Tensor, weight: Tensor, bias: Tensor | None, index: Tensor, normalize: str,
                           upcast: bool, chunk: int) -> Tensor:
    """normalize(linear(hidden)).gather(-1, index), ``chunk`` tokens at a time."""
    rows = hidden.reshape(-1, hidden.shape[-1])
    idx = index.reshape(rows.shape[0], index.shape[-1])
    out = torch.empty(idx.shape, dtype=_out_dtype(hidden, weight, upcast), device=hidden.device)
    for r0, r1 in spans(rows.shape[0], chunk):
        out[r0:r1] = _normalized_logits(rows[r0:r1], weight, bias, normalize, upcast).gather(-1, idx[r0:r1])
    return out.reshape(index.shape)


@chunked_lm_head_gather.register_fake
def _gather_fake(hidden, weight, bias, index, normalize, upcast, chunk):
    return index.new_empty(index.shape, dtype=_out_dtype(hidden, weight, upcast))


@torch.library.custom_op("graphopt::chunked_lm_head_argmax", mutates_args=())
def chunked_lm_head_argmax(hidden: Tensor, weight: Tensor, bias: Tensor | None, normalize: str, upcast: bool,
                           chunk: int) -> Tensor:
    """normalize(linear(hidden)).argmax(-1), ``chunk`` tokens at a time."""
    rows = hidden.reshape(-1, hidden.shape[-1])
    out = torch.empty(rows.shape[0], dtype=torch.long, device=hidden.device)
    for r0, r1 in spans(rows.shape[0], chunk):
        out[r0:r1] = _normalized_logits(rows[r0:r1], weight, bias, normalize, upcast).argmax(-1)
    return out.reshape(hidden.shape[:-1])


@chunked_lm_head_argmax.register_fake
def _argmax_fake(hidden, weight, bias, normalize, upcast, chunk):
    return hidden.new_empty(hidden.shape[:-1], dtype=torch.long)


@torch.library.custom_op("graphopt::chunked_lm_head_topk", mutates_args=())
def chunked_lm_head_topk(hidden: Tensor, weight: Tensor, bias: Tensor | None, k: int, largest: bool,
                         normalize: str, upcast: bool, chunk: int) -> tuple[Tensor, Tensor]:
    """normalize(linear(hidden)).topk(k, -1, largest), ``chunk`` tokens at a time."""
    rows = hidden.reshape(-1, hidden.shape[-1])
    values = torch.empty(rows.shape[0], k, dtype=_out_dtype(hidden, weight, upcast), device=hidden.device)
    indices = torch.empty(rows.shape[0], k, dtype=torch.long, device=hidden.device)
    for r0, r1 in spans(rows.shape[0], chunk):
        v, i = _normalized_logits(rows[r0:r1], weight, bias, normalize, upcast).topk(k, -1, largest)
        values[r0:r1], indices[r0:r1] = v, i
    shape = (*hidden.shape[:-1], k)
    return values.reshape(shape), indices.reshape(shape)


@chunked_lm_head_topk.register_fake
def _topk_fake(hidden, weight, bias, k, largest, normalize, upcast, chunk):
    shape = (*hidden.shape[:-1], k)
    return (hidden.new_empty(shape, dtype=_out_dtype(hidden, weight, upcast)),
            hidden.new_empty(shape, dtype=torch.long))


def lm_head_workspace_bytes(rows: int, vocab: int, chunk: int, normalize: str, dtype: torch.dtype) -> int:
    """Bytes the chunked LM head allocates beyond its inputs and output, at most."""
    c = rows if chunk <= 0 else min(rows, chunk)
    copies = 1 if normalize == "none" else 2  # logits and their normalisation
    return c * vocab * dtype.itemsize * copies


# ---------------------------------------------------------------- ONNX (unblocked)

def _onnx_normalized(op, hidden, weight, bias, normalize: str, upcast: bool):
    from onnx import TensorProto  # lazy: only an ONNX export loads onnx (start-up speed)

    logits = op.MatMul(hidden, onnx_transpose_last2(op, weight))
    if bias is not None:
        logits = op.Add(logits, bias)
    if upcast:
        logits = op.Cast(logits, to=TensorProto.FLOAT)
    if normalize == "log_softmax":
        return op.LogSoftmax(logits, axis=-1)
    if normalize == "softmax":
        return op.Softmax(logits, axis=-1)
    return logits


def _gather_onnx(hidden, weight, bias=None, index=None, normalize: str = "none", upcast: bool = False,
                 chunk: int = 0):
    from onnxscript import opset18 as op  # lazy: only an ONNX export loads onnxscript (start-up speed)

    return op.GatherElements(_onnx_normalized(op, hidden, weight, bias, normalize, upcast), index, axis=-1)


def _argmax_onnx(hidden, weight, bias=None, normalize: str = "none", upcast: bool = False, chunk: int = 0):
    from onnxscript import opset18 as op  # lazy: only an ONNX export loads onnxscript (start-up speed)

    return op.ArgMax(_onnx_normalized(op, hidden, weight, bias, normalize, upcast), axis=-1, keepdims=0)


def _topk_onnx(hidden, weight, bias=None, k: int = 1, largest: bool = True, normalize: str = "none",
               upcast: bool = False, chunk: int = 0):
    from onnxscript import opset18 as op  # lazy: only an ONNX export loads onnxscript (start-up speed)

    values, indices = op.TopK(_onnx_normalized(op, hidden, weight, bias, normalize, upcast),
                              op.Constant(value_ints=[k]), axis=-1, largest=int(largest), sorted=1)
    return values, indices


# ---------------------------------------------------------------- declarations (the three share argument names)

def _workspace(call: OpCall) -> int:
    h, w = call.tensor("hidden"), call.tensor("weight")
    if h is None or w is None:
        return 0
    dtype = torch.float32 if call["upcast"] else h.dtype
    return lm_head_workspace_bytes(numel(h.shape[:-1]), w.shape[0], int(call["chunk"]), str(call["normalize"]), dtype)


def _cost(call: OpCall) -> OpCost:
    """The head's FLOPs, ``2 * tokens * d * vocab``; inputs read and outputs written once (logits stay in chunks)."""
    h, w = call.tensor("hidden"), call.tensor("weight")
    return io_cost(call, 0 if h is None or w is None else 2 * numel(h.shape) * w.shape[0], "matmul")


DECLARATIONS = tuple(
    OpDeclaration(op, cost=_cost, workspace=_workspace, onnx=onnx)
    for op, onnx in ((torch.ops.graphopt.chunked_lm_head_gather.default, _gather_onnx),
                     (torch.ops.graphopt.chunked_lm_head_argmax.default, _argmax_onnx),
                     (torch.ops.graphopt.chunked_lm_head_topk.default, _topk_onnx))
)
