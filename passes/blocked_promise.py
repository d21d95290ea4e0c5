"""The blocked pass's promise: a plan is returned only when its measured peak is inside the budget.

The planner sizes blocks on a liveness prediction (live tensors, plus each
blocked operator's working memory). What a call really takes can be more:
kernels' own temporaries, the allocator's rounding and caching. So with a
budget, the pass measures the planned graph on the example inputs
(:func:`graphopt.target.measure_peak`, source chosen by the
``measure_memory`` option: ``"allocator"``, torch's allocation events;
``"rss"``, this process' peak resident set; ``"subprocess"``, the peak
resident set of a fresh process that loads the planned graph as a saved
program, :mod:`graphopt.target.fresh_process_peak`) and, while the measured peak is
over the budget, plans again for a budget scaled down by measured/budget
(at most :data:`MAX_TIGHTENINGS` times). A plan still over the budget is not
returned: :class:`MeasuredOverBudget` (a :class:`BudgetError`) names the
budget, the smallest peak measured and what to do. The report keeps each
step: predicted peak, planned target, measured peak.

Block buffers reused across blocks (workspaces written with ``out=``),
which remove slack at its source instead of planning around it, exist for
the chunked FFN (:mod:`graphopt.ops.chunked_ffn`); blocked attention and the
LM head still allocate per block.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from graphopt.errors import BadInput
from graphopt.target import MeasuredPeak, measure_peak
from graphopt.target.fresh_process_peak import measure_peak_in_fresh_process
from graphopt.tensor_sizes import readable_bytes

log = logging.getLogger(__name__)

__all__ = ["BUDGET_MARGIN", "BudgetError", "MeasuredOverBudget", "MAX_TIGHTENINGS", "MEASURE_SOURCES", "PromiseCheck",
           "keep_promise"]

#: how many times a plan over its budget (as measured) is re-planned tighter before the pass gives up
MAX_TIGHTENINGS = 3
#: what ``measure_memory`` may name (see :func:`graphopt.target.measure_peak`)
MEASURE_SOURCES = ("allocator", "rss", "subprocess")
#: plan to this fraction of the budget: the allocator and kernels' own temporaries need room
BUDGET_MARGIN = 0.9
#: a re-plan aims this far under the measured shortfall (room for the measurement's own noise)
_TIGHTEN_MARGIN = 0.95


class BudgetError(BadInput, ValueError):
    """No blocking plan brings the predicted peak under the memory budget.

    ``budget`` and ``reachable`` (the smallest predicted peak any plan
    reaches) are in bytes; ``peak_node`` is where that peak is. The pass
    manager lets this error through (``abort_pipeline``) instead of rolling
    the pass back, so ``optimize()`` raises it.
    """

    def __init__(self, budget: int, reachable: int, peak_node: str, live: list[tuple[str, int]]) -> None:
        self.budget, self.reachable, self.peak_node, self.live = budget, reachable, peak_node, live
        top = ", ".join(f"{name} {readable_bytes(b)}" for name, b in live[:4])
        super().__init__(
            f"memory budget {readable_bytes(budget)} cannot be met: the smallest peak reachable by blocking is "
            f"{readable_bytes(reachable)} (at node {peak_node}; live there: {top}). Raise the budget to at least "
            f"{readable_bytes(reachable / BUDGET_MARGIN)}, or reduce the batch or sequence length."
        )


class MeasuredOverBudget(BudgetError):
    """Every plan tried fits the budget as predicted, but its measured peak does not."""

    def __init__(self, budget: int, measured: int, predicted: int, method: str) -> None:
        self.budget, self.reachable, self.peak_node, self.live = budget, measured, "-", []
        self.measured, self.predicted, self.method = measured, predicted, method
        BadInput.__init__(
            self,
            f"memory budget {readable_bytes(budget)} is not met as measured: the tightest plan tried peaks at "
            f"{readable_bytes(measured)} ({method}; {readable_bytes(predicted)} predicted). Raise the budget to at "
            f"least {readable_bytes(measured)}, "
            "or reduce the batch or sequence length.")


@dataclass
class PromiseCheck:
    """What the check measured: one row per plan tried, and the figures for the report."""

    before: int | None = None
    method: str = ""
    #: (planned target bytes, predicted peak, measured peak) for each plan tried, in order
    trials: list[tuple[int, int, int | None]] = field(default_factory=list)

    def notes(self) -> list[str]:
        out = []
        for i, (target, predicted, measured) in enumerate(self.trials):
            label = "measured peak" if i == 0 else f"re-planned for {readable_bytes(target)}: measured peak"
            shown = readable_bytes(measured) if measured is not None else "not measurable"
            out.append(f"{label}: {readable_bytes(self.before or 0)} -> {shown} ({self.method}; "
                       f"predicted {readable_bytes(predicted)})")
        return out

    def summary(self) -> dict[str, Any]:
        last = self.trials[-1] if self.trials else (0, 0, None)
        return {"measured_peak_before": self.before, "measured_peak_after": last[2], "measure_method": self.method,
                "planned_target_after": last[0], "tightenings": max(len(self.trials) - 1, 0)}


def _measure(module: fx.GraphModule, args: tuple, kwargs: dict, source: str) -> MeasuredPeak:
    if source == "subprocess":
        return measure_peak_in_fresh_process(module, args, kwargs)
    return measure_peak(module, args, kwargs, source=source)


def keep_promise(eager: fx.GraphModule, plan: Any, budget: int | None, args: tuple, kwargs: dict,
                 replan: Callable[[int], Any], source: str = "allocator") -> tuple[Any, PromiseCheck]:
    """Measure ``plan`` (or ``eager`` when it blocks nothing) and re-plan tighter while over ``budget``.

    ``plan`` has ``.module`` (None: nothing blocked) and ``.profile.peak_bytes``;
    ``replan(target_bytes)`` returns a new plan for a smaller planning budget
    (it may raise :class:`BudgetError`). Returns the plan kept and what was
    measured; raises :class:`MeasuredOverBudget` when no plan tried measures
    inside the budget. Without a budget, measures once and returns ``plan``.
    """
    check = PromiseCheck()
    eager.recompile()  # the planner functionalized in-place ops of the graph
    first = _measure(eager, args, kwargs, source)
    check.before, check.method = first.bytes, first.method
    planning = budget
    for attempt in range(MAX_TIGHTENINGS + 1):
        module = plan.module if plan.module is not None else eager
        module.recompile()
        measured = first if plan.module is None else _measure(module, args, kwargs, source)
        predicted = plan.profile.peak_bytes if plan.profile is not None else 0
        check.trials.append((planning or 0, predicted, measured.bytes))
        if budget is None or measured.bytes is None or measured.bytes <= budget:
            return plan, check
        if attempt == MAX_TIGHTENINGS:
            break
        planning = int((planning or budget) * budget / measured.bytes * _TIGHTEN_MARGIN)
        log.info("blocked: measured %s over the budget %s (predicted %s); re-planning for %s",
                 readable_bytes(measured.bytes), readable_bytes(budget), readable_bytes(predicted),
                 readable_bytes(planning))
        try:
            plan = replan(planning)
        except BudgetError:  # no tighter plan exists: the measured figure is what is reachable
            break
    last = check.trials[-1]
    raise MeasuredOverBudget(budget, min(t[2] for t in check.trials if t[2] is not None), last[1], check.method)
