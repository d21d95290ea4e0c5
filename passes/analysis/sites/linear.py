"""The linear site: a matmul of an activation with a 2-D weight.

A *linear site* is one of

    aten.linear(x, W[, b])        W: (out, in)   -- nn.Linear
    aten.addmm(b, x, W)           W: (in, out)   -- transformers' Conv1D (GPT-2)
    aten.mm(x, W) / aten.matmul(x, W)            -- ``x @ self.weight``
    aten.matmul(x, t(W)) / mm(x, t(W))           -- ``x @ self.weight.T``
    getitem(split(<one of the above>, sizes, -1), i)   -- one slice of a merged projection
                                                     (``allow_split``: the blocked planner's merged q/k/v, gate/up)

Every consumer reads the same :class:`LinearSite`: the horizontal-fusion pass
(``merge_matmuls``) groups sites that share ``x``; the tensor-parallel pass
shards them; the blocked planner reads the FFN and LM-head linears from it.
They need what a site computes: ``x @ E + b`` with ``E`` the *effective
weight* of shape (in, out).

:func:`linear_site` matches the structure (a 2-D weight operand, for
``mm``/``matmul`` a parameter behind views); ``site.declined`` says why a
match is not an *activation x stored constant weight* (the weight or bias is
computed, ``linear(x, W.t())``, the input is a constant, shapes disagree).
:func:`find_linear_sites` returns the sites with no such reason: the ones
merge_matmuls and tensor_parallel rewrite.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from graphopt import ir, meta
from graphopt.opsets import SPLITS, TRANSPOSES, is_parameter_view

aten = torch.ops.aten

__all__ = ["LINEAR_OPS", "LinearSite", "linear_site", "find_linear_sites"]

#: the ops a linear site is computed by
LINEAR_OPS = frozenset({aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default})

#: rank-2 permutations that swap the two axes
_SWAPS = ([1, 0], [-1, -2], [-1, 0], [1, -2])


@dataclass
class LinearSite:
    """One matmul of an activation with a 2-D weight.

    ``kind``: ``linear``, ``addmm``, ``mm`` or ``matmul``. ``input``: the
    activation. ``weight``: the weight node the site multiplies with, behind
    at most one transpose; ``weight_transposed``: it reaches the matmul
    through that transpose (``x @ W.T``). ``bias``: the bias node or None.
    ``out_slice`` = ``(start, stop)``: ``node`` is that slice of the output
    features of a merged linear (a ``getitem`` of its last-dim ``split``).
    ``declined``: why this is not an activation x stored-constant site (None
    when it is).
    """

    node: fx.Node
    kind: str
    input: fx.Node
    weight: fx.Node
    weight_transposed: bool
    bias: fx.Node | None
    in_features: int
    out_features: int
    out_slice: tuple[int, int] | None = None
    declined: str | None = None

    @property
    def weight_is_in_out(self) -> bool:
        """``weight`` is stored as (in, out) (``x @ W``), not (out, in) (``x @ W^T``)."""
        return (self.kind != "linear") != self.weight_transposed

    def effective_weight(self, gm: fx.GraphModule) -> torch.Tensor:
        """The weight as the site multiplies with it: shape (in_features, out_features)."""
        w = ir.get_attr_value(gm, self.weight)
        return w if self.weight_is_in_out else w.t()

    def bias_value(self, gm: fx.GraphModule) -> torch.Tensor | None:
        """The bias tensor (a stored constant), or None."""
        return None if self.bias is None else ir.get_attr_value(gm, self.bias)

    @property
    def module_path(self) -> str:
        return ir.module_path(self.node)

    @property
    def label(self) -> str:
        """The module path (``model.layers.0.self_attn.q_proj``), or the group a merged matmul came from."""
        return self.node.meta.get(meta.MERGED_FROM) or self.module_path or self.node.name


def _rank(node: Any) -> int:
    shape = ir.shape_of(node)
    return len(shape) if shape is not None else -1


def _untransposed(w: fx.Node) -> tuple[fx.Node, bool]:
    """``(base, True)`` when ``w`` is a transpose of a 2-D node, else ``(w, False)``."""
    if w.op != "call_function" or w.target not in TRANSPOSES or not isinstance(w.args[0], fx.Node):
        return w, False
    if _rank(w.args[0]) != 2:
        return w, False
    if w.target == aten.permute.default and list(w.args[1]) not in _SWAPS:
        return w, False
    return w.args[0], True


def _is_activation(node: object) -> bool:
    return isinstance(node, fx.Node) and node.op != "get_attr" and ir.tensor_meta(node) is not None


def _operands(node: fx.Node) -> tuple[str, Any, Any, Any] | None:
    """``(kind, x, weight operand, bias)`` when ``node`` has a linear site's structure."""
    t, a = node.target, node.args
    if t is aten.linear.default:
        if _rank(a[1]) != 2:
            return None
        return "linear", a[0], a[1], a[2] if len(a) > 2 else node.kwargs.get("bias")
    if t is aten.addmm.default:
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1 or _rank(a[0]) != 1 \
                or _rank(a[2]) != 2:
            return None
        return "addmm", a[1], a[2], a[0]
    if t in (aten.mm.default, aten.matmul.default):
        w = a[1]
        if _rank(w) != 2 or not isinstance(w, fx.Node):
            return None
        base, _ = _untransposed(w)
        if not (is_parameter_view(w) or base.op == "get_attr"):
            return None
        return ("mm" if t is aten.mm.default else "matmul"), a[0], w, None
    return None


def _declined(node: fx.Node, kind: str, x: Any, w: fx.Node, weight: fx.Node, transposed: bool, bias: Any,
              n_in: int, n_out: int) -> str | None:
    """Why the matched site is not an activation x stored-constant one (None when it is)."""
    if ir.shape_of(node) is None:
        return "the output has no shape"
    if not _is_activation(x):
        return "the input is not an activation"
    if kind == "linear" and _untransposed(w)[0].op == "get_attr" and w.op != "get_attr":
        return "linear(x, W.t())"
    if weight.op != "get_attr":
        return "the weight is not a stored constant"
    if kind == "addmm" and len(node.args) != 3:
        return "addmm with extra arguments"
    if bias is not None and not ir.is_constant(bias):
        return "the bias is not a stored constant"
    if kind == "addmm" and ir.shape_of(bias) != (n_out,):
        return "the bias is not a vector over the output features"
    if kind in ("mm", "matmul"):
        x_shape = ir.shape_of(x)
        if x_shape is None or len(x_shape) < 2 or x_shape[-1] != n_in:
            return "the input's last dim is not the weight's input features"
    return None


def _split_slice(getitem: fx.Node) -> tuple[fx.Node, tuple[int, int]] | None:
    """``(source node, (start, stop))`` when ``getitem`` takes a last-dim split of ``source``."""
    split, index = getitem.args[0], getitem.args[1]
    if not isinstance(split, fx.Node) or split.op != "call_function" or split.target not in SPLITS:
        return None
    src = split.args[0]
    shape = ir.shape_of(src)
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    if shape is None or not isinstance(index, int) or dim not in (-1, len(shape) - 1):
        return None
    sizes = split.args[1]
    if isinstance(sizes, int):
        sizes = [min(sizes, shape[-1] - i) for i in range(0, shape[-1], sizes)]
    start = sum(sizes[:index])
    return src, (start, start + sizes[index])


def linear_site(node: Any, allow_split: bool = False) -> LinearSite | None:
    """The :class:`LinearSite` ``node`` computes, or None when it has no linear structure.

    ``allow_split``: also a ``getitem`` of a last-dim ``split`` of such a node
    (a merged projection); the site is that slice of the merged one.
    """
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    if allow_split and node.target is operator.getitem:
        found = _split_slice(node)
        merged = linear_site(found[0]) if found is not None else None
        if merged is None:
            return None
        start, stop = found[1]
        return LinearSite(node, merged.kind, merged.input, merged.weight, merged.weight_transposed, merged.bias,
                          merged.in_features, stop - start, found[1], merged.declined)
    operands = _operands(node)
    if operands is None:
        return None
    kind, x, w, bias = operands
    weight, transposed = (w, False) if kind == "linear" else _untransposed(w)
    shape = ir.shape_of(weight)
    in_out = (kind != "linear") != transposed
    n_in, n_out = (shape[0], shape[1]) if in_out else (shape[1], shape[0])
    declined = _declined(node, kind, x, w, weight, transposed, bias, n_in, n_out)
    return LinearSite(node, kind, x, weight, transposed, bias, n_in, n_out, declined=declined)


def find_linear_sites(gm: fx.GraphModule) -> list[LinearSite]:
    """Every activation x stored-constant linear site of ``gm`` (``declined`` None), in graph order."""
    return [s for n in gm.graph.nodes if (s := linear_site(n)) is not None and s.declined is None]
