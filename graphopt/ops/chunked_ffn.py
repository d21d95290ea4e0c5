"""``graphopt::chunked_ffn``: a feed-forward block computed over token chunks.

``chunked_ffn(x, w_in, b_in, w_gate, b_gate, w_out, b_out, activation, chunk)``
equals, with ``linear = F.linear`` and ``act`` the named activation
(:data:`graphopt.ops._blocking.ACTIVATIONS`)::

    h = linear(x, w_in, b_in)
    h = act(linear(x, w_gate, b_gate)) * h     # gated (w_gate given): SwiGLU, GeGLU, T5 v1.1
    h = act(h)                                 # plain (w_gate None): GPT-2, BERT, T5
    linear(h, w_out, b_out)

over ``chunk`` rows of ``x`` (all leading dimensions flattened) at a time,
so the wide ``(tokens, hidden)`` intermediate exists one chunk at a time.
Weights are in ``nn.Linear`` layout ``(out_features, in_features)``.

ONNX: translated unblocked (``MatMul``/``Add``/activation formula):
ONNX Runtime plans its own memory; the result is the same up to rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from graphopt.ops._blocking import activation as get_activation
from graphopt.ops._blocking import onnx_transpose_last2, spans
from graphopt.ops.declare import OpCall, OpCost, OpDeclaration, io_cost, numel

__all__ = ["chunked_ffn", "ffn_workspace_bytes", "DECLARATIONS"]


def _ffn_rows(x: Tensor, w_in: Tensor, b_in: Tensor | None, w_gate: Tensor | None, b_gate: Tensor | None,
              w_out: Tensor, b_out: Tensor | None, act) -> Tensor:
    h = F.linear(x, w_in, b_in)
    if w_gate is not None:
        h = act(F.linear(x, w_gate, b_gate)).mul_(h)
    else:
        h = act(h)
    return F.linear(h, w_out, b_out)


@torch.library.custom_op("graphopt::chunked_ffn", mutates_args=())
def chunked_ffn(x: Tensor, w_in: Tensor, b_in: Tensor | None, w_gate: Tensor | None, b_gate: Tensor | None,
                w_out: Tensor, b_out: Tensor | None, activation: str, chunk: int) -> Tensor:
    """linear -> activation (optionally gated) -> linear, ``chunk`` rows at a time.

    The hidden rows live in one workspace allocated once and reused by every
    chunk, and each chunk's result is written straight into the output
    (``out=``): the loop allocates nothing per chunk, so the allocator has no
    freed chunk buffers to keep (what a process's resident set would show).
    """
    act = get_activation(activation).torch_fn
    rows = x.reshape(-1, x.shape[-1])
    out_dtype = torch.promote_types(x.dtype, w_out.dtype)
    out = torch.empty(rows.shape[0], w_out.shape[0], dtype=out_dtype, device=x.device)
    weights = [w for w in (w_in, b_in, w_gate, b_gate, w_out, b_out) if w is not None]
    if rows.shape[0] == 0 or any(w.dtype != out_dtype for w in weights) or rows.dtype != out_dtype:
        for r0, r1 in spans(rows.shape[0], chunk):  # mixed dtypes: F.linear's own promotion, per chunk
            out[r0:r1] = _ffn_rows(rows[r0:r1], w_in, b_in, w_gate, b_gate, w_out, b_out, act)
        return out.reshape(*x.shape[:-1], w_out.shape[0])
    c = rows.shape[0] if chunk <= 0 else min(rows.shape[0], chunk)
    hidden = rows.new_empty(c, w_in.shape[0], dtype=out_dtype)
    gate = rows.new_empty(c, w_in.shape[0], dtype=out_dtype) if w_gate is not None else None
    in_place = _IN_PLACE.get(activation)
    for r0, r1 in spans(rows.shape[0], chunk):
        n, xr = r1 - r0, rows[r0:r1]
        h = _linear_into(xr, w_in, b_in, hidden[:n])
        if gate is not None:
            g = _linear_into(xr, w_gate, b_gate, gate[:n])  # type: ignore[arg-type]
            _activate(g, act, in_place).mul_(h)
            h = g
        else:
            h = _activate(h, act, in_place)
        _linear_into(h, w_out, b_out, out[r0:r1])
    return out.reshape(*x.shape[:-1], w_out.shape[0])


def _linear_into(x: Tensor, w: Tensor, b: Tensor | None, out: Tensor) -> Tensor:
    """``F.linear(x, w, b)`` written into ``out`` (the same BLAS call F.linear makes for 2-D inputs)."""
    if b is None:
        return torch.mm(x, w.t(), out=out)
    return torch.addmm(b, x, w.t(), out=out)


#: activations with an in-place kernel (the same kernel as the out-of-place one, so the values are equal)
_IN_PLACE = {
    "identity": lambda t: t,
    "relu": torch.relu_,
    "gelu": lambda t: torch.ops.aten.gelu_(t),
    "gelu_tanh": lambda t: torch.ops.aten.gelu_(t, approximate="tanh"),
    "silu": lambda t: F.silu(t, inplace=True),
    "sigmoid": torch.sigmoid_,
    "tanh": torch.tanh_,
}


def _activate(t: Tensor, act, in_place) -> Tensor:
    """``act(t)`` in ``t``'s storage (an activation without an in-place kernel: computed, then copied back)."""
    if in_place is not None:
        return in_place(t)
    return t.copy_(act(t))


@chunked_ffn.register_fake
def _chunked_ffn_fake(x: Tensor, w_in: Tensor, b_in: Tensor | None, w_gate: Tensor | None, b_gate: Tensor | None,
                      w_out: Tensor, b_out: Tensor | None, activation: str, chunk: int) -> Tensor:
    get_activation(activation)  # unknown names fail at trace time, not at run time
    return x.new_empty(*x.shape[:-1], w_out.shape[0], dtype=torch.promote_types(x.dtype, w_out.dtype))


def ffn_workspace_bytes(rows: int, hidden: int, d_out: int, chunk: int, gated: bool, dtype: torch.dtype) -> int:
    """Bytes :func:`chunked_ffn` allocates beyond its input and output, at most."""
    c = rows if chunk <= 0 else min(rows, chunk)
    # h and act(h) (or gate, act(gate), up) live together, plus one output chunk
    return c * hidden * dtype.itemsize * (3 if gated else 2) + c * d_out * dtype.itemsize


# ---------------------------------------------------------------- ONNX (unblocked)

def _chunked_ffn_onnx(x, w_in, b_in=None, w_gate=None, b_gate=None, w_out=None, b_out=None,
                      activation: str = "identity", chunk: int = 0):
    from onnxscript import opset18 as op  # lazy: only an ONNX export loads onnxscript (start-up speed)

    act = get_activation(activation).onnx_fn

    def linear(inp, w, b):
        y = op.MatMul(inp, onnx_transpose_last2(op, w))
        return op.Add(y, b) if b is not None else y

    h = linear(x, w_in, b_in)
    h = op.Mul(act(op, linear(x, w_gate, b_gate)), h) if w_gate is not None else act(op, h)
    return linear(h, w_out, b_out)


# ---------------------------------------------------------------- declaration

def _workspace(call: OpCall) -> int:
    x, w_in, w_out = call.tensor("x"), call.tensor("w_in"), call.tensor("w_out")
    if x is None or w_in is None or w_out is None:
        return 0
    return ffn_workspace_bytes(numel(x.shape[:-1]), w_in.shape[0], w_out.shape[0], int(call["chunk"]),
                               call.tensor("w_gate") is not None, x.dtype)


def _cost(call: OpCall) -> OpCost:
    """The unchunked FFN's FLOPs; inputs read and output written once (the hidden rows stay in chunks)."""
    x, w_in, w_out = call.tensor("x"), call.tensor("w_in"), call.tensor("w_out")
    if x is None or w_in is None or w_out is None:
        return io_cost(call, 0, "matmul")
    n_in = 2 if call.tensor("w_gate") is not None else 1
    return io_cost(call, 2 * numel(x.shape[:-1]) * w_in.shape[0] * (x.shape[-1] * n_in + w_out.shape[0]), "matmul")


DECLARATIONS = (
    OpDeclaration(torch.ops.graphopt.chunked_ffn.default, cost=_cost, workspace=_workspace, onnx=_chunked_ffn_onnx),
)
