"""Blocked operators sized by a memory budget (pass ``blocked``).

Rewrites (each site only where the planner chooses it):
    matmul(q, k^T) * s + bias (+ ...) [masked] -> softmax -> matmul v
        -> graphopt.blocked_attention(q, k, v, bias, mask, fill, s, q_block, kv_block[, softcap])
           (a tanh soft-cap ``c * tanh(s / c)`` after the scale, Gemma 2, is the op's ``softcap``)
           (a large bias recomputable from small inputs -- T5's relative-position
           bias, a (T, T) mask -- is recomputed per query block instead:
           per block: bias rows -> blocked_attention; then cat)
    linear -> act -> linear          -> graphopt.chunked_ffn(..., act, chunk)
    linear(act(linear_g(x)) * linear_u(x)) -> graphopt.chunked_ffn (gated)
    linear -> [cast] -> [log_]softmax -> gather | argmax | topk
                                     -> graphopt.chunked_lm_head_{gather,argmax,topk}
    linear / matmul                  -> graphopt.blocked_linear / blocked_matmul
                                        (only with ``block_matmul`` or when autotune measures it faster)

Planner. With a memory budget (``optimize(memory_budget="2GiB")``,
``ctx.memory_budget`` in bytes) the predicted peak activation memory -- a
liveness analysis over node order (:func:`graphopt.memory.peak_memory`,
views share storage; plus blocked operators' working memory,
:mod:`graphopt.passes.analysis.blocked_liveness`) -- must come
under the budget (with a 10% margin for the allocator). Greedily, while the
predicted peak is over: every site not yet blocked is tried with its
configurations from least predicted slowdown to smallest memory
(:class:`graphopt.passes.analysis.blocked_cost.BlockCostModel`, Pareto-pruned; binary search
on the re-analysed graph); a site that alone meets the budget at the least
slowdown wins, otherwise the one lowering the peak most (or, when no single
site lowers it -- a bias shared by every layer -- all remaining sites at once).
Then each chosen site is relaxed to the cheapest configuration that still
meets the budget. The report gives the predicted peak before and after and,
measured on the example inputs, the real peak before and after (torch's
allocator: :func:`graphopt.target.measure_peak`; a fresh process' peak RSS,
what ``benchmarks/blocked.py`` reports, is the same function with ``source="rss"``).
A budget no plan meets raises :class:`BudgetError` with the smallest reachable
peak. With a budget the promise is checked as measured, not only as predicted
(:mod:`graphopt.passes.blocked_promise`): a plan whose measured peak is over
the budget is re-planned tighter, and one that stays over raises
:class:`MeasuredOverBudget` (option ``measure_memory``: ``allocator`` or ``rss``).

Without a budget a site is blocked only where the cost model predicts it
faster; with ``autotune=True`` the candidates are timed on the example inputs
and only what is measured faster is kept.

Declines: attention sites the blocked operator cannot express
(:mod:`graphopt.passes.analysis.blockable_attention`), FFN activations graphopt
does not know, LM-head logits also returned, kinds excluded by ``blocked_kinds``,
sites the plan does not need.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from graphopt import ir
from graphopt.opsets import erase_dead
from graphopt.passes.analysis.blocked_cost import BlockConfig, BlockCostModel
from graphopt.node_builder import fake_mode_of
from graphopt.pass_infra import OptimizeContext, Option, Pass, PassResult
from graphopt.passes.analysis.blockable_attention import describe_blockable
from graphopt.passes.analysis.blockable_sites import (
    BlockableSite,
    FFNChain,
    MatmulSite,
    find_blockable_sites,
)
from graphopt.passes.analysis.sites import AttentionSite
from graphopt.passes.analysis.blocked_liveness import PlannerProfile, memory_profile
from graphopt.passes.blocked_promise import (BUDGET_MARGIN, MEASURE_SOURCES, BudgetError, MeasuredOverBudget,
                                             keep_promise)
from graphopt.passes.blocked_rewrites import apply_block_config, kept_bias_notes, remap_site
from graphopt.report import Declined
from graphopt.tensor_sizes import readable_bytes
from graphopt.row_slicing import DEFAULT_LEAF_BYTES, RowSlicer, functionalize_inplace
from graphopt.target import Roofline
from graphopt.target.timing import median_time

log = logging.getLogger(__name__)

__all__ = ["BlockedOperators", "BudgetError", "MeasuredOverBudget", "Plan", "blocked_requested", "blocked_takes_attention",
           "plan_blocking"]

KINDS = ("attention", "ffn", "lm_head", "matmul")


@dataclass
class Plan:
    """Which sites to block and how; the graph it gives and its predicted profile."""

    configs: dict[str, BlockConfig] = field(default_factory=dict)
    module: fx.GraphModule | None = None
    profile: PlannerProfile | None = None
    notes: list[str] = field(default_factory=list)


def _signature(site: BlockableSite) -> tuple:
    """Sites with the same signature (every layer's attention, say) are planned together."""
    def shapes(*nodes: Any) -> tuple:
        return tuple(ir.shape_of(n) if isinstance(n, fx.Node) else None for n in nodes)

    if isinstance(site, AttentionSite):
        return (site.kind, shapes(site.q_operand, site.k_t_operand, site.v_operand, site.fill_mask, *site.biases),
                site.score_scale, site.mask_value, site.mask_invert)
    if isinstance(site, MatmulSite):
        return (site.kind, shapes(site.output, *site.output.args[:2]))
    if isinstance(site, FFNChain):
        return (site.kind, shapes(site.x), site.hidden, site.lin_gate is not None, site.activation_name)
    return (site.kind, site.reduction, shapes(site.logits_view, site.head.input), site.normalize, site.upcast)


class _Planner:
    """Materialises plans on copies of the graph and searches for a cheap one under the budget.

    The unit of planning is a group of sites with the same signature (the
    same attention in every layer): a configuration applies to the whole group.
    """

    def __init__(self, gm: fx.GraphModule, sites: list[BlockableSite], cost: BlockCostModel,
                 leaf_bytes: int = DEFAULT_LEAF_BYTES) -> None:
        self.gm = gm
        self.sites = {s.name: s for s in sites}
        self.cost = cost
        self.leaf_bytes = leaf_bytes
        self.fake_mode = fake_mode_of(gm)
        by_signature: dict[tuple, list[str]] = {}
        for s in sites:
            by_signature.setdefault(_signature(s), []).append(s.name)
        self.groups = {names[0]: names for names in by_signature.values()}
        self.candidates = {g: cost.candidates(self.sites[g]) for g in self.groups}
        self.trials = 0
        self.val_cache: dict[Any, Any] = {}

    def expand(self, configs: dict[str, BlockConfig]) -> dict[str, BlockConfig]:
        """Group configurations -> site configurations."""
        return {name: cfg for g, cfg in configs.items() for name in self.groups[g]}

    def apply(self, base: fx.GraphModule, site_configs: dict[str, BlockConfig]) -> fx.GraphModule:
        """A copy of ``base`` with the sites in ``site_configs`` (found in ``self.gm``) blocked."""
        gm = ir.copy_graph_module(base)
        by_name = {n.name: n for n in gm.graph.nodes}
        for name, cfg in site_configs.items():
            apply_block_config(gm, remap_site(self.sites[name], by_name), cfg, self.fake_mode, self.leaf_bytes,
                               self.val_cache)
        erase_dead(gm)
        return gm

    def profile(self, configs: dict[str, BlockConfig], base: fx.GraphModule | None = None,
                base_configs: dict[str, BlockConfig] | None = None) -> tuple[fx.GraphModule, PlannerProfile]:
        """Materialise group ``configs`` (on ``base`` when it already has ``base_configs``) and profile it."""
        self.trials += 1
        if base is None:
            gm = self.apply(self.gm, self.expand(configs))
        else:
            extra = {k: v for k, v in configs.items() if k not in (base_configs or {})}
            gm = self.apply(base, self.expand(extra))
        return gm, memory_profile(gm)

    def slowdown(self, group: str, cfg: BlockConfig) -> float:
        site = self.sites[group]
        return len(self.groups[group]) * (self.cost.blocked_seconds(site, cfg) - self.cost.eager_seconds(site))

    def _cheapest_meeting(self, group: str, configs: dict[str, BlockConfig], target: int,
                          base: fx.GraphModule | None, upto: int | None = None) -> tuple[int, int]:
        """(index, peak) of the cheapest candidate of ``group`` meeting ``target``, searched in [0, upto];
        (upto, peak there) when even that one does not meet it."""
        cands = self.candidates[group]
        peaks: dict[int, int] = {}
        others = {k: v for k, v in configs.items() if k != group}

        def peak_at(i: int) -> int:
            if i not in peaks:
                trial = {**others, group: cands[i]}
                peaks[i] = (self.profile(trial, base, others)[1] if base is not None
                            else self.profile(trial)[1]).peak_bytes
            return peaks[i]

        last = len(cands) - 1 if upto is None else upto
        lo, hi = 0, last
        while lo < hi:  # peaks fall along the candidate list (Pareto order): binary search
            mid = (lo + hi) // 2  # (the cheap end first: the smallest blocks unroll the most nodes)
            if peak_at(mid) <= target:
                hi = mid
            else:
                lo = mid + 1
        return lo, peak_at(lo)

    def search(self, target: int, forced: dict[str, BlockConfig]) -> Plan:
        configs = dict(forced)
        cur, prof = self.profile(configs)
        free = [g for g in self.groups if g not in configs and self.candidates[g]]
        while prof.peak_bytes > target and free:
            options = []  # (meets, peak, slowdown, group, cfg)
            for g in free:
                i, peak = self._cheapest_meeting(g, configs, target, cur)
                cfg = self.candidates[g][i]
                options.append((peak <= target, peak, self.slowdown(g, cfg), g, cfg))
            meeting = [o for o in options if o[0]]
            if meeting:
                _, _, _, g, cfg = min(meeting, key=lambda o: o[2])
                configs[g] = cfg
            else:
                best = min(options, key=lambda o: (o[1], o[2]))
                if best[1] < prof.peak_bytes:
                    configs[best[3]] = best[4]
                else:  # no single group lowers the peak: a value shared by several holds it
                    together = {**configs, **{g: self.candidates[g][-1] for g in free}}
                    if self.profile(together)[1].peak_bytes >= prof.peak_bytes:
                        break
                    configs = together
            cur, prof = self.profile(configs)
            free = [g for g in free if g not in configs]
        if prof.peak_bytes <= target:
            configs = self.relax(configs, forced, target)
            cur, prof = self.profile(configs)
        return Plan(self.expand(configs), cur, prof)

    def relax(self, configs: dict[str, BlockConfig], forced: dict[str, BlockConfig], target: int) \
            -> dict[str, BlockConfig]:
        """Give each chosen group the cheapest configuration that keeps the peak under ``target``;
        drop groups the rest of the plan made unnecessary."""
        configs = dict(configs)
        for g in [g for g in configs if g not in forced]:
            cands = self.candidates[g]
            current = cands.index(configs[g]) if configs[g] in cands else len(cands) - 1
            i, peak = self._cheapest_meeting(g, configs, target, None, current)
            if peak <= target:
                configs[g] = cands[i]
        for g in [g for g in configs if g not in forced]:
            trial = {k: v for k, v in configs.items() if k != g}
            if self.profile(trial)[1].peak_bytes <= target:
                configs = trial
        return configs

    def minimum(self, forced: dict[str, BlockConfig]) -> tuple[dict[str, BlockConfig], PlannerProfile]:
        """Every group at its smallest configuration, and the profile that gives."""
        configs = {**{g: c[-1] for g, c in self.candidates.items() if c}, **forced}
        return configs, self.profile(configs)[1]


def default_leaf_bytes(budget: int | None) -> int:
    """Values up to this size are kept whole and read by views: 1 MiB, or 1/32 of a smaller budget."""
    return DEFAULT_LEAF_BYTES if budget is None else max(1024, min(DEFAULT_LEAF_BYTES, budget // 32))


def plan_blocking(gm: fx.GraphModule, budget: int | None, device: torch.device | None = None,
                  kinds: tuple[str, ...] = KINDS, forced_sizes: dict[str, tuple[int, ...]] | None = None,
                  leaf_bytes: int | None = None, roofline: Roofline | None = None) -> tuple[Plan, list[Declined]]:
    """Choose the sites to block in ``gm`` (which must carry ``meta["val"]``) and their block sizes.

    ``budget`` in bytes (None: block only where predicted faster).
    ``forced_sizes`` {kind: sizes} blocks every site of that kind with those sizes.
    ``leaf_bytes``: bias/mask producers larger than this are recomputed per
    query block (default :func:`default_leaf_bytes`). ``roofline``: the cost
    model's figures (default: :func:`graphopt.target.measure_under_load`, measured
    now; the pass passes its context's, measured once). Functionalizes in-place
    ops of ``gm`` whose input nobody else reads (same values).
    Raises :class:`BudgetError` when no plan meets the budget.
    """
    leaf_bytes = default_leaf_bytes(budget) if leaf_bytes is None else leaf_bytes
    cost = BlockCostModel(device, roofline)
    functionalize_inplace(gm)  # a recomputed slice must not read a value mutated in place
    forced_sizes = forced_sizes or {}
    sites, declined = find_blockable_sites(gm, tuple(set(kinds) | set(forced_sizes)))
    # plain matmuls: blocked on request (block_matmul) or when autotune measures it faster
    usable = [s for s in sites if s.kind != "matmul" or "matmul" in forced_sizes]
    planner = _Planner(gm, usable, cost, leaf_bytes)
    forced = {g: BlockConfig(planner.sites[g].kind, forced_sizes[planner.sites[g].kind])
              for g in planner.groups if planner.sites[g].kind in forced_sizes}
    before = memory_profile(gm)
    where = before.peak_node.name if before.peak_node else "-"
    notes = [f"predicted peak before: {readable_bytes(before.peak_bytes)} at {where}"]
    notes += kept_bias_notes(usable, RowSlicer(gm, leaf_bytes))
    if budget is None:
        configs = dict(forced)
        for g, names in planner.groups.items():
            if g in configs:
                continue
            if not planner.candidates[g]:
                declined.extend(Declined(n, f"{describe_blockable(planner.sites[n])}: too small to block") for n in names)
                continue
            s, best = planner.sites[g], planner.candidates[g][0]
            eager, blocked = cost.eager_seconds(s), cost.blocked_seconds(s, best)
            if blocked < 0.95 * eager:
                configs[g] = best
            else:
                for name in names:
                    declined.append(Declined(name, f"{describe_blockable(planner.sites[name])}: blocking not predicted "
                                             f"faster ({blocked * 1e3:.2f} ms vs {eager * 1e3:.2f} ms eager) "
                                             "and no memory budget"))
        result_gm, prof = planner.profile(configs)
        result = Plan(planner.expand(configs), result_gm, prof, notes)
    else:
        target = int(budget * BUDGET_MARGIN)
        if before.peak_bytes <= target and not forced:
            notes.append(f"already under the budget {readable_bytes(budget)}: nothing to block")
            return Plan({}, None, before, notes), declined
        result = planner.search(target, forced)
        if result.profile.peak_bytes > target:
            low_configs, low = planner.minimum(forced)
            if low.peak_bytes > target:
                live = [(n.name, b) for n, b in low.live_at_peak]
                raise BudgetError(budget, low.peak_bytes, low.peak_node.name if low.peak_node else "-", live)
            module, prof = planner.profile(low_configs)
            result = Plan(planner.expand(low_configs), module, prof)
        result.notes = notes
    for name in planner.sites:
        if name not in result.configs and budget is not None:
            declined.append(Declined(name, f"{describe_blockable(planner.sites[name])}: not needed to meet the budget"))
    log.debug("blocked planner: %d trials", planner.trials)
    return result, declined


def _unknown_kinds(value: str) -> str | None:
    """Why ``blocked_kinds=value`` is not allowed (None: it is)."""
    unknown = {k.strip() for k in value.split(",") if k.strip()} - set(KINDS)
    return f"unknown kind(s) {sorted(unknown)}; choose from {', '.join(KINDS)}" if unknown else None


def _kinds(ctx: OptimizeContext) -> tuple[str, ...]:
    return tuple(k.strip() for k in str(ctx.option("blocked_kinds", ",".join(KINDS))).split(",") if k.strip())


def _time_module(gm: fx.GraphModule, ctx: OptimizeContext, repeats: int = 3) -> float:
    with torch.no_grad():
        return median_time(lambda: gm(*ctx.args, **ctx.kwargs), repeats, str(ctx.device))


def blocked_requested(ctx: OptimizeContext) -> bool:
    """True when the options ask for the blocked pass (a memory budget, autotuning or a forced block size)."""
    return (ctx.memory_budget is not None or bool(ctx.options.get("autotune"))
            or any(k in ctx.options for k in BlockedOperators.options if k.startswith("block")))


def blocked_takes_attention(ctx: OptimizeContext) -> bool:
    """True when the blocked pass runs and may block attention sites (``blocked_kinds`` has ``attention``)."""
    return blocked_requested(ctx) and "attention" in _kinds(ctx)


class BlockedOperators(Pass):
    """Rewrite attention, FFNs, LM heads and matmuls into blocked operators to fit a memory budget."""

    name = "blocked"
    summary = "block attention / FFN / LM head / matmul so peak memory fits memory_budget"
    options = {
        "autotune": Option("time candidate blockings on the example inputs and keep the fastest (bool)", bool),
        "block_q": Option("query rows per block for blocked attention (forces blocking of every attention site)",
                          int),
        "block_kv": Option("keys per block for blocked attention (0: all keys, one softmax; with block_q)", int),
        "block_ffn": Option("token rows per chunk for chunked FFNs (forces blocking of every FFN site)", int),
        "block_lm_head": Option("token rows per chunk for chunked LM heads (forces every LM head + reduction)", int),
        "block_matmul": Option("output rows per block for blocked linear/matmul (forces every matmul)", int),
        "blocked_kinds": Option("site kinds the planner may block: comma list of attention,ffn,lm_head,matmul",
                                str, ",".join(KINDS), check=_unknown_kinds),
        "measure_peak": Option("measure the real peak memory before and after (default: when a budget is set)",
                               bool),
        "measure_memory": Option("what the budget check measures: 'allocator' (torch's allocation events), 'rss' "
                                 "(this process' peak resident set) or 'subprocess' (a fresh process's)",
                                 str, None, MEASURE_SOURCES),
        "blocked_leaf_bytes": Option("attention biases/masks larger than this are recomputed per query block "
                                     "instead of kept whole, when their producers allow (bytes, default 1 MiB "
                                     "or budget/32)", int),
    }

    def call(self, gm: fx.GraphModule, ctx: OptimizeContext) -> PassResult:
        if ctx.flat_inputs:
            ir.refresh_meta(gm, ctx.flat_inputs)  # one fake mode for the whole graph
        kinds = _kinds(ctx)
        forced = self._forced_sizes(ctx)
        budget = ctx.memory_budget
        leaf_bytes = ctx.option("blocked_leaf_bytes")
        def planned(target: int | None) -> tuple[Plan, list[Declined]]:
            return plan_blocking(gm, target, ctx.device, kinds, forced, None if leaf_bytes is None else int(leaf_bytes),
                                 ctx.target.roofline_under_load(ctx.device))

        plan, declined = planned(budget)
        notes = list(plan.notes)
        if ctx.option("autotune") and ctx.args is not None and plan.module is not None:
            plan = self._autotune(gm, plan, budget, ctx, notes)
        summary: dict[str, Any] = {"budget_bytes": budget}
        if ctx.option("measure_peak", budget is not None) and ctx.args is not None:
            plan, check = keep_promise(gm, plan, budget, ctx.args, ctx.kwargs, lambda t: planned(t)[0],
                                       str(ctx.option("measure_memory", "allocator")))
            notes += check.notes()
            summary.update(check.summary())
        if not plan.configs or plan.module is None:
            return PassResult(gm, False, notes, declined)
        new = plan.module
        for name, cfg in plan.configs.items():
            notes.append(f"blocked {name}: {cfg.describe()}")
        notes.append(f"predicted peak after: {readable_bytes(plan.profile.peak_bytes)}"
                     + (f" (budget {readable_bytes(budget)})" if budget is not None else ""))
        summary.update(predicted_peak_after=plan.profile.peak_bytes, sites={n: c.describe() for n, c in plan.configs.items()})
        created = [n.name for n in new.graph.nodes
                   if n.op == "call_function" and getattr(n.target, "namespace", "") == "graphopt"]
        return PassResult(new, True, notes, declined, created, report_data={"blocked": summary})

    @staticmethod
    def _forced_sizes(ctx: OptimizeContext) -> dict[str, tuple[int, ...]]:
        forced: dict[str, tuple[int, ...]] = {}
        if ctx.option("block_q") is not None or ctx.option("block_kv") is not None:
            forced["attention"] = (int(ctx.option("block_q", 0) or 0), int(ctx.option("block_kv", 0) or 0))
        if ctx.option("block_ffn") is not None:
            forced["ffn"] = (int(ctx.option("block_ffn")),)
        if ctx.option("block_lm_head") is not None:
            forced["lm_head"] = (int(ctx.option("block_lm_head")),)
        if ctx.option("block_matmul") is not None:
            forced["matmul"] = (int(ctx.option("block_matmul")), 0, 0)
        return forced

    def _autotune(self, gm: fx.GraphModule, plan: Plan, budget: int | None, ctx: OptimizeContext,
                  notes: list[str]) -> Plan:
        """Time variants of the plan, group by group; keep what is measured fastest (and under the budget).

        Variants of a group: its three cheapest predicted configurations, and
        (without a budget) leaving it eager. Matmul sites are candidates here.
        """
        kinds = _kinds(ctx)
        sites, _ = find_blockable_sites(gm, kinds)
        planner = _Planner(gm, sites, BlockCostModel(ctx.device, ctx.target.roofline_under_load(ctx.device)),
                           int(ctx.option("blocked_leaf_bytes", default_leaf_bytes(budget))))
        target = int(budget * BUDGET_MARGIN) if budget is not None else None
        best = {g: plan.configs[g] for g in planner.groups if g in plan.configs}
        gm.recompile()
        eager_time = _time_module(gm, ctx)
        module, prof = planner.profile(best)
        module.recompile()
        best_time = _time_module(module, ctx) if best else eager_time
        if target is None and best_time > eager_time:
            best, best_time = {}, eager_time
        for g in planner.groups:
            variants: list[BlockConfig | None] = list(planner.candidates[g][:3])
            if target is None:
                variants.append(None)
            for cfg in variants:
                trial = {k: v for k, v in best.items() if k != g} | ({g: cfg} if cfg is not None else {})
                if trial == best:
                    continue
                module, prof = planner.profile(trial)
                if target is not None and prof.peak_bytes > target:
                    continue
                module.recompile()
                seconds = _time_module(module, ctx)
                if seconds < best_time:
                    best, best_time = trial, seconds
        notes.append(f"autotune: {best_time * 1e3:.1f} ms blocked vs {eager_time * 1e3:.1f} ms eager (measured)")
        if not best:
            return Plan({}, None, plan.profile, plan.notes)
        module, prof = planner.profile(best)
        return Plan(planner.expand(best), module, prof, plan.notes)
