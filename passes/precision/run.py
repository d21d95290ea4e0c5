"""One run of the ``precision`` pass: its candidates, measurements and choices (:class:`PrecisionRun`)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from graphopt import ir, meta
from graphopt.cost import node_cost
from graphopt.ops.kernel_calls import inline_kernel_calls
from graphopt.pass_infra import OptimizeContext
from graphopt.precision.calibrate import Calibration
from graphopt.precision.lower_float import lower_float
from graphopt.precision.ops_classes import COMPUTE_OPS, FLOAT_DTYPES, island_reason
from graphopt.passes.precision.measurements import MODEL_MIN_SPEEDUP, NodeMeasurements
from graphopt.passes.precision.quantized_linears import (
    QUANTIZED,
    QuantizableLinear,
    QuantizedWeights,
    int4_decline,
    quantizable_linears,
    replace_site,
)
from graphopt.precision.replay import SuffixReplay, recorded_bytes, writes_in_place
from graphopt.precision.search import SearchStep, describe_steps, search_kept
from graphopt.precision.speed import choose_precision
from graphopt.precision.target import PrecisionTarget
from graphopt.report import Declined
from graphopt.verify import ErrorBudget, Numerics, Verifier, compare_outputs

log = logging.getLogger(__name__)

MODES = ("bf16", "fp16", "int8", "fp8", "int8wo", "int4", "auto")
DEFAULT_BUDGET = ErrorBudget(rel_l2=1e-2)
#: int4's default budget (docs/precision.md, "int4's budget": measured on a tiny random-weight Llama); ``auto``
#: considers int4 only when the budget the user gives is at least this loose (:func:`admits_int4`)
INT4_BUDGET = ErrorBudget(rel_l2=5e-2, top1=0.9)
#: weight-only modes: quantized weights, bf16 activations (graphopt.ops.weight_only_linear)
WEIGHT_ONLY_MODES = ("int8wo", "int4")
#: the search aims this fraction of the budget, so fresh inputs have some room
SEARCH_MARGIN = 0.8
#: auto converts a node only when it is at least this much faster (timings on a busy machine are noisy)
AUTO_MIN_SPEEDUP = 1.05
#: above this many converted nodes the search ranks by each node's own error instead of whole-model runs
MAX_MODEL_SENSITIVITY_NODES = 256
#: single-node runs replay the graph from the node on while its recorded values fit in this much memory
REPLAY_MAX_BYTES = 2 << 30
#: the most seconds one end-to-end timing of the plan against fp32 takes (at least two rounds run)
WHOLE_GRAPH_TIMING_S = 5.0
#: auto runs at most this many precisions alone as rivals of its per-node plan (:meth:`PrecisionRun.rivals`)
MAX_RIVALS = 2
#: a more accurate precision timed within this factor of the one auto chose at a node is a tie: a rival
RIVAL_TIE = 1.05
#: ... and its tie nodes make at least this share of what the plan saves
RIVAL_MIN_SHARE = 0.1


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


def non_fp32_weights(gm: fx.GraphModule) -> str:
    dtypes = {str(ir.tensor_meta(n).dtype) for n in gm.graph.nodes if n.op == "get_attr"
              and ir.tensor_meta(n) is not None and ir.tensor_meta(n).dtype.is_floating_point
              and ir.tensor_meta(n).dtype != torch.float32}
    return ", ".join(sorted(dtypes))


def default_budget(mode: str | None) -> ErrorBudget:
    """The budget a mode is held to when the user gives none: :data:`INT4_BUDGET` for int4, else 1e-2."""
    return INT4_BUDGET if mode == "int4" else DEFAULT_BUDGET


def admits_int4(budget: ErrorBudget | None) -> bool:
    """Whether a budget the user gave lets ``auto`` consider int4: its rel_l2 is at least :data:`INT4_BUDGET`'s
    (the search then holds the user's budget, top-1 included); no budget given: never."""
    return budget is not None and budget.rel_l2 >= INT4_BUDGET.rel_l2


class PrecisionRun(NodeMeasurements):
    """State of one ``precision`` pass run: candidates, measurements, choices."""

    def __init__(self, timer: Callable[..., dict[str, float]], gm: fx.GraphModule, ctx: OptimizeContext,
                 target: PrecisionTarget, mode: str, keep_residual: bool) -> None:
        self.timer, self.gm, self.ctx, self.target, self.mode = timer, gm, ctx, target, mode
        self.keep_residual = keep_residual
        self.nodes = {n.name: n for n in gm.graph.nodes}
        self.options: dict[str, list[str]] = {}  # candidate node -> precisions to consider
        self.sites: dict[str, QuantizableLinear] = {}
        pair_safe = ctx.option("precision_int8_pair_safe", None)
        self.weights = QuantizedWeights(target.int8_scheme,
                                        target.int8_pair_safe if pair_safe is None else pair_safe)
        self.choice: dict[str, str] = {}
        self.reasons: dict[str, str] = {}
        self.errors: dict[tuple[str, str], float] = {}
        self.timings: dict[str, dict[str, float]] = {}  # node -> seconds per precision (speed check)
        self.cal: Calibration | None = None
        self.model_errors: dict[str, float] = {}  # node -> model rel_l2 with it alone converted
        self.shift_gain: dict[str, float] = {}  # int8 node with an input shift -> its range narrowing
        self.group_size: dict[str, int] = {}  # timed in the model: node -> nodes converted with it
        self.notes: list[str] = []
        if mode in ("int8", "auto") and target.int8_scheme is not None:
            kind = "pair-safe (exact on x86 kernels without VNNI too)" if self.weights.pair_safe else \
                "plain per channel (the finer step)"
            source = ("as asked (precision_int8_pair_safe)" if pair_safe is not None
                      else "which this target's kernel needs" if self.weights.pair_safe
                      else "which this target's kernel runs exactly")
            self.notes.append(f"int8 weights: {kind}, {source}")
        self.speed_note = ""
        #: seconds per run of the plan, as :meth:`whole_graph_speed` timed it (None until then)
        self.plan_seconds: float | None = None
        #: why a precision that tied with the plan did not run as a rival (:meth:`rivals`)
        self.rivals_skipped: list[str] = []
        self._replay_tried = False  # the suffix replay is set up on first use (model_sensitivity)
        self._replay_cache: SuffixReplay | None = None
        self.float_dtype = FLOAT_DTYPES.get(mode, torch.bfloat16)

    # -- candidates
    def find_candidates(self) -> list[Declined]:
        declined: list[Declined] = []
        sites, why_not = quantizable_linears(self.gm)
        self.sites = sites
        auto = self.target.auto_candidates(admits_int4(self.ctx.error_budget)) if self.mode == "auto" else []
        quant = {p: self.mode == p or p in auto for p in QUANTIZED}
        if self.mode == "auto" and "int4" in self.target.weight_only and "int4" not in auto \
                and "bf16" in self.target.native_floats:
            self.notes.append(f"int4 not considered: its error needs a budget of rel_l2 >= {INT4_BUDGET.rel_l2:g} "
                              "(give error_budget=... to admit it)")
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
                opts += [p for p in ("fp8", "int4", "int8", "int8wo") if quant[p]]
                if "int4" in opts and int4_decline(sites[node.name]):
                    opts.remove("int4")
                    why_not[node.name] = int4_decline(sites[node.name])
            if self.mode in FLOAT_DTYPES or "bf16" in auto:
                opts.append("bf16" if self.mode == "auto" else self.mode)
            if self.mode == "int4" and "int4" in opts and self._int4_fallback:
                opts.append("int8wo")
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

    @property
    def _int4_fallback(self) -> bool:
        """int4 mode: linears kept out of int4 may get int8 weight-only (option ``precision_int4_fallback``)."""
        return ("int8wo" in self.target.weight_only
                and self.ctx.option("precision_int4_fallback", "int8wo") == "int8wo")

    # -- whole-model measurements (single nodes: NodeMeasurements)
    def model_sensitivity(self, plan: dict[str, str], verifier: Verifier) -> dict[str, float]:
        """Whole-model error with each node of ``plan`` converted alone, on the example inputs.

        int8/fp8 nodes are replayed (:class:`SuffixReplay`: only what depends on
        the node is recomputed); bf16/fp16 nodes, whose conversion also moves
        casts around them, get a rebuilt graph each.
        """
        (a, kw), ref = verifier.input_sets[0], verifier.references[0]
        replay = self._replay(a, kw) if any(p in QUANTIZED for p in plan.values()) else None
        out: dict[str, float] = {}
        with torch.no_grad():
            for i, (name, p) in enumerate(plan.items()):
                self.ctx.step(f"error search: ranking, {name} alone in {p} ({i + 1} of {len(plan)})")
                try:
                    if replay is not None and p in QUANTIZED:
                        got = replay.run(name, functools.partial(self._quantized_call, name, p))
                    else:
                        got = self.build({name: p})(*a, **kw)
                    errs = compare_outputs(ref, got, self.ctx.error_budget or default_budget(self.mode))
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
            return max(timings["fp32"] - timings[precision], 1e-12) / self.group_size.get(name, 1)
        return float(max(node_cost(self.nodes[name]).flops, 1))

    @property
    def _min_speedup(self) -> float:
        if self.mode != "auto":
            return 1.0
        return MODEL_MIN_SPEEDUP if self.group_size else AUTO_MIN_SPEEDUP

    def int4_fallback_base(self, plan: dict[str, str]) -> dict[str, str]:
        """int4 mode with the int8 weight-only fallback: ``{linear: "int8wo"}`` for each int4 linear of ``plan``
        that may fall back to it and is more accurate there; else ``{}``."""
        if self.mode != "int4" or not self._int4_fallback:
            return {}
        return {n: "int8wo" for n, p in plan.items() if p == "int4" and "int8wo" in self.options.get(n, ())
                and self.local_error(n, "int8wo") < self.local_error(n, "int4")}

    def keep_in_base(self, kept: set[str], plan: dict[str, str], base: dict[str, str],
                     worst: SearchStep | None) -> tuple[set[str], str]:
        """After an int4 search over an int8 weight-only base: the linears it kept out of int4 get int8
        weight-only (the plan it measured; ``worst`` is its largest failing step). Returns those left for fp32
        (none had a base) and the note."""
        moved = [n for n in kept if n in base]
        over = (f"with the {worst.kept} most error-costly linears in int8 weight-only, int4 on the rest gave "
                f"{worst.numerics.summary()}") if worst else "over budget"
        for name in moved:
            self.reasons[name] = (f"int4 fallback (precision_int4_fallback): int8 weight-only; int4 was over budget "
                                  f"(the search kept it out: {over}; own error rel_l2 "
                                  f"{self.local_error(name, 'int4'):.2e} in int4, "
                                  f"{self.local_error(name, 'int8wo'):.2e} in int8wo)")
            plan[name] = self.choice[name] = base[name]
        note = (f"int4 fallback: {len(moved)} of {len(plan)} linears kept out of int4 got int8 weight-only (int4 "
                "searched within what int8 weight-only leaves of the budget)") if moved else ""
        return kept - set(moved), note

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
        Explicit ``int4`` (no timings): a linear kept out of int4 falls back to
        int8 weight-only (:attr:`_int4_fallback`), ranked by FLOPs saved.
        Updates ``plan`` and the choices; returns the nodes left in fp32 and a
        note ('' when nothing was tried).
        """
        second: dict[str, tuple[str, str]] = {}
        for name in kept:
            if self.mode == "int4":
                if "int8wo" in self.options.get(name, ()) and plan[name] == "int4" \
                        and self.local_error(name, "int8wo") < self.local_error(name, "int4"):
                    second[name] = ("int8wo", "int4 fallback (precision_int4_fallback): int8 weight-only")
                continue
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
        what = (f"int4 fallback: {len(moved)} of {len(second)} linears kept out of int4 got int8 weight-only"
                if self.mode == "int4" else
                f"fallback: {len(moved)} of {len(second)} nodes kept out of their fastest precision run in the next "
                f"fastest ({counts or 'none'})")
        note = (f"{what}; {len(steps)} whole-model checks"
                + (f" (ranked by error per ms saved, {len(second)} single-node runs)" if len(steps) > 1 else "")
                + ", " + describe_steps(steps))
        return (kept - set(moved)), note

    def rivals(self, plan: dict[str, str]) -> dict[str, list[str]]:
        """auto: the precisions worth running on their own as rivals of ``plan`` (at most :data:`MAX_RIVALS`), each
        with the nodes that make it one.

        A precision qualifies at a node where ``plan`` took another precision although this one is more accurate
        there and was timed faster than fp32 and within :data:`RIVAL_TIE` of the chosen one: a tie the per-node
        choice settles by the noise of its timing, and whose less accurate side can spend the budget and leave
        other nodes in fp32 (int8 on an LM head, within 1-2% of int8 weight-only, run to run either way). Those
        nodes must make at least :data:`RIVAL_MIN_SHARE` of what the plan saves (a tie at one small matmul does
        not spend enough of the budget to be worth a second search). Ordered by what they save at those nodes
        (seconds, or FLOPs without timings), largest first.
        """
        saving: dict[str, float] = {}
        at: dict[str, list[str]] = {}
        for name, chosen in plan.items():
            timings = self.timings.get(name, {})
            for p, t in timings.items():
                tie = chosen in timings and t < timings["fp32"] and t <= timings[chosen] * RIVAL_TIE
                if p not in (chosen, "fp32") and tie and self.local_error(name, p) < self.local_error(name, chosen):
                    saving[p] = saving.get(p, 0.0) + self.saved_seconds(name, p)
                    at.setdefault(p, []).append(name)
        total = sum(self.saved_seconds(n, p) for n, p in plan.items())
        worth = [p for p in saving if saving[p] >= RIVAL_MIN_SHARE * total and self._could_win(p, plan, total)]
        return {p: at[p] for p in sorted(worth, key=lambda p: (-saving[p], p))[:MAX_RIVALS]}

    def rival_ceiling(self, precision: str, plan: dict[str, str]) -> float:
        """The most that ``precision`` alone could save, by the per-node timings: at every timed node where it
        is faster than fp32 its own saving, or the plan's where the two tie (within :data:`RIVAL_TIE`: the
        timing's noise could have ranked either first). Whatever the budget admits, a rival saves no more."""
        ceiling = 0.0
        for name, timings in self.timings.items():
            t = timings.get(precision)
            if t is None or t >= timings["fp32"]:
                continue
            saved = self.saved_seconds(name, precision)
            chosen = plan.get(name)
            if chosen in timings and t <= timings[chosen] * RIVAL_TIE:
                saved = max(saved, self.saved_seconds(name, chosen))
            ceiling += saved
        return ceiling

    def _could_win(self, precision: str, plan: dict[str, str], total: float) -> bool:
        """Whether ``precision`` alone, at its :meth:`rival_ceiling`, would beat the plan (saving ``total``) by
        :data:`MODEL_MIN_SPEEDUP` end to end (the plan's timed seconds; unknown: by anything). A plan that already
        converts every node the precision is faster at leaves a rival only its ties' noise to win by."""
        gain = self.rival_ceiling(precision, plan) - total
        needed = (1.0 - 1.0 / MODEL_MIN_SPEEDUP) * self.plan_seconds if self.plan_seconds else 0.0
        if gain > needed:
            return True
        self.rivals_skipped.append(
            f"rival precision={precision!r} not run: at best (every node where it timed faster than fp32, its ties "
            f"with the plan at the plan's speed) it saves {gain * 1e3:+.3f} ms per run over the per-node plan, "
            f"which needs {needed * 1e3:.3f} ms to be {MODEL_MIN_SPEEDUP:g}x faster")
        return False

    def time_rivals(self, out: fx.GraphModule, rivals: dict[str, fx.GraphModule]) -> dict[str, float]:
        """Seconds per run of auto's plan ``out`` (key ``"auto"``) and of each rival's graph, interleaved and timed
        as :meth:`whole_graph_speed` times (as generation runs them where the speed was timed in the model); timed
        once more when the fastest rival is faster by less than :data:`MODEL_MIN_SPEEDUP`."""
        graphs = {"auto": out, **rivals}
        if self.times_in_model:
            graphs = {k: inline_kernel_calls(g) for k, g in graphs.items()}
        a, kw = self.timing_inputs

        def close(seconds: dict[str, float]) -> bool:
            best = min(seconds[p] for p in rivals)
            return best < seconds["auto"] < best * MODEL_MIN_SPEEDUP

        return self._time_graphs(graphs, a, kw, again_if=close, budget_s=WHOLE_GRAPH_TIMING_S)

    def whole_graph_speed(self, out: fx.GraphModule) -> str | None:
        """Time the plan against fp32 end to end; a reason when it is not faster.

        Timed as the in-model groups are (warm, :data:`MODEL_TIMING_ROUNDS` rounds of
        :data:`MODEL_TIMING_REPEAT` back-to-back runs, at most :data:`WHOLE_GRAPH_TIMING_S` seconds), and a plan
        that times slower is timed once more before it is dropped: this one timing can undo every choice
        before it. It was the fastest of 3 cold runs: two builds of one configuration (generation's decode graph,
        2 shared cores) read 1.28x and 0.85x, their plans differing by a few small groups.
        """
        a, kw = self.timing_inputs
        t = self._time_graphs({"fp32": self.gm, "plan": out}, a, kw, again_if=lambda s: s["plan"] >= s["fp32"],
                              budget_s=WHOLE_GRAPH_TIMING_S)
        self.plan_seconds = t["plan"]
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
            if p in QUANTIZED:
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
                if node.name in self.choice and meta.PRECISION not in node.meta:
                    node.meta[meta.PRECISION] = self.choice[node.name]
            out.graph.lint()
            out.recompile()
        return out

    # -- report
    def report_data(self) -> dict[str, Any]:
        """The pass's section of the report: every candidate node's precision and why."""
        return {"precision": [e.to_dict() for e in self.entries()]}

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
