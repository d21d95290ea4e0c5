"""Small graph-walk helpers the site finders share (users, last axis, dtype, row-keeping views)."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from graphopt import ir
from graphopt.opsets import RESHAPES, value_users

aten = torch.ops.aten

__all__ = ["single_user", "is_last_axis", "dtype_of", "keeps_last_dim"]


def single_user(node: fx.Node) -> fx.Node | None:
    """The one real user of ``node``, or None when it has none or several."""
    found = value_users(node)
    return found[0] if len(found) == 1 else None


def is_last_axis(dim: Any, node: fx.Node) -> bool:
    """``dim`` names the last axis of ``node``'s value."""
    shape = ir.shape_of(node)
    return shape is not None and isinstance(dim, int) and dim in (-1, len(shape) - 1)


def dtype_of(node: fx.Node) -> torch.dtype | None:
    """The dtype of ``node``'s value, or None when it has no tensor value."""
    val = ir.tensor_meta(node)
    return val.dtype if val is not None else None


def keeps_last_dim(node: fx.Node) -> bool:
    """A view/reshape that only regroups leading dims (rows keep their order)."""
    if node.op != "call_function" or node.target not in RESHAPES:
        return False
    a, b = ir.shape_of(node.args[0]), ir.shape_of(node)
    return a is not None and b is not None and len(a) >= 1 and len(b) >= 1 and a[-1] == b[-1]
