"""Prove that a mask built from the sequence sizes is exactly causal (``kv <= q``), for ``is_causal``.

With dynamic shapes a causal mask is not a constant to evaluate: transformers
builds it from ``arange`` over the symbolic sequence length, ``index`` and
comparisons of the positions (``kv_pos <= q_pos``), ``and``-ed with terms that
are true everywhere (the packed-sequence check ``cumsum(diff(pos) != 1)``
equal for q and kv, a ``new_ones`` start) or that a range makes true (a
sliding window ``kv_pos > q_pos - w`` when every sequence is at most ``w``
long).

The check interprets the mask's nodes over the index of each axis: an integer
tensor is an affine function of the indices (``const + sum(coef * i)``), a
boolean one a conjunction of linear constraints ``sum(coef * i) + const <= 0``.
The mask is causal when, on the scores' last two axes (q, kv), the
conjunction is exactly ``kv - q <= 0`` and every other constraint holds for
all ``0 <= kv <= q < Q`` (``Q``: the largest query length the graph takes,
from the shape's range). Any op, input value or constraint it cannot read
makes it answer with the reason instead: ``is_causal`` is only claimed when
proved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from graphopt import ir
from graphopt.opsets import CASTS_INCLUDING_DEVICE, IDENTITY_LIKE
from graphopt.passes.analysis.sites.attention_masks import MASKED_BELOW, MaskTerm
from graphopt.passes.analysis.sites.attention_ops import arg

aten = torch.ops.aten


@dataclass(frozen=True)
class Affine:
    """An integer tensor whose element at index ``i`` is ``const + sum(coef[a] * i[a])``."""

    coef: tuple[int, ...]
    const: int


@dataclass(frozen=True)
class Pred:
    """A boolean tensor: true where every ``sum(coef * i) + const <= 0`` holds (no constraint: all true).

    ``unknown``: reasons for terms and-ed in that could not be read (the mask is not proved then).
    """

    constraints: tuple[tuple[tuple[int, ...], int], ...]
    unknown: tuple[str, ...] = ()


class _Unreadable(Exception):
    """A mask node the check cannot interpret; the message is the reason."""


_PASS_THROUGH = IDENTITY_LIKE | CASTS_INCLUDING_DEVICE | {aten.clone.default, aten.alias.default}
_AND_OPS = frozenset({aten.__and__.Tensor, aten.bitwise_and.Tensor, aten.logical_and.default})
_COMPARE = {"le": (1, 0), "lt": (1, 1), "ge": (-1, 0), "gt": (-1, 1)}  # (sign of a - b, +const) for <= 0


def _shape(node: Any) -> tuple[Any, ...]:
    val = ir.tensor_meta(node)
    if val is None:
        raise _Unreadable(f"{getattr(node, 'name', node)} has no tensor metadata")
    return tuple(val.shape)


def _normalised(coef: tuple[int, ...], shape: tuple[Any, ...]) -> tuple[int, ...]:
    """Coefficients on size-1 axes are 0 (their index is always 0); aligned to ``len(shape)``."""
    coef = (0,) * (len(shape) - len(coef)) + tuple(coef)
    return tuple(0 if (isinstance(s, int) and s == 1) else c for c, s in zip(coef, shape))


def _pad(coef: tuple[int, ...], ndim: int) -> tuple[int, ...]:
    return (0,) * (ndim - len(coef)) + tuple(coef)


def _is_int(node: Any) -> bool:
    val = ir.tensor_meta(node)
    return val is not None and not val.dtype.is_floating_point and val.dtype != torch.bool


def _scalar(x: Any) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise _Unreadable(f"a mask operand {x!r} is not an integer constant")
    return x


def _compare(kind: str, a: Affine, b: Affine, ndim: int) -> Pred:
    """``a <op> b`` over integers as constraints ``... <= 0``."""
    d = tuple(x - y for x, y in zip(_pad(a.coef, ndim), _pad(b.coef, ndim)))
    c = a.const - b.const
    if kind in ("eq", "ne"):
        if any(d):
            if kind == "ne":
                raise _Unreadable("a position inequality (!=) in the mask")
            return Pred(((d, c), (tuple(-x for x in d), -c)))
        return _const_pred((c == 0) == (kind == "eq"), ndim)
    sign, plus = _COMPARE[kind]
    return Pred(((tuple(sign * x for x in d), sign * c + plus),))


def _const_pred(value: bool, ndim: int) -> Pred:
    return Pred(()) if value else Pred((((0,) * ndim, 1),))


def _pred_value(p: Pred) -> bool | None:
    """The constant value of a predicate that depends on no index (None when it does)."""
    if p.unknown or any(any(c) for c, _ in p.constraints):
        return None
    return all(k <= 0 for _, k in p.constraints)


class _Interpreter:
    """Reads mask nodes as :class:`Affine` / :class:`Pred` values (memoised)."""

    def __init__(self) -> None:
        self.values: dict[fx.Node, Any] = {}

    def __call__(self, node: Any) -> Any:
        if not isinstance(node, fx.Node):
            return node
        if node not in self.values:
            self.values[node] = self._read(node)
        return self.values[node]

    def affine(self, node: Any) -> Affine:
        value = self(node)
        if isinstance(value, int) and not isinstance(value, bool):
            return Affine((), value)
        if isinstance(value, Pred) and (v := _pred_value(value)) is not None:
            return Affine((), int(v))
        if not isinstance(value, Affine):
            raise _Unreadable(f"{getattr(node, 'name', node)} is not a position tensor")
        return value

    def pred(self, node: Any) -> Pred:
        try:
            value = self(node)
        except _Unreadable as exc:
            return Pred((), (str(exc),))
        if not isinstance(value, Pred):
            return Pred((), (f"{node.name} is not a boolean mask",))
        return value

    def _read(self, n: fx.Node) -> Any:
        if n.op == "placeholder":
            raise _Unreadable(f"the mask reads the values of input {n.name!r} (a padding mask?)")
        if n.op == "get_attr":
            return _uniform_constant(n)
        if n.op != "call_function":
            raise _Unreadable(f"the mask reads {n.op} {n.name}")
        t, shape = n.target, _shape(n)
        if t in _PASS_THROUGH:
            src = n.args[0]
            if ir.tensor_meta(src) is None or ir.tensor_meta(src).dtype != ir.tensor_meta(n).dtype:
                self(src)  # what the source reads (an input's values) is the better reason
                raise _Unreadable(f"{n.name} changes the mask's dtype")
            return self(src)
        if t in _AND_OPS:
            a, b = self.pred(n.args[0]), self.pred(n.args[1])
            return Pred(a.constraints + b.constraints, a.unknown + b.unknown)
        if t in (aten.new_ones.default, aten.ones.default) and n.kwargs.get("dtype") == torch.bool:
            return Pred(())
        reader = _READERS.get(t)
        if reader is None:
            raise _Unreadable(f"the mask is computed with {ir.op_name(n)} ({n.name})")
        return reader(self, n, shape)


def _uniform_constant(n: fx.Node) -> Any:
    """A stored tensor (a folded ``new_ones``, say) whose elements are all equal: that value."""
    value = ir.get_attr_value(n.graph.owning_module, n)
    if not isinstance(value, torch.Tensor) or value.numel() == 0 or value.is_floating_point():
        raise _Unreadable(f"the mask reads the stored tensor {n.name}")
    first = value.reshape(-1)[0]
    if not bool((value == first).all()):
        raise _Unreadable(f"the mask reads the stored tensor {n.name}, not one value throughout")
    if value.dtype == torch.bool:
        return _const_pred(bool(first), value.ndim)
    return Affine((), int(first))


def _arange(it: _Interpreter, n: fx.Node, shape: tuple) -> Affine:
    if n.target == aten.arange.start_step and arg(n, 2, "step", 1) != 1:
        raise _Unreadable(f"{n.name}: arange with a step")
    start = _scalar(n.args[0]) if n.target != aten.arange.default else 0
    return Affine(_normalised((1,), shape), start)


def _add(it: _Interpreter, n: fx.Node, shape: tuple) -> Affine:
    if n.kwargs.get("alpha", 1) != 1 or not _is_int(n):
        raise _Unreadable(f"{n.name}: not an integer sum")
    a, b = it.affine(n.args[0]), it.affine(n.args[1])
    sign = -1 if n.target == aten.sub.Tensor else 1
    coef = tuple(x + sign * y for x, y in zip(_pad(a.coef, len(shape)), _pad(b.coef, len(shape))))
    return Affine(_normalised(coef, shape), a.const + sign * b.const)


def _unsqueeze(it: _Interpreter, n: fx.Node, shape: tuple) -> Any:
    dim = n.args[1] % len(shape)
    value = it(n.args[0])
    if isinstance(value, Pred):
        return Pred(tuple((c[:dim] + (0,) + c[dim:], k) for c, k in _padded(value, len(shape) - 1)),
                    value.unknown)
    a = it.affine(n.args[0])
    coef = _pad(a.coef, len(shape) - 1)
    return Affine(coef[:dim] + (0,) + coef[dim:], a.const)


def _padded(p: Pred, ndim: int) -> tuple[tuple[tuple[int, ...], int], ...]:
    return tuple((_pad(c, ndim), k) for c, k in p.constraints)


def _expand(it: _Interpreter, n: fx.Node, shape: tuple) -> Any:
    value = it(n.args[0])
    if isinstance(value, Pred):
        return Pred(_padded(value, len(shape)), value.unknown)
    a = it.affine(n.args[0])
    return Affine(_pad(a.coef, len(shape)), a.const)


def _slice(it: _Interpreter, n: fx.Node, shape: tuple) -> Affine:
    a = it.affine(n.args[0])
    dim, start, step = arg(n, 1, "dim", 0) % len(shape), arg(n, 2, "start", 0) or 0, arg(n, 4, "step", 1)
    if step != 1 or not isinstance(start, int) or start < 0:
        raise _Unreadable(f"{n.name}: a slice the check does not read")
    coef = _pad(a.coef, len(shape))
    return Affine(_normalised(coef, shape), a.const + coef[dim] * start)


def _diff(it: _Interpreter, n: fx.Node, shape: tuple) -> Affine:
    """``diff(x, 1, dim, prepend=x[..., :1] - k)`` of ``x = ... + k * i[dim]``: the constant ``k``."""
    a = it.affine(n.args[0])
    order, dim = arg(n, 1, "n", 1), arg(n, 2, "dim", -1) % len(shape)
    prepend, append = arg(n, 3, "prepend"), arg(n, 4, "append")
    coef = _pad(a.coef, len(shape))
    if order != 1 or append is not None:
        raise _Unreadable(f"{n.name}: a diff the check does not read")
    if prepend is not None:
        p = it.affine(prepend)
        pc = _pad(p.coef, len(shape))
        if p.const != a.const - coef[dim] or any(x != y for i, (x, y) in enumerate(zip(pc, coef)) if i != dim):
            raise _Unreadable(f"{n.name}: diff with a prepend that does not continue the positions")
    return Affine((0,) * len(shape), coef[dim])


def _cumsum(it: _Interpreter, n: fx.Node, shape: tuple) -> Affine:
    a = it.affine(n.args[0])
    if any(a.coef):
        raise _Unreadable(f"{n.name}: cumsum of varying values")
    dim = n.args[1] % len(shape)
    coef = tuple(a.const if i == dim else 0 for i in range(len(shape)))
    return Affine(_normalised(coef, shape), a.const)


def _index(it: _Interpreter, n: fx.Node, shape: tuple) -> Affine:
    """``x[i0, i1, ...]`` with position-tensor indices (leading axes, none negative)."""
    a = it.affine(n.args[0])
    indices = list(n.args[1])
    if any(i is None or not _is_int(i) for i in indices):
        raise _Unreadable(f"{n.name}: indexing with None or a boolean mask")
    src_ndim = len(_shape(n.args[0]))
    out_ndim = len(shape)
    rest = src_ndim - len(indices)
    src = _pad(a.coef, src_ndim)
    coef, const = [0] * out_ndim, a.const
    for k, idx in enumerate(indices):
        v = it.affine(idx)
        if v.const < 0 or any(c < 0 for c in v.coef):
            raise _Unreadable(f"{n.name}: an index that may be negative")
        for ax, c in enumerate(_pad(v.coef, out_ndim - rest)):
            coef[ax] += src[k] * c
        const += src[k] * v.const
    for r in range(rest):
        coef[out_ndim - rest + r] += src[len(indices) + r]
    return Affine(_normalised(tuple(coef), shape), const)


def _comparison(it: _Interpreter, n: fx.Node, shape: tuple) -> Pred:
    a, b = n.args[0], n.args[1]
    if not _is_int(a) or (isinstance(b, fx.Node) and not _is_int(b)):
        raise _Unreadable(f"{n.name} compares non-integer tensors")
    kind = n.target._overloadpacket.__name__
    p = _compare(kind, it.affine(a), it.affine(b), len(shape))
    return Pred(tuple((_normalised(c, shape), k) for c, k in p.constraints))


_READERS = {
    aten.arange.default: _arange, aten.arange.start: _arange, aten.arange.start_step: _arange,
    aten.add.Tensor: _add, aten.sub.Tensor: _add,
    aten.unsqueeze.default: _unsqueeze, aten.expand.default: _expand, aten.slice.Tensor: _slice,
    aten.diff.default: _diff, aten.cumsum.default: _cumsum, aten.index.Tensor: _index,
}
for _op in ("le", "lt", "ge", "gt", "eq", "ne"):
    _READERS[getattr(aten, _op).Tensor] = _comparison
    _READERS[getattr(aten, _op).Scalar] = _comparison


def _upper_bound(size: Any) -> int | None:
    """The largest value a symbolic size takes; None when unbounded or unknown.

    A plain int is not trusted as a bound: a mask computed from the sizes
    (not a constant) means the graph takes other sizes, and metadata
    propagated from the example inputs would show the example's size.
    """
    if isinstance(size, int):
        return None
    node = getattr(size, "node", None)
    try:
        upper = node.shape_env.bound_sympy(node.expr).upper
        return int(upper) if upper.is_finite else None
    except Exception:  # noqa: BLE001 - no range known: treated as unbounded
        return None


def _holds_under_causal(coef: tuple[int, int], const: int, q_max: int | None) -> bool:
    """``cq * q + ck * kv + const <= 0`` for all ``0 <= kv <= q <= q_max`` (None: unbounded)."""
    cq, ck = coef
    if const > 0:  # the vertex q = kv = 0
        return False
    for slope in (cq, cq + ck):  # the vertices (q_max, 0) and (q_max, q_max)
        if q_max is None and slope > 0:
            return False
        if q_max is not None and slope * q_max + const > 0:
            return False
    return True


def causal_reason(keep: fx.Node, q_len: Any) -> tuple[str | None, bool]:
    """Why the boolean mask ``keep`` (True: attend) is not exactly ``kv <= q`` on its last two axes.

    Returns ``(reason, has_causal_term)``: reason None when it is exactly causal
    for every size the graph takes; ``has_causal_term`` says whether a
    ``kv <= q`` term was found (a mask worth reporting as not causal).
    """
    pred = _Interpreter().pred(keep)
    ndim = max(len(_shape(keep)), 2)
    q_max = _upper_bound(q_len)
    q_max = None if q_max is None else q_max - 1
    causal_term, others, reason = False, [], None
    for coef, const in _padded(pred, ndim):
        outer, (cq, ck) = coef[:-2], coef[-2:]
        if any(outer):
            reason = reason or "the mask depends on the batch or head index"
        elif cq < 0 and ck == -cq and const == 0:
            causal_term = True
        elif not _holds_under_causal((cq, ck), const, q_max):
            others.append((cq, ck, const))
    if pred.unknown:
        reason = reason or pred.unknown[0]
    if others and not reason:
        cq, ck, const = others[0]
        span = f"for query lengths up to {q_max + 1}" if q_max is not None else "for unbounded query lengths"
        reason = (f"a mask term {cq}*q + {ck}*kv + {const} <= 0 (a sliding window?) masks more than causal "
                  f"{span}; narrow the seq range to make it causal")
    if not causal_term and not reason:
        reason = "the mask has no kv <= q term"
    return reason, causal_term


def _is_zero(x: Any) -> bool:
    """A literal 0, ``zeros(...)``, or a stored tensor of zeros (a folded ``zeros``)."""
    if not isinstance(x, fx.Node):
        return isinstance(x, (int, float)) and x == 0
    if x.op == "call_function":
        return x.target in (aten.zeros.default, aten.zeros_like.default)
    value = ir.get_attr_value(x.graph.owning_module, x) if x.op == "get_attr" else None
    return isinstance(value, torch.Tensor) and bool((value == 0).all())


def keep_mask_of(term: MaskTerm) -> tuple[fx.Node | None, str | None]:
    """The boolean keep-mask a mask term applies, or the reason it applies none the check reads."""
    if term.kind == "fill":
        if term.fill > MASKED_BELOW:
            return None, f"the mask fills {term.fill}, not minus infinity"
        if term.fill_where:
            return None, "the mask marks the masked positions (negation not read)"
        return term.node, None
    node = term.node
    if term.coefficient != 1.0 or node.op != "call_function" or node.target not in (
            aten.where.ScalarOther, aten.where.self, aten.where.Scalar):
        return None, f"the mask {node.name} is not where(keep, 0, -inf)"
    cond, zero, fill = node.args[0], node.args[1], node.args[2]
    if not _is_zero(zero) or not isinstance(fill, (int, float)) or fill > MASKED_BELOW:
        return None, f"the mask {node.name} is not where(keep, 0, -inf)"
    return cond, None


__all__ = ["Affine", "Pred", "causal_reason", "keep_mask_of"]
