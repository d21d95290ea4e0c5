"""The LM-head site: a reduction over the vocabulary of ``[log_]softmax(linear(h))``.

    gather / argmax / topk(normalize(linear(h)), dim=-1)      normalize: none, softmax, log_softmax

Anchored at ``gather`` / ``argmax`` / ``topk`` over the last axis; walking
back through casts, inactive dropout and leading-dim views to the head's
:class:`~graphopt.passes.analysis.sites.linear.LinearSite`. The logits must
feed nothing else (the blocked planner never materialises them). Declines
(``Decline``): the logits are used elsewhere, cast to a low dtype, a gather
index that does not cover every row, a ``topk`` result used whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.fx as fx

from graphopt.opsets import value_users
from graphopt import ir
from graphopt.opsets import LOG_SOFTMAX, SOFTMAX_FORMS, is_passthrough
from graphopt.passes.analysis.sites.linear import LinearSite, linear_site
from graphopt.passes.analysis.sites.walk import dtype_of, is_last_axis, keeps_last_dim
from graphopt.pattern import Decline

aten = torch.ops.aten

__all__ = ["LMHeadSite", "lm_head_site", "LM_HEAD_REDUCTIONS"]

#: the reductions an LM-head site ends with
LM_HEAD_REDUCTIONS = frozenset({aten.gather.default, aten.argmax.default, aten.topk.default})


@dataclass
class LMHeadSite:
    """``reduction(normalize(linear(h)))`` where the logits feed nothing else."""

    kind: ClassVar[str] = "lm_head"
    reduction: str  # "gather", "argmax", "topk"
    output: fx.Node  # the reduction node
    head: LinearSite
    normalize: str  # "none", "log_softmax", "softmax"
    upcast: bool
    logits_view: fx.Node  # the node whose leading shape the reduction sees
    index: fx.Node | None = None
    k: int = 1
    largest: bool = True
    keepdim: bool = False
    nodes: list[fx.Node] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.output.name

    @property
    def rows(self) -> int:
        return math.prod(ir.shape_of(self.logits_view)[:-1])

    @property
    def vocab(self) -> int:
        return ir.shape_of(self.logits_view)[-1]

    def describe(self) -> str:
        return f"LM head + {self.normalize}/{self.reduction} at {self.output.name} ({self.rows} rows x {self.vocab})"



def lm_head_site(reduction: fx.Node) -> LMHeadSite | None:
    """The LM-head site ``reduction`` ends, None when it ends none; raises :class:`Decline` with the reason
    when it nearly does (the logits are used elsewhere, cast to a low dtype, ...)."""
    t, a = reduction.target, reduction.args
    src = a[0]
    if not isinstance(src, fx.Node):
        return None
    if t is aten.gather.default:
        if not is_last_axis(a[1], src):
            return None
        kind, extra = "gather", {"index": a[2]}
        idx_shape, src_shape = ir.shape_of(a[2]), ir.shape_of(src)
        if idx_shape is None or src_shape is None or idx_shape[:-1] != src_shape[:-1]:
            raise Decline(f"{reduction.name}: gather index does not cover every row")
    elif t is aten.argmax.default:
        dim = a[1] if len(a) > 1 else reduction.kwargs.get("dim")
        if dim is None or not is_last_axis(dim, src):
            return None
        kind = "argmax"
        extra = {"keepdim": bool(a[2] if len(a) > 2 else reduction.kwargs.get("keepdim", False))}
    elif t is aten.topk.default:
        dim = a[2] if len(a) > 2 else reduction.kwargs.get("dim", -1)
        if not is_last_axis(dim, src):
            return None
        kind = "topk"
        extra = {"k": int(a[1]), "largest": bool(a[3] if len(a) > 3 else reduction.kwargs.get("largest", True))}
        if not all(u.op == "call_function" and u.target.__name__ == "getitem" for u in reduction.users):
            raise Decline(f"{reduction.name}: topk result used whole")
    else:
        return None
    nodes: list[fx.Node] = []
    normalize = "none"
    cur = src
    while True:
        if not isinstance(cur, fx.Node) or cur.op != "call_function":
            return None
        if len(value_users(cur)) != 1:
            raise Decline(f"{reduction.name}: the logits ({cur.name}) are also used elsewhere")
        nodes.append(cur)
        head = linear_site(cur)
        if head is not None:
            break
        if cur.target in SOFTMAX_FORMS and normalize == "none":
            if not is_last_axis(cur.args[1], cur):
                return None
            normalize = "log_softmax" if cur.target in LOG_SOFTMAX else "softmax"
            cur = cur.args[0]
        elif keeps_last_dim(cur) or is_passthrough(cur):
            cur = cur.args[0]
        else:
            return None
    head_dtype, src_dtype = dtype_of(head.node), dtype_of(src)
    if src_dtype == head_dtype:
        upcast = False
    elif src_dtype == torch.float32:
        upcast = True
    else:
        raise Decline(f"{reduction.name}: the logits are cast to {src_dtype}")
    return LMHeadSite(kind, reduction, head, normalize, upcast, src, nodes=nodes, **extra)

