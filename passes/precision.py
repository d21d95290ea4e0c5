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
``"auto"``
    per node, the precision measured fastest on the target among those it has
    (fp8, int8, and bf16 only where the target computes bf16 natively); a
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
(CPU, CUDA below compute capability 8.9); models that are not fp32; graphs
already converted (the pass is idempotent).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from graphopt import ir
from graphopt.cost import node_cost
from graphopt.pass_infra import OptimizeContext, Pass, PassResult
from graphopt.ir import constant_nodes
from graphopt.precision.calibrate import Calibration, calibrate
from graphopt.precision.lower_float import lower_float
from graphopt.precision.ops_classes import COMPUTE_OPS, FLOAT_DTYPES, island_reason
from graphopt.precision.quantize import LinearSite, QuantizedWeights, input_shift, linear_sites, replace_site
from graphopt.precision.replay import SuffixReplay, recorded_bytes, writes_in_place
from graphopt.precision.search import describe_steps, relative_l2, search_kept
from graphopt.precision.speed import choose_precision, time_interleaved
from graphopt.precision.target import PrecisionTarget
from graphopt.report import Declined
from graphopt.verify import ErrorBudget, Numerics, Verifier, compare_outputs

log = logging.getLogger(__name__)

MODES = ("bf16", "fp16", "int8", "fp8", "auto")
DEFAULT_BUDGET = ErrorBudget(rel_l2=1e-2)
#: the search aims this fraction of the budget, so fresh inputs have some room
SEARCH_MARGIN = 0.8
#: auto converts a node only when it is at least this much faster (timings on a busy machine are noisy)
AUTO_MIN_SPEEDUP = 1.05
#: above this many converted nodes the search ranks by each node's own error instead of whole-model runs
MAX_MODEL_SENSITIVITY_NODES = 256
#: single-node runs replay the graph from the node on while its recorded values fit in this much memory
REPLAY_MAX_BYTES = 2 << 30


@dataclass
class NodePlan:
    """One candidate node's precision and why (also written to ``report.extra['precision']``)."""

    node: str
    module: str
    op: str
    precision: str
    reason: str
    local_rel_l2: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class ReducedPrecision(Pass):
    """Convert matmuls/convs/attention to bf16/fp16/int8/fp8 within the error budget."""

    name = "precision"
    summary = "reduced precision (bf16/fp16/int8/fp8/auto) within the error budget, chosen by measured speed"
    uses_error_budget = True
    options = {
        "precision": "'bf16', 'fp16', 'int8', 'fp8' or 'auto' (fastest measured on the target within the budget)",
        "precision_keep_residual_fp32": "keep the residual stream in fp32 under bf16/fp16 (default true)",
        "precision_speed_check": "convert only ops measured faster than fp32 (default: on for auto, off otherwise)",
        "precision_int8_shift": "int8: subtract the calibrated mean of inputs with a large shared component "
                                "(default true)",
        "precision_int8_pair_safe": "int8: quantize weights pair-safe, so the graph runs exactly on x86 kernels "
                                    "without VNNI (default: only where this machine's kernel needs it)",
        "precision_sensitivity": "how the search ranks nodes when the full plan is over budget: 'model' "
                                 "(whole-model error of each node converted alone; default) or 'local' (own error)",
    }

    def __init__(self, precision: str | None = None, target: PrecisionTarget | None = None,
                 timer: Callable[..., dict[str, float]] | None = None) -> None:
        if precision is not None and precision not in MODES:
            raise ValueError(f"precision={precision!r}: choose one of {MODES}")
        self.precision = precision
        self.target = target
        self.timer = timer or time_interleaved

    # ------------------------------------------------------------------ driver
    def call(self, gm: fx.GraphModule, ctx: OptimizeContext) -> PassResult:
        mode = self.precision or ctx.option("precision")
        if mode is None:
            return PassResult(gm, False, ["no precision requested (precision=...)"])
        if mode not in MODES:
            raise ValueError(f"precision={mode!r}: choose one of {MODES}")
        target = self.target or PrecisionTarget.detect(ctx.device, probes=ctx.target.probes)
        if any("graphopt_precision" in n.meta for n in gm.graph.nodes):
            return PassResult(gm, False, ["graph already has a precision plan; nothing to do"])
        not_fp32 = _non_fp32_weights(gm)
        if not_fp32:
            return PassResult(gm, False, declined=[Declined("graph", f"model is not fp32 ({not_fp32}); "
                                                            "reduced precision starts from an fp32 model")])
        if mode == "fp8" and not target.fp8:
            return PassResult(gm, False, declined=[Declined("graph", target.fp8_unsupported_reason())])
        if ctx.error_budget is None:
            ctx.error_budget = DEFAULT_BUDGET
            budget_note = f"no error_budget given: using rel_l2 <= {DEFAULT_BUDGET.rel_l2:g}"
        else:
            budget_note = f"error budget: rel_l2 <= {ctx.error_budget.rel_l2:g}" + (
                f", top-1 >= {ctx.error_budget.top1:g}" if ctx.error_budget.top1 is not None else "")
        budget = ctx.error_budget
        speed_check = bool(ctx.option("precision_speed_check", mode == "auto"))
        keep_residual = bool(ctx.option("precision_keep_residual_fp32", True))

        run = _Run(self, gm, ctx, target, mode, keep_residual)
        declined = run.find_candidates()
        if not run.options:
            return PassResult(gm, False, [budget_note, "no candidate nodes"], declined)
        verifier = ctx.verifier or Verifier(ir.copy_graph_module(gm), ctx.args, ctx.kwargs, gm)
        ctx.step(f"calibrating {len(run.options)} candidate nodes")
        run.calibrate([ir.flat_inputs(a, kw, gm) for a, kw in verifier.input_sets])
        if ctx.option("precision_int8_shift", True):
            run.choose_shifts()
        ctx.step("measuring each candidate's own error")
        run.measure_local_errors()
        if speed_check:
            ctx.step(f"timing {len(run.options)} candidate nodes in each precision")
            run.measure_speed()
        else:
            run.choose_requested()
        plan = {n: p for n, p in run.choice.items() if p != "fp32"}
        if not plan:
            ctx.report.extra["precision"] = [e.to_dict() for e in run.entries()]
            return PassResult(gm, False, [budget_note, f"target: {target.describe()}"],
                              declined + run.declined_nodes())

        search_budget = ErrorBudget(budget.rel_l2 * SEARCH_MARGIN, budget.top1)

        def measure(kept: set[str]) -> Numerics:
            ctx.step(f"error search: checking the plan with {len(kept)} of {len(plan)} nodes kept in fp32")
            trial = run.build({n: p for n, p in plan.items() if n not in kept})
            return verifier.check(trial, search_budget)

        by_model = (ctx.option("precision_sensitivity", "model") == "model"
                    and len(plan) <= MAX_MODEL_SENSITIVITY_NODES)

        def order() -> list[str]:
            if by_model:
                run.model_errors = run.model_sensitivity(plan, verifier)
                return run.ranked(plan, run.model_errors, search_budget.rel_l2)
            # own errors: no whole-model measurement says which node alone breaks the budget
            return run.ranked(plan, {n: run.local_error(n, plan[n]) for n in plan}, None)

        kept, steps = search_kept(order, measure)
        failing = [s for s in steps if not s.numerics.ok]
        fallback_note = ""
        if speed_check and kept:
            kept, fallback_note = run.fall_back(kept, plan, verifier, search_budget)
        for name in kept:
            worst = max(failing, key=lambda s: s.kept) if failing else None
            why = (f"over budget: with the {worst.kept} most error-costly nodes kept, converting the rest gave "
                   f"{worst.numerics.summary()} (budget rel_l2 {budget.rel_l2:g}, searched at "
                   f"{search_budget.rel_l2:.2g})") if worst else "over budget"
            alone = (f"model rel_l2 {run.model_errors[name]:.2e} with it alone in {plan[name]}, "
                     if name in run.model_errors else "")
            run.keep(name, f"{why}; {alone}its own error in {plan[name]}: "
                           f"rel_l2 {run.local_error(name, plan[name]):.2e}")
        final_plan = {n: p for n, p in plan.items() if n not in kept}
        if not final_plan:
            return PassResult(gm, False, [budget_note, f"target: {target.describe()}"] + run.notes
                              + ["every conversion broke the error budget"], declined + run.declined_nodes())
        out = run.build(final_plan, final=True)
        notes = [budget_note, f"target: {target.describe()}"] + run.notes + [
                 f"search: {len(steps)} whole-model checks" + (
                     f" (ranked by {len(run.model_errors)} single-node whole-model runs)" if run.model_errors else "")
                 + ", " + describe_steps(steps)]
        if fallback_note:
            notes.append(fallback_note)
        if mode == "auto" or speed_check:
            ctx.step("timing the whole plan against fp32")
            verdict = run.whole_graph_speed(out)
            if verdict is not None:
                for name in final_plan:
                    run.keep(name, f"{verdict} (alone: {run.reasons.get(name, '')})")
                ctx.report.extra["precision"] = [e.to_dict() for e in run.entries()]
                return PassResult(gm, False, notes + [verdict], declined + [Declined("graph", verdict)])
            notes.append(run.speed_note)
        counts: dict[str, int] = {}
        for p in run.choice.values():
            counts[p] = counts.get(p, 0) + 1
        notes.append("precision per candidate node: " + ", ".join(f"{p}: {c}" for p, c in sorted(counts.items())))
        notes += [f"{e.node} ({e.module or 'top'}): {e.precision}: {e.reason}" for e in run.entries()
                  if e.precision != "fp32"]
        ctx.report.extra["precision"] = [e.to_dict() for e in run.entries()]
        involved = [n.name for n in out.graph.nodes if n.meta.get("graphopt_precision") not in (None, "fp32")]
        return PassResult(out, True, notes, declined + run.declined_nodes(), involved)


def _non_fp32_weights(gm: fx.GraphModule) -> str:
    dtypes = {str(ir.tensor_meta(n).dtype) for n in gm.graph.nodes if n.op == "get_attr"
              and ir.tensor_meta(n) is not None and ir.tensor_meta(n).dtype.is_floating_point
              and ir.tensor_meta(n).dtype != torch.float32}
    return ", ".join(sorted(dtypes))


class _Run:
    """State of one pass run: candidates, measurements, choices."""

    def __init__(self, owner: ReducedPrecision, gm: fx.GraphModule, ctx: OptimizeContext,
                 target: PrecisionTarget, mode: str, keep_residual: bool) -> None:
        self.owner, self.gm, self.ctx, self.target, self.mode = owner, gm, ctx, target, mode
        self.keep_residual = keep_residual
        self.nodes = {n.name: n for n in gm.graph.nodes}
        self.options: dict[str, list[str]] = {}  # candidate node -> precisions to consider
        self.sites: dict[str, LinearSite] = {}
        pair_safe = ctx.option("precision_int8_pair_safe", None)
        if pair_safe is not None and not isinstance(pair_safe, bool):
            raise ValueError(f"precision_int8_pair_safe={pair_safe!r}: give True or False (or leave it out to let "
                             "the target's kernel decide)")
        self.weights = QuantizedWeights(target.int8_scheme,
                                        target.int8_pair_safe if pair_safe is None else pair_safe)
        self.choice: dict[str, str] = {}
        self.reasons: dict[str, str] = {}
        self.errors: dict[tuple[str, str], float] = {}
        self.timings: dict[str, dict[str, float]] = {}  # node -> seconds per precision (speed check)
        self.cal: Calibration | None = None
        self.model_errors: dict[str, float] = {}  # node -> model rel_l2 with it alone converted
        self.shift_gain: dict[str, float] = {}  # int8 node with an input shift -> its range narrowing
        self.notes: list[str] = []
        if mode in ("int8", "auto") and target.int8_scheme is not None:
            kind = "pair-safe (exact on x86 kernels without VNNI too)" if self.weights.pair_safe else \
                "plain per channel (the finer step)"
            source = ("as asked (precision_int8_pair_safe)" if pair_safe is not None
                      else "which this target's kernel needs" if self.weights.pair_safe
                      else "which this target's kernel runs exactly")
            self.notes.append(f"int8 weights: {kind}, {source}")
        self.speed_note = ""
        self._replay_tried = False  # the suffix replay is set up on first use (model_sensitivity)
        self._replay_cache: SuffixReplay | None = None
        self.float_dtype = FLOAT_DTYPES.get(mode, torch.bfloat16)

    # -- candidates
    def find_candidates(self) -> list[Declined]:
        declined: list[Declined] = []
        sites, why_not = linear_sites(self.gm)
        self.sites = sites
        auto = self.target.auto_candidates() if self.mode == "auto" else []
        quant = {"int8": self.mode == "int8" or "int8" in auto, "fp8": self.mode == "fp8" or "fp8" in auto}
        if self.mode == "auto" and "bf16" not in auto:
            self.notes.append(f"bf16 not considered: {self.target.no_native_float_reason('bf16')}")
        elif self.mode in FLOAT_DTYPES and self.mode not in self.target.native_floats:
            self.notes.append(f"{self.mode} as requested, but {self.target.no_native_float_reason(self.mode)}: "
                              "expect it to be slower than fp32 (precision='auto' converts only what is faster)")
        for node in self.gm.graph.nodes:
            if node.op != "call_function" or node.target not in COMPUTE_OPS:
                continue
            opts: list[str] = []
            if node.name in sites:
                opts += [p for p in ("fp8", "int8") if quant[p]]
            if self.mode in FLOAT_DTYPES or "bf16" in auto:
                opts.append("bf16" if self.mode == "auto" else self.mode)
            if opts:
                self.options[node.name] = opts
            else:
                reason = why_not.get(node.name, f"{self.mode} applies to linear layers only")
                if self.mode == "auto" and node.name not in sites:
                    reason = f"no constant weight and {self.target.no_native_float_reason('bf16')}" \
                        if "bf16" not in auto else reason
                self.keep(node.name, f"{self.mode} not applicable: {reason}")
        if self.mode in FLOAT_DTYPES:
            for node in self.gm.graph.nodes:
                reason = island_reason(node)
                if reason:
                    declined.append(Declined(node.name, f"kept fp32: {reason}"))
        return declined

    # -- measurements
    def calibrate(self, input_sets: list[list[Any]]) -> None:
        self.cal = calibrate(self.gm, input_sets, self.options)

    def choose_shifts(self) -> None:
        """int8 sites whose calibrated input has a large shared component get an input shift."""
        shifted = 0
        for name, opts in self.options.items():
            if "int8" not in opts or name not in self.cal.args:
                continue
            args, _ = self.cal.args[name]
            x = args[1] if self.nodes[name].target == torch.ops.aten.addmm.default else args[0]
            if not isinstance(x, torch.Tensor):
                continue
            mu, gain = input_shift(x)
            if mu is not None:
                self.weights.shifts[name] = mu
                self.shift_gain[name] = gain
                shifted += 1
        if shifted:
            self.notes.append(f"int8 input shift (calibrated channel means, W @ mu folded into the bias) on "
                              f"{shifted} of {sum('int8' in o for o in self.options.values())} linears")

    def model_sensitivity(self, plan: dict[str, str], verifier: Verifier) -> dict[str, float]:
        """Whole-model error with each node of ``plan`` converted alone, on the example inputs.

        int8/fp8 nodes are replayed (:class:`SuffixReplay`: only what depends on
        the node is recomputed); bf16/fp16 nodes, whose conversion also moves
        casts around them, get a rebuilt graph each.
        """
        (a, kw), ref = verifier.input_sets[0], verifier.references[0]
        replay = self._replay(a, kw) if any(p in ("int8", "fp8") for p in plan.values()) else None
        out: dict[str, float] = {}
        with torch.no_grad():
            for i, (name, p) in enumerate(plan.items()):
                self.ctx.step(f"error search: ranking, {name} alone in {p} ({i + 1} of {len(plan)})")
                try:
                    if replay is not None and p in ("int8", "fp8"):
                        got = replay.run(name, functools.partial(self._quantized_call, name, p))
                    else:
                        got = self.build({name: p})(*a, **kw)
                    errs = compare_outputs(ref, got, self.ctx.error_budget)
                    out[name] = max((e.rel_l2 for e in errs), default=0.0)
                except Exception as exc:  # noqa: BLE001 - a node that breaks the model ranks first
                    log.info("%s alone in %s failed: %s", name, p, exc)
                    out[name] = float("inf")
        return out

    def _replay(self, args: tuple, kwargs: dict) -> SuffixReplay | None:
        if not self._replay_tried:
            self._replay_tried = True
            writes = writes_in_place(self.gm)
            if recorded_bytes(self.gm) > REPLAY_MAX_BYTES:
                self.notes.append(f"single-node runs rebuild the graph: its values exceed "
                                  f"{REPLAY_MAX_BYTES / 2**30:.0f} GiB, too many to keep for a replay")
            elif writes:
                self.notes.append(f"single-node runs rebuild the graph: it writes values in place "
                                  f"({', '.join(writes[:3])}), which a replay cannot repeat")
            else:
                self._replay_cache = SuffixReplay(self.gm, ir.flat_inputs(args, kwargs, self.gm))
        return self._replay_cache

    def _quantized_call(self, name: str, precision: str, args: tuple, kwargs: dict) -> Any:
        """The int8/fp8 replacement of linear site ``name`` on concrete arguments of the original node."""
        node = self.nodes[name]
        addmm = node.target == torch.ops.aten.addmm.default
        x = args[1] if addmm else args[0]
        bias = (args[0] if addmm
                else (args[2] if len(args) > 2 else kwargs.get("bias")) if node.target == torch.ops.aten.linear.default
                else None)
        return self.weights.call(self.sites[name], precision, x, bias)

    def _isolated(self, name: str, precision: str) -> tuple[Callable[[], Any], Callable[[], Any]]:
        """(low-precision call, fp32 call) of one node on its recorded arguments."""
        node = self.nodes[name]
        args, kwargs = self.cal.args[name]
        ref = lambda: node.target(*args, **kwargs)  # noqa: E731
        if precision == "fp32":
            return ref, ref
        if precision in ("int8", "fp8"):
            self.weights.get(self.sites[name], precision)
            return (lambda: self._quantized_call(name, precision, args, kwargs)), ref
        dtype = FLOAT_DTYPES[precision]
        const = self._const
        graph_args = list(node.args) + list(node.kwargs.values())
        values = list(args) + list(kwargs.values())
        low_values = [v.to(dtype) if isinstance(v, torch.Tensor) and v.dtype.is_floating_point
                      and isinstance(g, fx.Node) and g in const else v for g, v in zip(graph_args, values)]
        n_args = len(args)
        keys = list(kwargs)

        def low() -> Any:
            vals = [v.to(dtype) if isinstance(v, torch.Tensor) and v.dtype.is_floating_point else v
                    for v in low_values]
            out = node.target(*vals[:n_args], **dict(zip(keys, vals[n_args:])))
            return out.float() if isinstance(out, torch.Tensor) else out
        return low, ref

    @property
    def _const(self) -> set[fx.Node]:
        if not hasattr(self, "_const_cache"):
            self._const_cache = constant_nodes(self.gm)
        return self._const_cache

    def measure_local_errors(self) -> None:
        with torch.no_grad():
            for name, opts in self.options.items():
                low_ref = None
                for p in opts:
                    low, ref = self._isolated(name, p)
                    if low_ref is None:
                        low_ref = ref()
                    try:
                        self.errors[(name, p)] = relative_l2(low(), low_ref)
                    except Exception as exc:  # the op has no low-precision kernel here
                        log.info("%s in %s failed: %s", name, p, exc)
                        self.errors[(name, p)] = float("inf")

    def local_error(self, name: str, precision: str) -> float:
        return self.errors.get((name, precision), float("inf"))

    def choose_requested(self) -> None:
        for name, opts in self.options.items():
            p = opts[0]
            self.choice[name] = p
            self.reasons[name] = f"requested ({self._int8_detail(name)})" if p == "int8" else "requested"

    def _int8_detail(self, name: str) -> str:
        scheme = self.target.int8_scheme or "reference kernel"
        if name in self.weights.shifts:
            return f"{scheme}, input shifted: per-token range x{self.shift_gain.get(name, 1.0):.2f}"
        return scheme

    def measure_speed(self) -> None:
        cache = self.ctx.cache.setdefault("precision_timings", {})
        for name, opts in self.options.items():
            opts = [p for p in opts if self.local_error(name, p) != float("inf")]
            key = (self._signature(name), tuple(opts))
            if key not in cache:
                fns = {"fp32": self._isolated(name, "fp32")[0]}
                fns.update({p: self._isolated(name, p)[0] for p in opts})
                cache[key] = self.owner.timer(fns, device=self.target.device)
            self.timings[name] = cache[key]
            choice, reason = choose_precision(cache[key], self._min_speedup)
            if choice == "int8":
                reason += f" ({self._int8_detail(name)})"
            self.choice[name], self.reasons[name] = choice, reason

    def ranked(self, nodes: dict[str, str], errors: dict[str, float], target: float | None) -> list[str]:
        """``nodes`` (name -> precision) most error-costly first, the order the search keeps them in fp32.

        First every node whose whole-model error alone exceeds ``target`` (it
        can never be converted), then by error per second saved (per FLOP
        without timings). Without the first rule a node that alone breaks the
        budget but saves much (an LM head) ranks as the cheapest, stays
        converted in every trial, and the bisection ends with nothing
        converted although other nodes fit (fp8 on the benchmark Llama).
        ``target`` None: no whole-model errors to judge by (own errors).
        """
        return sorted(nodes, key=lambda n: (target is not None and errors[n] > target,
                                            errors[n] / self.saved_seconds(n, nodes[n]),
                                            self.local_error(n, nodes[n])), reverse=True)

    def saved_seconds(self, name: str, precision: str) -> float:
        """What converting ``name`` to ``precision`` saves, for ranking: measured seconds per call over fp32
        where the speed was timed (auto); else the node's FLOPs, a proxy proportional to the saving of a
        GEMM-bound op (every node of one run is ranked by the same measure)."""
        timings = self.timings.get(name)
        if timings and precision in timings:
            return max(timings["fp32"] - timings[precision], 1e-12)
        return float(max(node_cost(self.nodes[name]).flops, 1))

    @property
    def _min_speedup(self) -> float:
        return AUTO_MIN_SPEEDUP if self.mode == "auto" else 1.0

    def fall_back(self, kept: set[str], plan: dict[str, str], verifier: Verifier,
                  budget: ErrorBudget) -> tuple[set[str], str]:
        """Give nodes the search took out of their fastest precision the next fastest one, within budget.

        A node kept out of int8 (too much error) may still be faster than fp32
        in bf16, which is more accurate: it gets the fastest other precision
        that was measured faster than fp32 and has a smaller own error, when
        the whole model still holds ``budget``. A second bisection, over these
        nodes only, decides which: when not all of them fit, the ones that
        cost the most whole-model error per millisecond they save go back to
        fp32 first, so the big savings (an LM head) are the last to go.
        Updates ``plan`` and the choices; returns the nodes left in fp32 and a
        note ('' when nothing was tried).
        """
        second: dict[str, tuple[str, str]] = {}
        for name in kept:
            timings = self.timings.get(name, {})
            was = plan[name]
            rest = {p: t for p, t in timings.items()
                    if p == "fp32" or (p != was and self.local_error(name, p) < self.local_error(name, was))}
            if len(rest) > 1:
                choice, reason = choose_precision(rest, self._min_speedup)
                if choice != "fp32":
                    second[name] = (choice, reason)
        if not second:
            return kept, ""
        base = {n: p for n, p in plan.items() if n not in kept}

        def measure(still_kept: set[str]) -> Numerics:
            trial = self.build({**base, **{n: c for n, (c, _) in second.items() if n not in still_kept}})
            return verifier.check(trial, budget)

        def order() -> list[str]:
            choices = {n: c for n, (c, _) in second.items()}
            return self.ranked(choices, self.model_sensitivity(choices, verifier), budget.rel_l2)

        left, steps = search_kept(order, measure)
        moved = [n for n in second if n not in left]
        for name in moved:
            choice, reason = second[name]
            self.reasons[name] = (f"{reason}; {plan[name]} was over budget (the search kept it out: "
                                  f"own error rel_l2 {self.local_error(name, plan[name]):.2e} in {plan[name]}, "
                                  f"{self.local_error(name, choice):.2e} in {choice})")
            plan[name] = self.choice[name] = choice
        targets = [second[n][0] for n in moved]
        counts = ", ".join(f"{c}: {targets.count(c)}" for c in sorted(set(targets)))
        note = (f"fallback: {len(moved)} of {len(second)} nodes kept out of their fastest precision run in the next "
                f"fastest ({counts or 'none'}); {len(steps)} whole-model checks"
                + (f" (ranked by error per ms saved, {len(second)} single-node runs)" if len(steps) > 1 else "")
                + ", " + describe_steps(steps))
        return (kept - set(moved)), note

    def _signature(self, name: str) -> tuple:
        node = self.nodes[name]
        args, kwargs = self.cal.args[name]
        shapes = tuple((tuple(a.shape), str(a.dtype)) if isinstance(a, torch.Tensor) else repr(a)
                       for a in list(args) + list(kwargs.values()))
        return (str(node.target), shapes, self.target.int8_scheme, name in self.weights.shifts)

    def whole_graph_speed(self, out: fx.GraphModule) -> str | None:
        """Time the plan against fp32 end to end; a reason when it is not faster."""
        a, kw = self.ctx.args, self.ctx.kwargs
        t = self.owner.timer({"fp32": lambda: self.gm(*a, **kw), "plan": lambda: out(*a, **kw)},
                             rounds=3, device=self.target.device, give_up=100.0)
        self.speed_note = (f"whole model: {t['plan'] * 1e3:.1f} ms with the plan vs {t['fp32'] * 1e3:.1f} ms "
                           f"in fp32 ({t['fp32'] / t['plan']:.2f}x)")
        if t["plan"] >= t["fp32"]:
            return f"slower on this target: {self.speed_note}; nothing converted"
        return None

    # -- plans
    def keep(self, name: str, reason: str) -> None:
        self.choice[name] = "fp32"
        self.reasons[name] = reason

    def build(self, plan: dict[str, str], final: bool = False) -> fx.GraphModule:
        """A copy of the graph with ``plan`` ({node: precision}) applied."""
        out = ir.copy_graph_module(self.gm)
        by_name = {n.name: n for n in out.graph.nodes}
        for name, p in plan.items():
            if p in ("int8", "fp8"):
                replace_site(out, self.sites[name], p, self.weights, by_name)
        floats = {n for n, p in plan.items() if p in FLOAT_DTYPES}
        if floats:
            dtype = FLOAT_DTYPES[next(plan[n] for n in floats)]
            lowered = lower_float(out, floats, dtype, self.cal, self.keep_residual)
            for name, why in lowered.kept.items():
                if final:
                    self.keep(name, why)
            if final:
                for name in lowered.scaled:
                    self.reasons[name] = self.reasons.get(name, "") + "; fp16 overflow scaling (per-tensor)"
        out.graph.lint()
        out.recompile()
        out = ir.copy_graph_module(out)  # drop attributes the new graph no longer uses
        if final:
            for node in out.graph.nodes:
                if node.name in self.choice and "graphopt_precision" not in node.meta:
                    node.meta["graphopt_precision"] = self.choice[node.name]
            out.graph.lint()
            out.recompile()
        return out

    # -- report
    def entries(self) -> list[NodePlan]:
        out = []
        for name in self.choice:
            node = self.nodes[name]
            p = self.choice[name]
            err = self.errors.get((name, p)) if p != "fp32" else None
            out.append(NodePlan(name, ir.module_path(node), ir.op_name(node), p, self.reasons.get(name, ""), err))
        return out

    def declined_nodes(self) -> list[Declined]:
        return [Declined(f"{e.node} ({e.module or 'top'})", f"kept fp32: {e.reason}") for e in self.entries()
                if e.precision == "fp32"]
