"""Helpers shared by the blocked / chunked operators.

* :func:`spans` -- the ``(start, stop)`` blocks of a dimension.
* :data:`ACTIVATIONS` -- the activations the chunked FFN and the planner
  understand, each with its torch function and its ONNX formula.
* :func:`accumulation_dtype` -- fp32 for low-precision inputs.
* :func:`onnx_transpose_last2` -- ``x^T`` over the last two axes in ONNX.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

LOW_PRECISION = (torch.float16, torch.bfloat16)


def spans(size: int, block: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of consecutive blocks of ``block`` covering ``range(size)``.

    ``block <= 0`` or ``block >= size`` gives one block.

    >>> list(spans(5, 2))
    [(0, 2), (2, 4), (4, 5)]
    """
    if block <= 0 or block >= size:
        yield 0, size
        return
    for start in range(0, size, block):
        yield start, min(start + block, size)


def n_blocks(size: int, block: int) -> int:
    """How many blocks :func:`spans` yields."""
    if block <= 0 or block >= size:
        return 1
    return math.ceil(size / block)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype partial sums are kept in: fp32 for fp16/bf16, else ``dtype``."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


@dataclass(frozen=True)
class Activation:
    """An activation the chunked FFN can apply: torch function and ONNX formula."""

    name: str
    torch_fn: Callable[[torch.Tensor], torch.Tensor]
    onnx_fn: Callable[[Any, Any], Any]  # (op module, value) -> value


def _onnx_gelu(op: Any, x: Any) -> Any:
    half, one = op.CastLike(0.5, x), op.CastLike(1.0, x)
    return op.Mul(op.Mul(half, x), op.Add(one, op.Erf(op.Div(x, op.CastLike(math.sqrt(2.0), x)))))


def _onnx_gelu_tanh(op: Any, x: Any) -> Any:
    half, one = op.CastLike(0.5, x), op.CastLike(1.0, x)
    inner = op.Mul(op.CastLike(math.sqrt(2.0 / math.pi), x),
                   op.Add(x, op.Mul(op.CastLike(0.044715, x), op.Mul(x, op.Mul(x, x)))))
    return op.Mul(op.Mul(half, x), op.Add(one, op.Tanh(inner)))


#: name -> Activation. Formulas use opset <= 13 operators so any target opset works.
ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in [
        Activation("identity", lambda x: x, lambda op, x: x),
        Activation("relu", F.relu, lambda op, x: op.Relu(x)),
        Activation("gelu", F.gelu, _onnx_gelu),
        Activation("gelu_tanh", lambda x: F.gelu(x, approximate="tanh"), _onnx_gelu_tanh),
        Activation("silu", F.silu, lambda op, x: op.Mul(x, op.Sigmoid(x))),
        Activation("sigmoid", torch.sigmoid, lambda op, x: op.Sigmoid(x)),
        Activation("tanh", torch.tanh, lambda op, x: op.Tanh(x)),
        Activation("quick_gelu", lambda x: x * torch.sigmoid(1.702 * x),
                   lambda op, x: op.Mul(x, op.Sigmoid(op.Mul(op.CastLike(1.702, x), x)))),
        Activation("relu2", lambda x: torch.square(F.relu(x)), lambda op, x: op.Mul(op.Relu(x), op.Relu(x))),
    ]
}


def activation(name: str) -> Activation:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; graphopt knows {sorted(ACTIVATIONS)}") from None


def onnx_transpose_last2(op: Any, x: Any) -> Any:
    """``x`` with its last two axes swapped (ONNX Transpose needs the rank)."""
    rank = len(x.shape)
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    return op.Transpose(x, perm=perm)
