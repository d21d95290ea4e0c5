"""The error-budget search: keep the most error-costly nodes in fp32 until the budget holds.

Each candidate node gets a cost: the relative L2 error of its own output when
it alone runs in low precision, on the recorded example inputs (cheap: one
op each). :func:`search_kept` converts every candidate, measures the whole
model against the budget, and when it is over, bisects on ``k``: the ``k``
most costly nodes stay fp32. That is about ``log2(n)`` whole-model
measurements instead of ``n``; the result is measured, not assumed (the
largest failing and the smallest passing ``k`` are both checked).
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


def search_kept(order: Sequence[str], measure: Callable[[set[str]], Numerics]
                ) -> tuple[set[str], list[SearchStep]]:
    """Smallest prefix of ``order`` (most costly first) to keep in fp32 so that ``measure(kept).ok``.

    ``measure(kept)`` builds the plan with ``kept`` in fp32 and checks it.
    Returns the kept set and every measurement made; keeping all of
    ``order`` (nothing converted) is the fallback and is not measured.
    """
    steps = [SearchStep(0, measure(set()))]
    if steps[0].numerics.ok:
        return set(), steps
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
