"""Sizes of the tensors in a node's value (``meta["val"]``), read without running anything.

Shapes with symbolic sizes use their hint. Used by the cost model
(:mod:`graphopt.cost`), liveness (:mod:`graphopt.memory`) and the analyses.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx

__all__ = ["val_of", "tensors_in", "shape", "numel", "itemsize", "nbytes", "distinct_bytes", "storage_bytes",
           "readable_bytes"]



def _int(x: Any) -> int:
    try:
        return int(x)
    except Exception:  # a SymInt without a concrete value: use its hint
        hint = getattr(getattr(x, "node", None), "hint", None)
        return int(hint) if hint is not None else 1


def val_of(node: Any) -> Any:
    """A node's ``meta["val"]`` (None for anything else)."""
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def tensors_in(value: Any) -> list[torch.Tensor]:
    """Tensors in a value that may be a tensor, a list/tuple of them, or neither."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors_in(v)]
    return []


def shape(t: torch.Tensor) -> tuple[int, ...]:
    """``t``'s shape as ints (symbolic sizes by their hint)."""
    return tuple(_int(s) for s in t.shape)


def numel(t: torch.Tensor) -> int:
    """Number of elements of ``t``."""
    return math.prod(shape(t))


def itemsize(t: torch.Tensor) -> int:
    """Bytes per element (4 when unknown)."""
    try:
        return int(t.element_size())
    except Exception:
        return 4


def nbytes(t: torch.Tensor) -> int:
    """Bytes of ``t``'s elements as laid out (numel x itemsize)."""
    return numel(t) * itemsize(t)


def distinct_bytes(t: torch.Tensor) -> int:
    """Bytes an op has to read to see all of ``t``: stride-0 (broadcast) dims count once."""
    try:
        strides = [_int(s) for s in t.stride()]
    except Exception:
        return nbytes(t)
    n = math.prod(s for s, st in zip(shape(t), strides) if st != 0)
    return n * itemsize(t)


def storage_bytes(t: torch.Tensor) -> int:
    """Bytes of the storage span ``t`` covers (its allocation when ``t`` is not a view)."""
    try:
        strides = [_int(s) for s in t.stride()]
        dims = shape(t)
        if any(d == 0 for d in dims):
            return 0
        span = 1 + sum((d - 1) * abs(st) for d, st in zip(dims, strides))
        return span * itemsize(t)
    except Exception:
        return nbytes(t)


def readable_bytes(n: float) -> str:
    """Bytes for people, one decimal: ``'3.2 GiB'``, ``'129.0 MiB'``, ``'14.1 KiB'``, ``'512 B'``."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"
