"""Working memory and cost of graphopt's blocked operators, read from a graph node.

Liveness analyses count a node's output; a blocked operator also allocates
tiles while it runs (scores of one query x key block, one FFN chunk, one
chunk of logits). :func:`workspace_bytes` estimates that transient memory from
the node's argument shapes (``meta["val"]``), so a predicted peak includes it.

Importing this module registers each operator's FLOPs and bytes with
:func:`graphopt.cost.register_cost` (the unblocked formula's FLOPs; bytes are
the inputs read and the output written once: the intermediates stay in tiles).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

from graphopt.ops.blocked_attention import attention_workspace_bytes
from graphopt.ops.blocked_matmul import matmul_workspace_bytes
from graphopt.ops.chunked_ffn import ffn_workspace_bytes
from graphopt.ops.chunked_lm_head import lm_head_workspace_bytes

__all__ = ["workspace_bytes"]


def _val(arg: Any) -> torch.Tensor | None:
    v = arg.meta.get("val") if isinstance(arg, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _numel(shape: Any) -> int:
    return int(math.prod(int(s) for s in shape))


def _attention(node: fx.Node) -> int:
    q, k, v = (_val(a) for a in node.args[:3])
    out = _val(node)
    if q is None or k is None or v is None or out is None:
        return 0
    batch_heads = _numel(out.shape[:-2])
    return attention_workspace_bytes(batch_heads, q.shape[-2], k.shape[-2], v.shape[-1], int(node.args[7]),
                                     int(node.args[8]), q.dtype)


def _ffn(node: fx.Node) -> int:
    x, w_in, w_gate, w_out = _val(node.args[0]), _val(node.args[1]), _val(node.args[3]), _val(node.args[5])
    if x is None or w_in is None or w_out is None:
        return 0
    rows = _numel(x.shape[:-1])
    return ffn_workspace_bytes(rows, w_in.shape[0], w_out.shape[0], int(node.args[8]), w_gate is not None, x.dtype)


def _lm_head(normalize_at: int, upcast_at: int, chunk_at: int) -> Callable[[fx.Node], int]:
    def estimate(node: fx.Node) -> int:
        h, w = _val(node.args[0]), _val(node.args[1])
        if h is None or w is None:
            return 0
        dtype = torch.float32 if node.args[upcast_at] else h.dtype
        return lm_head_workspace_bytes(_numel(h.shape[:-1]), w.shape[0], int(node.args[chunk_at]),
                                       str(node.args[normalize_at]), dtype)

    return estimate


def _matmul(node: fx.Node) -> int:
    a, b = _val(node.args[0]), _val(node.args[1])
    if a is None or b is None or a.ndim < 2 or b.ndim < 2:
        return 0
    batch = _numel(torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]))
    return matmul_workspace_bytes(a.shape[-2], b.shape[-1], a.shape[-1], *(int(x) for x in node.args[2:5]),
                                  batch, a.dtype)


def _linear(node: fx.Node) -> int:
    x, w = _val(node.args[0]), _val(node.args[1])
    if x is None or w is None:
        return 0
    return matmul_workspace_bytes(_numel(x.shape[:-1]), w.shape[0], x.shape[-1],
                                  *(int(a) for a in node.args[3:6]), 1, x.dtype)


_ESTIMATORS: dict[Any, Callable[[fx.Node], int]] = {
    torch.ops.graphopt.blocked_attention.default: _attention,
    torch.ops.graphopt.chunked_ffn.default: _ffn,
    torch.ops.graphopt.chunked_lm_head_gather.default: _lm_head(4, 5, 6),
    torch.ops.graphopt.chunked_lm_head_argmax.default: _lm_head(3, 4, 5),
    torch.ops.graphopt.chunked_lm_head_topk.default: _lm_head(5, 6, 7),
    torch.ops.graphopt.blocked_matmul.default: _matmul,
    torch.ops.graphopt.blocked_linear.default: _linear,
}


def workspace_bytes(node: fx.Node) -> int:
    """Transient bytes ``node`` allocates while it runs (0 for ops graphopt does not know)."""
    fn = _ESTIMATORS.get(node.target) if node.op == "call_function" else None
    return fn(node) if fn is not None else 0


# ---------------------------------------------------------------- costs (graphopt.cost)

def _io_bytes(node: fx.Node) -> tuple[int, int]:
    read = sum(int(v.numel() * v.element_size()) for a in node.all_input_nodes if (v := _val(a)) is not None)
    out = node.meta.get("val")
    outs = out if isinstance(out, (tuple, list)) else [out]
    written = sum(int(t.numel() * t.element_size()) for t in outs if isinstance(t, torch.Tensor))
    return read, written


def _flops(node: fx.Node) -> int:
    t, a = node.target, node.args
    if t is torch.ops.graphopt.blocked_attention.default:
        q, k, v, out = _val(a[0]), _val(a[1]), _val(a[2]), _val(node)
        if q is None or k is None or v is None or out is None:
            return 0
        return 2 * _numel(out.shape[:-2]) * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1])
    if t is torch.ops.graphopt.chunked_ffn.default:
        x, w_in, w_gate, w_out = _val(a[0]), _val(a[1]), _val(a[3]), _val(a[5])
        if x is None or w_in is None or w_out is None:
            return 0
        rows, n_in = _numel(x.shape[:-1]), 2 if w_gate is not None else 1
        return 2 * rows * w_in.shape[0] * (x.shape[-1] * n_in + w_out.shape[0])
    if t in (torch.ops.graphopt.chunked_lm_head_gather.default, torch.ops.graphopt.chunked_lm_head_argmax.default,
             torch.ops.graphopt.chunked_lm_head_topk.default):
        h, w = _val(a[0]), _val(a[1])
        return 0 if h is None or w is None else 2 * _numel(h.shape) * w.shape[0]
    if t is torch.ops.graphopt.blocked_matmul.default:
        x, out = _val(a[0]), _val(node)
        return 0 if x is None or out is None else 2 * out.numel() * x.shape[-1]
    if t is torch.ops.graphopt.blocked_linear.default:
        x, out = _val(a[0]), _val(node)
        return 0 if x is None or out is None else 2 * out.numel() * x.shape[-1]
    return 0


def blocked_cost(node: fx.Node) -> Any:
    """:class:`graphopt.cost.NodeCost` of a blocked operator node."""
    from graphopt.cost import NodeCost

    read, written = _io_bytes(node)
    category = "attention" if node.target is torch.ops.graphopt.blocked_attention.default else "matmul"
    return NodeCost(int(_flops(node)), read, written, category)


def _register_costs() -> None:
    try:
        from graphopt.cost import register_cost
    except ImportError:  # pragma: no cover - a graphopt without the cost model
        return
    for op in _ESTIMATORS:
        register_cost(op, blocked_cost)


_register_costs()
