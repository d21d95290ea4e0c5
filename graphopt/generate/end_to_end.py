"""Whether the optimized prefill/decode pair meets its error budget end to end, and what the build does when not.

* :class:`StepCheck` -- the pair's teacher-forced logits against the eager model (``check_steps`` in
  :mod:`graphopt.generate.build` measures it);
* :func:`pair_budget` -- the budget the pair is held to (the first plan's);
* :func:`fall_back_within_budget` -- re-plan both graphs at a budget tightened by the miss
  (:func:`replan_scale`), then at half that (``int4``: its fallback ``int8wo`` at the pair's budget instead,
  :data:`REPLAN_FALLBACK_PRECISION`), then build them exact;
* :func:`precision_not_applied` -- a note for each graph that asked for reduced precision and runs fp32.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from graphopt.errors import BadInput
from graphopt.generate.cache_check import exact_rel_l2
from graphopt.verify import ErrorBudget, Numerics

if TYPE_CHECKING:
    from graphopt.generate.build import GenerationGraphs

log = logging.getLogger(__name__)


#: how many standard errors of its own top-1 share the pair's check must clear a budget's top-1 by
TOP1_STANDARD_ERRORS = 1.0


@dataclass
class StepCheck:
    """Teacher-forced logits of the optimized pair against the eager model, prompt plus decode steps."""

    rel_l2: float
    top1: float
    steps: int
    dtype: torch.dtype = torch.float32
    #: the rows teacher-forced (top-1 is over rows x (steps + 1) positions) and their prompt's length
    rows: int = 0
    prompt: int = 0

    def ok(self, budget: ErrorBudget | None) -> bool:
        """Within ``budget`` (reduced precision; its top-1 cleared by :meth:`top1_floor`), or as exact as the
        model's dtype allows (``None``: :func:`~graphopt.generate.cache_check.exact_rel_l2`)."""
        limit = budget.rel_l2 if budget is not None else exact_rel_l2(self.dtype)
        return self.rel_l2 <= limit and (budget is None or budget.top1 is None
                                         or self.top1 >= self.top1_floor(budget.top1))

    def top1_floor(self, top1: float) -> float:
        """The top-1 agreement this check must reach for a budget's ``top1`` to hold on positions it did not
        measure too: ``top1`` plus :data:`TOP1_STANDARD_ERRORS` standard errors of an agreement share at ``top1``
        over the check's ``rows x (steps + 1)`` positions (about 0.0094 at 0.9 over 1,032). A plan whose check
        lands exactly on the budget agrees on fresh positions with only even odds."""
        positions = self.rows * (self.steps + 1)
        if positions <= 0:
            return top1
        return min(1.0, top1 + TOP1_STANDARD_ERRORS * math.sqrt(top1 * (1.0 - top1) / positions))

    def summary(self) -> str:
        rows = f"{self.rows} rows x " if self.rows else ""
        prompt = f"{self.prompt}-token prompt" if self.prompt else "prompt"
        return (f"teacher-forced over {rows}({prompt} + {self.steps} decode steps): rel_l2 {self.rel_l2:.2e}, "
                f"top1 {self.top1:.3f}")


def pair_budget(graphs: GenerationGraphs) -> ErrorBudget | None:
    """The budget the pair is held to end to end: the one it was first planned at (a re-plan tightens the graphs'
    own budgets, not this), None where neither graph is approximate."""
    approximate = [r for r in (graphs.prefill, graphs.decode) if r.approximate]
    if not approximate:
        return None
    return graphs.error_budget or approximate[0].context.error_budget


def precision_not_applied(graphs: GenerationGraphs) -> list[str]:
    """A note for each graph whose precision pass converted nothing, with the pass's reason (the report has the
    details): a user who asked for reduced precision learns which graph runs fp32, and why."""
    notes = []
    for name in ("prefill", "decode"):
        record = getattr(graphs, name).report.record("precision")
        if record is None or record.status == "applied":
            continue
        whole = [d.reason for d in record.declined if d.site == "graph"]
        if record.status == "rolled back" and record.numerics is not None:
            reason = f"its check failed: {record.numerics.summary()}"
        else:
            reason = whole[0] if whole else (record.error or (record.notes[-1] if record.notes else record.status))
        notes.append(f"{name}: reduced precision not applied ({record.status}): {reason}")
    return notes


#: a pair that misses its budget end to end is re-planned at the budget scaled by how far it missed (times this
#: margin), at most REPLAN_MAX_SCALE of it (a near miss) and at least REPLAN_MIN_SCALE (halving, the old rule)
REPLAN_MARGIN = 0.9
REPLAN_MAX_SCALE = 0.9
REPLAN_MIN_SCALE = 0.5
#: re-plans before reduced precision is dropped: scaled to the miss, then half that
REPLANS = 2
#: a precision whose second re-plan is this one at the pair's own budget rather than itself at half the budget.
#: int4 plans its linears over an int8 weight-only base while that base alone holds the budget; at half of int4's
#: budget it no longer does and the search runs over fp32: on the benchmark Llama (AMD EPYC Zen 5, 2026-12-08) such a
#: re-plan kept 13% of the decode weights in fp32 for 4% in int4 and decoded at 1.55 ms/step against 0.94 for
#: int8 weight-only alone (ahead of time). The pair missed because of int4's share, so that share goes first.
REPLAN_FALLBACK_PRECISION = {"int4": "int8wo"}


def replan_scale(check: StepCheck, budget: ErrorBudget, planned: Sequence[Numerics] = ()) -> float:
    """The factor a missed budget is tightened by for the re-plan: per metric (rel L2; top-1 as the share of
    positions that may flip) the pair missed, what the plan measured against what the pair measured, times
    :data:`REPLAN_MARGIN`; the worst of them, within [:data:`REPLAN_MIN_SCALE`, :data:`REPLAN_MAX_SCALE`].
    A plan that missed by a hair is re-planned a little tighter, not at half the budget (which keeps much more
    exact than needed).

    What the plan measured is ``planned`` (each approximate graph's own final check, the largest of them), at
    most the budget; without it, the budget. The search has to land that much lower than its plan for the pair to
    fit: scaled from the budget instead, a search that measured its plan well inside the budget is re-planned at a
    budget its plan already holds and builds the same plan again."""
    def scale(measured: float, allowed: float, searched: float | None) -> float:
        if measured <= allowed:  # not missed: this metric does not tighten the re-plan
            return 1.0
        return (min(searched, allowed) if searched else allowed) / measured * REPLAN_MARGIN

    ratios = [scale(check.rel_l2, budget.rel_l2, max((n.rel_l2 for n in planned), default=None))]
    if budget.top1 is not None:
        flips = [1.0 - n.top1 for n in planned if n.top1 is not None]
        ratios.append(scale(1.0 - check.top1, 1.0 - check.top1_floor(budget.top1), max(flips, default=None)))
    return max(REPLAN_MIN_SCALE, min(REPLAN_MAX_SCALE, min(ratios)))


def planned_numerics(graphs: GenerationGraphs) -> list[Numerics]:
    """What each approximate graph's own check measured of its plan (on the inputs it was verified on)."""
    return [r.report.final_numerics for r in (graphs.prefill, graphs.decode)
            if r.approximate and r.report.final_numerics is not None]


def scaled_budget(budget: ErrorBudget, scale: float) -> ErrorBudget:
    top1 = None if budget.top1 is None else 1.0 - (1.0 - budget.top1) * scale
    return dataclasses.replace(budget, rel_l2=budget.rel_l2 * scale, top1=top1)


def fall_back_within_budget(graphs: GenerationGraphs, rebuild: Callable[[dict[str, Any]], None],
                            check: Callable[[], StepCheck], options: dict[str, Any],
                            say: Callable[[str], None]) -> None:
    """Re-plan both graphs at a tighter budget (scaled to the miss, then half that; a precision in
    :data:`REPLAN_FALLBACK_PRECISION`: its fallback at the pair's budget instead of half), then build both exact,
    until the check passes. ``rebuild(options)`` replaces both graphs built with ``options``; ``check()`` is the
    pair's end-to-end check as built now."""
    budget = pair_budget(graphs)
    scale = 1.0
    for attempt in range(REPLANS):
        if budget is None or graphs.check.ok(budget):
            break
        missed = graphs.check.summary()
        fallback = REPLAN_FALLBACK_PRECISION.get(options.get("precision")) if attempt > 0 else None
        if fallback is not None:
            say(f"generation: re-planned in {fallback} (no {options['precision']})")
            rebuild({**options, "precision": fallback, "error_budget": budget})
            graphs.check = check()
            graphs.notes.append(f"the pair missed the budget ({missed}); both graphs re-planned with precision="
                                f"{fallback!r} at the pair's budget (rel_l2 {budget.rel_l2:.3g}{_top1(budget)}), "
                                f"{options['precision']} dropped: {graphs.check.summary()}")
            continue
        scale *= replan_scale(graphs.check, budget, planned_numerics(graphs)) if attempt == 0 else REPLAN_MIN_SCALE
        tighter = scaled_budget(budget, scale)
        say(f"generation: re-planned at {scale:.2f}x the error budget")
        rebuild({**options, "error_budget": tighter})
        graphs.check = check()
        graphs.notes.append(f"the pair missed the budget ({missed}); both graphs re-planned at rel_l2 "
                            f"{tighter.rel_l2:.3g}{_top1(tighter)}: {graphs.check.summary()}")
    if budget is not None and not graphs.check.ok(budget):
        exact = {k: v for k, v in options.items() if k not in ("precision", "error_budget")}
        say("generation: reduced precision dropped (over the budget end to end)")
        rebuild(exact)
        graphs.check = check()
        graphs.notes.append(f"reduced precision dropped: over the budget end to end; exact: {graphs.check.summary()}")
    for note in graphs.notes:
        log.warning("generation: %s", note)
    if not graphs.check.ok(pair_budget(graphs)):
        raise GenerationCheckError(graphs.check)


def _top1(budget: ErrorBudget) -> str:
    return f", top-1 {budget.top1:.3g}" if budget.top1 is not None else ""


class GenerationCheckError(BadInput, RuntimeError):
    """The optimized prefill/decode pair does not reproduce the eager model's teacher-forced logits."""

    def __init__(self, check: StepCheck) -> None:
        self.check = check
        super().__init__(f"the optimized generation graphs miss the eager model: {check.summary()}; "
                         "run with passes=[] to find the pass, and report it")
