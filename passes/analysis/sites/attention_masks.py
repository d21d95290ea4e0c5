"""Mask terms of an attention site: what was applied to the scores, and what a constant mask amounts to."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from graphopt.passes.analysis.sites.attention_ops import Constants, dtype_of

aten = torch.ops.aten

#: an additive mask value at or below this is "minus infinity" for a softmax
#: (exp(-1e4) underflows to 0 in every floating dtype)
MASKED_BELOW = -1e4


@dataclass
class MaskTerm:
    """One mask or bias applied to the scores on the way from Q @ K^T to the softmax.

    ``kind``: ``"additive"`` (scores + coefficient * node), ``"fill"``
    (positions where ``node`` is ``fill_where`` are replaced by ``fill``:
    ``masked_fill`` / ``where``). ``shape``: shape of the scores where the term
    was applied (it may differ from the site's score shape when batch*heads
    were flattened). ``applied_by``: the node that applied it (``add``,
    ``masked_fill``, ...); ``written``: the operand as written there (``node``
    looks through boolean negations of it). ``learned``: computed from an
    ``nn.Parameter`` (a relative-position bias, say). ``zero``: a constant
    term beside others that adds nothing (a padding mask of ones folded to
    zeros): the fused op's mask leaves it out.
    """

    node: fx.Node
    kind: str
    shape: tuple[int, ...]
    coefficient: float = 1.0
    fill: float = 0.0
    fill_where: bool = True
    applied_by: fx.Node | None = None
    written: fx.Node | None = None
    learned: bool = False
    zero: bool = False

    def to_dict(self) -> dict[str, Any]:
        fill = self.fill if math.isfinite(self.fill) else str(self.fill)  # JSON has no infinities
        return {"node": self.node.name, "kind": self.kind, "shape": list(self.shape),
                "coefficient": self.coefficient, "fill": fill, "fill_where": self.fill_where}


def unnegated(term: MaskTerm) -> MaskTerm:
    """masked_fill(s, ~keep, v) -> fill where keep is False (the mask node is ``keep`` itself)."""
    n = term.node
    while isinstance(n, fx.Node) and n.op == "call_function" and \
            n.target in (aten.bitwise_not.default, aten.logical_not.default) and dtype_of(n.args[0]) == torch.bool:
        n = n.args[0]
        term = MaskTerm(n, term.kind, term.shape, term.coefficient, term.fill, not term.fill_where,
                        term.applied_by, term.written, term.learned)
    return term


def broadcastable(shape: tuple[int, ...], to: tuple[int, ...]) -> bool:
    """True when ``shape`` broadcasts to ``to``."""
    if len(shape) > len(to):
        return False
    return all(a in (1, b) for a, b in zip(reversed(shape), reversed(to)))


def evaluate_mask(terms: list[MaskTerm], score_shape: tuple[int, ...], consts: Constants) -> torch.Tensor | None:
    """The additive bias all mask terms amount to (float32, broadcast to the score shape), if constant."""
    bias = None
    for term in terms:
        val = consts.value(term.node)
        if val is None:
            return None
        val = val.to("cpu") if val.device.type == "meta" else val
        if term.kind == "additive":
            part = val.float() * term.coefficient
        else:
            hit = val.bool() if term.fill_where else ~val.bool()
            part = torch.where(hit, torch.tensor(term.fill, dtype=torch.float32, device=val.device),
                               torch.tensor(0.0, dtype=torch.float32, device=val.device))
        if tuple(term.shape) != tuple(score_shape):
            part = part.expand(term.shape).reshape(score_shape)
        bias = part if bias is None else bias + part
    return bias


def classify_constant_mask(bias: torch.Tensor) -> str:
    """'none' (masks nothing), 'causal' (lower-triangular, T == S) or 'constant'."""
    if bool((bias == 0).all()):
        return "none"
    t, s = bias.shape[-2], bias.shape[-1]
    if t == s:
        keep = torch.ones(t, s, dtype=torch.bool, device=bias.device).tril()
        if bool(((bias == 0) | ~keep).all()) and bool(((bias <= MASKED_BELOW) | keep).all()):
            return "causal"
    return "constant"
