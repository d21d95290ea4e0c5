"""Reduced precision within an error budget, chosen by measured speed.

Option ``precision``:

``"bf16"`` / ``"fp16"``
    matmul/linear/conv/attention(x, W)  -> the same op in bf16/fp16 (W cast once);
    views, activations, bias and mask adds between them follow in low precision;
    softmax, norms, reductions, exp/log (and the residual stream, option
    ``precision_keep_residual_fp32``) stay fp32 islands, with casts at their borders;
    cast(cast(x_low, fp32), low)        -> x_low;
    fp16 linear whose input or output range exceeds fp16
                                        -> linear(x / s) in fp16, * s in fp32 (per-tensor scale).
``"int8"``
    linear(x, W, b) / addmm / matmul(x, W)
                                        -> graphopt.int8_linear(x, W_int8, per-channel scales, b, scheme)
    linear(x, W, b) whose input has a large shared component (calibrated mean mu)
                                        -> graphopt.int8_linear(x, W_int8, scales, b + W @ mu, scheme, mu)
    (per-token activation scales, 8-bit on x86 CPUs: oneDNN's u8 x s8 GEMM where its probe
    passes, else fbgemm's, 7-bit where fbgemm saturates; weights pair-safe where the kernel
    would saturate plain ones (no VNNI), option ``precision_int8_pair_safe``; ``torch._int_mm``
    on CUDA; weights packed now). Linears that share an input are merged first
    (merge_matmuls), so the shared activation is quantized once.
``"fp8"``
    linear(x, W, b) ...                 -> graphopt.fp8_linear(x, W_e4m3, per-row scales, b)  (``torch._scaled_mm``).
``"int8wo"`` (weight only: int8 weights, bf16 activations)
    linear(x, W, b) ...                 -> graphopt.int8_weight_only_linear(x, W_int8, bf16 scales per channel, b)
    (``torch._weight_int8pack_mm`` on CPUs; the fast path of decoding, where linears are matrix-vector
    products bound by weight bytes; on many rows it is slower than bf16 or fp32).
``"int4"`` (weight only: group-wise int4 weights, bf16 activations)
    linear(x, W, b) ...                 -> graphopt.int4_weight_only_linear(x, W_packed, scales_and_zeros, G, b)
    (G the largest of 128, 64, 32 dividing in_features; torch's int4 kernels, CPU and CUDA). Its
    default budget is ``INT4_BUDGET`` (rel_l2 5e-2, top-1 0.9; measured in docs/precision.md), not 1e-2.
    A linear the search keeps out of int4 gets int8 weight-only where the budget still holds
    (option ``precision_int4_fallback``, default ``"int8wo"``; ``"fp32"`` keeps it exact), so
    ``int4`` is never slower than the weights it could afford: 4-bit formats mix so too
    (llama.cpp's Q4_K_M keeps some tensors in 6 bits). When every linear in int8 weight-only
    holds the budget, the int4 search runs over that base (a linear kept out of int4 is in
    int8 weight-only in every trial), so int4 gets what int8 weight-only leaves of the budget;
    otherwise it runs over fp32 and a second bisection gives int8 weight-only where it fits.
``"auto"``
    per node, the precision measured fastest on the target among those it has
    (fp8, int8, int8wo, and bf16 only where the target computes bf16 natively; int4 only when
    the error budget the user gives is at least as loose as int4's own, ``admits_int4``); a
    conversion slower than fp32 is not made; a node the search takes out of its
    fastest precision gets the next fastest, more accurate one (int8 -> bf16)
    where the budget still holds; the whole plan is timed against fp32 and
    dropped if it is not faster.

Every mode then runs the error-budget search (:mod:`graphopt.precision.search`):
nodes are converted, the model is measured against ``ctx.error_budget`` (relative
L2 of the outputs, top-1 agreement when set) on the example and fresh inputs, and
when that is over, the nodes whose conversion alone costs the model the most
error (per second or FLOP it saves; first those that alone break the budget)
go back to fp32 until the budget holds. The pass has
``uses_error_budget``: the verification instrument holds it to that budget
(default ``ErrorBudget(rel_l2=1e-2)`` when none is given).

Declines (listed in the report with the reason, per node): islands ('softmax
island', 'norm island', ...); 'over budget: ...' (kept by the search); 'slower
on this target: ...' (auto, or ``precision_speed_check``); int8/fp8 on matmuls
without a constant weight; fp8 where ``torch._scaled_mm`` has no fp8 kernel
(CPU, CUDA below compute capability 8.9); int8wo/int4 where torch has no
kernel for the device (the dequantizing reference would be slower than
fp32, so it is not offered as a speed-up); int4 on linears whose
``in_features`` no group size divides; models that are not fp32; graphs
already converted (the pass is idempotent).
"""


from __future__ import annotations

from collections.abc import Callable

import torch.fx as fx

from graphopt import ir, meta
from graphopt.pass_infra import OptimizeContext, Option, Pass, PassResult
from graphopt.passes.precision.measurements import MODEL_MIN_SPEEDUP
from graphopt.passes.precision.run import (
    DEFAULT_BUDGET,
    MAX_MODEL_SENSITIVITY_NODES,
    MODES,
    RIVAL_TIE,
    SEARCH_MARGIN,
    WEIGHT_ONLY_MODES,
    PrecisionRun,
    default_budget,
    non_fp32_weights,
)
from graphopt.precision.search import describe_steps, search_kept
from graphopt.precision.speed import time_interleaved
from graphopt.precision.target import PrecisionTarget
from graphopt.report import Declined
from graphopt.verify import ErrorBudget, Numerics, Verifier

__all__ = ["ReducedPrecision"]


class ReducedPrecision(Pass):
    """Convert matmuls/convs/attention to bf16/fp16/int8/fp8 within the error budget."""

    name = "precision"
    summary = ("reduced precision (bf16/fp16/int8/fp8/int8wo/int4/auto) within the error budget, chosen by "
               "measured speed")
    uses_error_budget = True
    default_error_budget = DEFAULT_BUDGET
    options = {
        "precision": Option("'bf16', 'fp16', 'int8', 'fp8', 'int8wo' (int8 weights, bf16 activations), 'int4' "
                            "(group-wise int4 weights) or 'auto' (fastest measured on the target within the "
                            "budget)", str, None, MODES),
        "precision_keep_residual_fp32": Option("keep the residual stream in fp32 under bf16/fp16 (default true)",
                                               bool, True),
        "precision_speed_check": Option("convert only ops measured faster than fp32 (default: on for auto, off "
                                        "otherwise)", bool),
        "precision_int8_shift": Option("int8: subtract the calibrated mean of inputs with a large shared "
                                       "component (default true)", bool, True),
        "precision_int8_pair_safe": Option("int8: quantize weights pair-safe, so the graph runs exactly on x86 "
                                           "kernels without VNNI (default: only where this machine's kernel "
                                           "needs it)", bool),
        "precision_int4_fallback": Option("int4: what a linear the budget keeps out of int4 becomes: 'int8wo' "
                                          "(int8 weight-only where the budget still holds; default) or 'fp32'",
                                          str, "int8wo", ("int8wo", "fp32")),
        "precision_timing": Option("how auto times a node's precisions: 'isolated' (the op alone on its recorded "
                                   "inputs; default) or 'model' (the whole graph, each group of same-shape nodes "
                                   "converted, largest first, against the graph with the decisions so far: for "
                                   "small graphs whose weights stream from memory, such as a decode step)", str, "isolated", ("isolated", "model")),
        "precision_timing_inputs": Option("(args, kwargs) the whole graph is timed on, where the example is not "
                                          "the case that matters (default: the example inputs; a decode step "
                                          "exported at two rows is timed at one)", tuple, None,
                                          check=lambda v: None if len(v) == 2 and isinstance(v[1], dict)
                                          else "give (args, kwargs)"),
        "precision_sensitivity": Option("how the search ranks nodes when the full plan is over budget: 'model' "
                                        "(whole-model error of each node converted alone; default) or 'local' "
                                        "(own error)", str, "model", ("model", "local")),
    }

    def __init__(self, precision: str | None = None, target: PrecisionTarget | None = None,
                 timer: Callable[..., dict[str, float]] | None = None) -> None:
        self.options["precision"].validate("precision", precision)
        self.precision = precision
        #: the budget without a user's one depends on the mode (int4 has its own); set again once call() knows it
        self.default_error_budget = default_budget(precision)  # type: ignore[misc]
        self.target = target
        self.timer = timer or time_interleaved

    # ------------------------------------------------------------------ driver
    def call(self, gm: fx.GraphModule, ctx: OptimizeContext) -> PassResult:
        mode = self.precision or self.option(ctx, "precision")
        if mode is None:
            return PassResult(gm, False, ["no precision requested (precision=...)"])
        self.default_error_budget = default_budget(mode)  # type: ignore[misc]  # read by ctx.budget_for(self)
        target = self.target or PrecisionTarget.detect(ctx.device, probes=ctx.target.probes)
        refused = _refusal(gm, mode, target)
        if refused is not None:
            return refused
        budget_note = _budget_note(ctx, ctx.budget_for(self))
        speed_check = bool(ctx.option("precision_speed_check", mode == "auto"))
        keep_residual = bool(self.option(ctx, "precision_keep_residual_fp32"))

        run = PrecisionRun(self.timer, gm, ctx, target, mode, keep_residual)
        declined = run.find_candidates()
        if not run.options:
            return PassResult(gm, False, [budget_note, "no candidate nodes"], declined)
        verifier = ctx.verifier or Verifier(ir.copy_graph_module(gm), ctx.args, ctx.kwargs, gm)
        _measure(self, run, ctx, verifier, speed_check)
        plan = {n: p for n, p in run.choice.items() if p != "fp32"}
        if not plan:
            return PassResult(gm, False, [budget_note, f"target: {target.describe()}"] + run.notes,
                              declined + run.declined_nodes(), report_data=run.report_data())
        final_plan, search_notes = _search(self, run, ctx, plan, verifier, speed_check)
        if not final_plan:
            return PassResult(gm, False, [budget_note, f"target: {target.describe()}"] + run.notes
                              + ["every conversion broke the error budget"], declined + run.declined_nodes())
        out = run.build(final_plan, final=True)
        notes = [budget_note, f"target: {target.describe()}"] + run.notes + search_notes
        if mode == "auto" or speed_check:
            ctx.step("timing the whole plan against fp32")
            verdict = run.whole_graph_speed(out)
            if verdict is not None:
                for name in final_plan:
                    run.keep(name, f"{verdict} (alone: {run.reasons.get(name, '')})")
                return PassResult(gm, False, notes + [verdict], declined + [Declined("graph", verdict)],
                                  report_data=run.report_data())
            notes.append(run.speed_note)
        notes += _plan_notes(run)
        if mode == "auto":
            rival = _faster_rival(self, gm, ctx, run, out, final_plan, notes)
            if rival is not None:
                return rival
        involved = [n.name for n in out.graph.nodes if n.meta.get(meta.PRECISION) not in (None, "fp32")]
        return PassResult(out, True, notes, declined + run.declined_nodes(), involved,
                          report_data=run.report_data())


def _faster_rival(pass_: ReducedPrecision, gm: fx.GraphModule, ctx: OptimizeContext, run: PrecisionRun,
                  out: fx.GraphModule, plan: dict[str, str], notes: list[str]) -> PassResult | None:
    """auto: the result of a precision run alone (the pass with ``precision=p``, the same budget and search) that
    is faster end to end than auto's per-node plan ``out``, or None to keep that plan (its notes gain the rivals'
    figures). The rivals are :meth:`PrecisionRun.rivals`: where the per-node choice of the fastest took a less
    accurate format, a more accurate one alone may fit more nodes within the budget and be faster as a whole."""
    results: dict[str, PassResult] = {}
    rival_notes: list[str] = []
    rivals = run.rivals(plan)
    rival_notes += run.rivals_skipped
    for p, at in rivals.items():
        ctx.step(f"auto: precision={p!r} alone, a rival of the per-node plan")
        rival_notes.append(f"rival precision={p!r} alone: more accurate than the per-node choice and timed within "
                           f"{RIVAL_TIE:g}x of it at {len(at)} node(s) ({', '.join(at[:4])}"
                           f"{', ...' if len(at) > 4 else ''})")
        result = ReducedPrecision(p, target=run.target, timer=pass_.timer).call(gm, ctx)
        if result.modified:
            results[p] = result
        else:
            rival_notes.append(f"rival precision={p!r} alone: nothing converted")
    notes += rival_notes
    if not results:
        return None
    ctx.step("auto: timing the per-node plan against its rivals")
    seconds = run.time_rivals(out, {p: r.module for p, r in results.items()})
    best = min(results, key=seconds.__getitem__)
    times = ", ".join(f"{k} {t * 1e3:.3f} ms" for k, t in seconds.items())
    if seconds["auto"] < seconds[best] * MODEL_MIN_SPEEDUP:
        notes.append(f"rivals alone, end to end: {times} (the per-node plan as 'auto'): the per-node plan kept")
        return None
    taken = results[best]
    why = (f"auto took precision={best!r} alone: {seconds['auto'] / seconds[best]:.2f}x faster end to end than "
           f"its per-node plan ({_precision_counts(run)}; {times}, the per-node plan as 'auto')")
    entries = [{**e, "reason": f"{why}; {e['reason']}"} for e in taken.report_data.get("precision", [])]
    return PassResult(taken.module, True, [why] + rival_notes + taken.notes, taken.declined, taken.nodes_involved,
                      report_data={**taken.report_data, "precision": entries})


def _refusal(gm: fx.GraphModule, mode: str, target: PrecisionTarget) -> PassResult | None:
    """The result when the pass has nothing to do on ``gm`` (already converted, not fp32, no fp8 kernel)."""
    if any(meta.PRECISION in n.meta for n in gm.graph.nodes):
        return PassResult(gm, False, ["graph already has a precision plan; nothing to do"])
    not_fp32 = non_fp32_weights(gm)
    if not_fp32:
        return PassResult(gm, False, declined=[Declined("graph", f"model is not fp32 ({not_fp32}); "
                                                        "reduced precision starts from an fp32 model")])
    if mode == "fp8" and not target.fp8:
        return PassResult(gm, False, declined=[Declined("graph", target.fp8_unsupported_reason())])
    if mode in WEIGHT_ONLY_MODES and mode not in target.weight_only:
        return PassResult(gm, False, declined=[Declined("graph", target.weight_only_unsupported_reason(mode))])
    return None


def _budget_note(ctx: OptimizeContext, budget: ErrorBudget) -> str:
    """The note that says which budget holds (the pass's default when none is given)."""
    if ctx.error_budget is None:
        return f"no error_budget given: using rel_l2 <= {budget.rel_l2:g}"
    return f"error budget: rel_l2 <= {budget.rel_l2:g}" + (
        f", top-1 >= {budget.top1:g}" if budget.top1 is not None else "")


def _measure(pass_: ReducedPrecision, run: PrecisionRun, ctx: OptimizeContext, verifier: Verifier,
             speed_check: bool) -> None:
    """Calibrate, choose int8 input shifts, measure each candidate's error and (speed check) its timings."""
    ctx.step(f"calibrating {len(run.options)} candidate nodes")
    run.calibrate([ir.flat_inputs(a, kw, run.gm) for a, kw in verifier.input_sets])
    if pass_.option(ctx, "precision_int8_shift"):
        run.choose_shifts()
    ctx.step("measuring each candidate's own error")
    run.measure_local_errors()
    if speed_check:
        ctx.step(f"timing {len(run.options)} candidate nodes in each precision")
        run.measure_speed()
    else:
        run.choose_requested()


def _search(pass_: ReducedPrecision, run: PrecisionRun, ctx: OptimizeContext, plan: dict[str, str],
            verifier: Verifier, speed_check: bool) -> tuple[dict[str, str], list[str]]:
    """The error-budget search: ``(plan without the nodes it kept in fp32, notes)``."""
    budget = ctx.budget_for(pass_)
    search_budget = ErrorBudget(budget.rel_l2 * SEARCH_MARGIN, budget.top1)
    base, base_note = _int4_base(run, plan, verifier, search_budget)
    kept_in = "int8 weight-only" if base else "fp32"

    def measure(kept: set[str]) -> Numerics:
        ctx.step(f"error search: checking the plan with {len(kept)} of {len(plan)} nodes kept in {kept_in}")
        trial = run.build({n: base[n] if n in kept else p for n, p in plan.items() if n not in kept or n in base})
        return verifier.check(trial, search_budget)

    by_model = (pass_.option(ctx, "precision_sensitivity") == "model"
                and len(plan) <= MAX_MODEL_SENSITIVITY_NODES)

    def order() -> list[str]:
        if by_model:
            run.model_errors = run.model_sensitivity(plan, verifier)
            return run.ranked(plan, run.model_errors, search_budget.rel_l2)
        # own errors: no whole-model measurement says which node alone breaks the budget
        return run.ranked(plan, {n: run.local_error(n, plan[n]) for n in plan}, None)

    kept, steps = search_kept(order, measure)
    failing = [s for s in steps if not s.numerics.ok]
    worst = max(failing, key=lambda s: s.kept) if failing else None
    fallback_note = ""
    if base:  # the kept linears were int8 weight-only in every trial: they stay so, no second bisection
        kept, fallback_note = run.keep_in_base(kept, plan, base, worst)
    elif kept and (speed_check or run.mode == "int4"):
        kept, fallback_note = run.fall_back(kept, plan, verifier, search_budget)
    for name in kept:
        why = (f"over budget: with the {worst.kept} most error-costly nodes kept, converting the rest gave "
               f"{worst.numerics.summary()} (budget rel_l2 {budget.rel_l2:g}, searched at "
               f"{search_budget.rel_l2:.2g})") if worst else "over budget"
        alone = (f"model rel_l2 {run.model_errors[name]:.2e} with it alone in {plan[name]}, "
                 if name in run.model_errors else "")
        run.keep(name, f"{why}; {alone}its own error in {plan[name]}: "
                       f"rel_l2 {run.local_error(name, plan[name]):.2e}")
    notes = [f"search: {len(steps)} whole-model checks" + (
             f" (ranked by {len(run.model_errors)} single-node whole-model runs)" if run.model_errors else "")
             + ", " + describe_steps(steps)]
    notes += [n for n in (base_note, fallback_note) if n]
    return {n: p for n, p in plan.items() if n not in kept}, notes


def _int4_base(run: PrecisionRun, plan: dict[str, str], verifier: Verifier,
               budget: ErrorBudget) -> tuple[dict[str, str], str]:
    """What an int4 search keeps the linears it takes out of int4 in: int8 weight-only where the plan falls back to
    it (``precision_int4_fallback``) and every such linear in int8 weight-only holds ``budget``, so int4 is
    searched for within what int8 weight-only leaves of the budget; ``{}`` (fp32) otherwise. Returns the base and
    a note."""
    base = run.int4_fallback_base(plan)
    if not base:
        return {}, ""
    numerics = verifier.check(run.build(base), budget)
    if not numerics.ok:
        return {}, (f"int4 searched over fp32: every linear in int8 weight-only is over budget "
                    f"({numerics.summary()})")
    return base, ""


def _precision_counts(run: PrecisionRun) -> str:
    """How many candidate nodes the run's choices put in each precision (``"fp32: 4, int8wo: 13"``)."""
    counts: dict[str, int] = {}
    for p in run.choice.values():
        counts[p] = counts.get(p, 0) + 1
    return ", ".join(f"{p}: {c}" for p, c in sorted(counts.items()))


def _plan_notes(run: PrecisionRun) -> list[str]:
    """The report lines of an adopted plan: counts per precision, then each converted node and why."""
    notes = [f"precision per candidate node: {_precision_counts(run)}"]
    return notes + [f"{e.node} ({e.module or 'top'}): {e.precision}: {e.reason}" for e in run.entries()
                    if e.precision != "fp32"]
