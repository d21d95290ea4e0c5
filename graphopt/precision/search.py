"""The error-budget search: keep the most error-costly nodes in fp32 until the budget holds.

:func:`search_kept` converts every candidate and measures the whole model
against the budget. Only when that is over does it ask for the ranking (most
costly first) and bisect on ``k``: the ``k`` most costly nodes stay fp32. That
is about ``log2(n)`` whole-model measurements; the result is measured, not
assumed (the largest failing and the smallest passing ``k`` are both checked).

The precision pass ranks by **whole-model** error: each node converted alone,
the model run on the example inputs (``n`` runs). Each op's *own* output error
(cheap: one op each) is a poor proxy: on a random-weight BERT-base the query
and key projections have own errors like the FFN's but cost the model ~100x
less, because softmax and the residual stream damp them (docs/precision.md).
The own error remains the ranking for very large plans and with
``precision_sensitivity='local'``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from graphopt.verify import Numerics


@dataclass
class SearchStep:
    kept: int
    numerics: Numerics


def relative_l2(candidate: torch.Tensor, reference: torch.Tensor) -> float:
    """||candidate - reference|| / ||reference|| in float64 (inf when the candidate is not finite)."""
    c, r = candidate.detach().double(), reference.detach().double()
    if not bool(torch.isfinite(c).all()):
        return float("inf")
    denom = float(r.norm())
    diff = float((c - r).norm())
    return diff / denom if denom > 0 else (0.0 if diff == 0 else float("inf"))


def describe_steps(steps: Sequence[SearchStep]) -> str:
    """``k=0: rel_l2 ... (over), k=12: ...``: each measurement of a search, for the report's notes."""
    return ", ".join(f"k={s.kept}: {s.numerics.summary()}{'' if s.numerics.ok else ' (over)'}" for s in steps)


def search_kept(order: Sequence[str] | Callable[[], Sequence[str]], measure: Callable[[set[str]], Numerics]
                ) -> tuple[set[str], list[SearchStep]]:
    """Smallest prefix of ``order`` (most costly first) to keep in fp32 so that ``measure(kept).ok``.

    ``measure(kept)`` builds the plan with ``kept`` in fp32 and checks it.
    ``order`` may be a callable: it is called only when converting everything
    is over budget (a ranking can be expensive). Returns the kept set and
    every measurement made; keeping all of ``order`` (nothing converted) is
    the fallback and is not measured.
    """
    steps = [SearchStep(0, measure(set()))]
    if steps[0].numerics.ok:
        return set(), steps
    order = list(order() if callable(order) else order)
    lo, hi = 0, len(order)  # lo fails, hi passes (hi == len: nothing converted)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        numerics = measure(set(order[:mid]))
        steps.append(SearchStep(mid, numerics))
        if numerics.ok:
            hi = mid
        else:
            lo = mid
    return set(order[:hi]), steps
