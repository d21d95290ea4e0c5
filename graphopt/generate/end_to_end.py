"""Whether the optimized prefill/decode pair meets its error budget end to end, and what the build does when not.

* :class:`StepCheck` -- the pair's teacher-forced logits against the eager model (``check_steps`` in
  :mod:`graphopt.generate.build` measures it);
* :func:`pair_budget` -- the budget the pair is held to (the first plan's);
* :func:`fall_back_within_budget` -- re-plan both graphs at a budget tightened by the miss
  (:func:`replan_scale`), then at half that, then build them exact;
* :func:`precision_not_applied` -- a note for each graph that asked for reduced precision and runs fp32.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from graphopt.errors import BadInput
from graphopt.generate.cache_check import exact_rel_l2
from graphopt.verify import ErrorBudget

if TYPE_CHECKING:
    from graphopt.generate.build import GenerationGraphs

log = logging.getLogger(__name__)


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
        """Within ``budget`` (reduced precision), or as exact as the model's dtype allows (``None``:
        :func:`~graphopt.generate.cache_check.exact_rel_l2`)."""
        limit = budget.rel_l2 if budget is not None else exact_rel_l2(self.dtype)
        return self.rel_l2 <= limit and (budget is None or budget.top1 is None or self.top1 >= budget.top1)

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


def replan_scale(check: StepCheck, budget: ErrorBudget) -> float:
    """The factor a missed budget is tightened by for the re-plan: what the pair measured against what the
    budget allows, per metric (rel L2; top-1 as the share of positions that may flip), the worst of them times
    :data:`REPLAN_MARGIN`, within [:data:`REPLAN_MIN_SCALE`, :data:`REPLAN_MAX_SCALE`]. A plan that missed by a
    hair is re-planned a little tighter, not at half the budget (which keeps much more exact than needed)."""
    ratios = [budget.rel_l2 / check.rel_l2 if check.rel_l2 > 0 else 1.0]
    if budget.top1 is not None and check.top1 < 1.0:
        ratios.append((1.0 - budget.top1) / (1.0 - check.top1))
    return max(REPLAN_MIN_SCALE, min(REPLAN_MAX_SCALE, REPLAN_MARGIN * min(ratios)))


def scaled_budget(budget: ErrorBudget, scale: float) -> ErrorBudget:
    top1 = None if budget.top1 is None else 1.0 - (1.0 - budget.top1) * scale
    return dataclasses.replace(budget, rel_l2=budget.rel_l2 * scale, top1=top1)


def fall_back_within_budget(graphs: GenerationGraphs, rebuild: Callable[[dict[str, Any]], None],
                            check: Callable[[], StepCheck], options: dict[str, Any],
                            say: Callable[[str], None]) -> None:
    """Re-plan both graphs at a tighter budget (scaled to the miss, then half that), then build both exact,
    until the check passes. ``rebuild(options)`` replaces both graphs built with ``options``; ``check()`` is the
    pair's end-to-end check as built now."""
    budget = pair_budget(graphs)
    scale = 1.0
    for attempt in range(REPLANS):
        if budget is None or graphs.check.ok(budget):
            break
        missed = graphs.check.summary()
        scale *= replan_scale(graphs.check, budget) if attempt == 0 else REPLAN_MIN_SCALE
        tighter = scaled_budget(budget, scale)
        top1 = f", top-1 {tighter.top1:.3g}" if tighter.top1 is not None else ""
        say(f"generation: re-planned at {scale:.2f}x the error budget")
        replan = {**options, "error_budget": tighter}
        rebuild(replan)
        graphs.check = check()
        graphs.notes.append(f"the pair missed the budget ({missed}); both graphs re-planned at rel_l2 "
                            f"{tighter.rel_l2:.3g}{top1}: {graphs.check.summary()}")
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


class GenerationCheckError(BadInput, RuntimeError):
    """The optimized prefill/decode pair does not reproduce the eager model's teacher-forced logits."""

    def __init__(self, check: StepCheck) -> None:
        self.check = check
        super().__init__(f"the optimized generation graphs miss the eager model: {check.summary()}; "
                         "run with passes=[] to find the pass, and report it")
