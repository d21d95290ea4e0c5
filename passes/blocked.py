"""Blocked operators sized by a memory budget (pass ``blocked``).

Rewrites (each site only where the planner chooses it):
    matmul(q, k^T) * s + bias (+ ...) [masked] -> softmax -> matmul v
        -> graphopt.blocked_attention(q, k, v, bias, mask, fill, s, q_block, kv_block)
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
liveness analysis over node order (:mod:`..analysis.activation_liveness`,
views share storage, blocked operators' working memory included) -- must come
under the budget (with a 10% margin for the allocator). Greedily, while the
predicted peak is over: every site not yet blocked is tried with its
configurations from least predicted slowdown to smallest memory
(:class:`graphopt.blocked_cost.BlockCostModel`, Pareto-pruned; binary search
on the re-analysed graph); a site that alone meets the budget at the least
slowdown wins, otherwise the one lowering the peak most (or, when no single
site lowers it -- a bias shared by every layer -- all remaining sites at once).
Then each chosen site is relaxed to the cheapest configuration that still
meets the budget. The report gives the predicted peak before and after and,
measured on the example inputs (:func:`graphopt.peak_memory.measure_peak`),
the real peak before and after. A budget no plan meets raises
:class:`BudgetError` with the smallest reachable peak.

Without a budget a site is blocked only where the cost model predicts it
faster; with ``autotune=True`` the candidates are timed on the example inputs
and only what is measured faster is kept.

Declines: attention whose probabilities or scores are used elsewhere (returned
attention weights), scores scaled after the bias, masks with a finite fill
before a bias, FFN activations graphopt does not know, LM-head logits that are
also returned, sites of kinds excluded by ``blocked_kinds``; sites the plan
does not need.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from graphopt import ir
from graphopt.blocked_cost import BlockConfig, BlockCostModel
from graphopt.blocked_rewrites import apply_block_config, bias_plan, remap_site
from graphopt.node_builder import fake_mode_of
from graphopt.pass_infra import OptimizeContext, Pass, PassResult
from graphopt.passes.analysis.activation_liveness import MemoryProfile, memory_profile
from graphopt.passes.analysis.blockable_sites import AttentionSite, BlockableSite, find_blockable_sites
from graphopt.peak_memory import measure_peak
from graphopt.report import Declined
from graphopt.row_slicing import DEFAULT_LEAF_BYTES, RowSlicer

log = logging.getLogger(__name__)

__all__ = ["BlockedOperators", "BudgetError", "Plan", "plan_blocking"]

#: plan to this fraction of the budget: the allocator and kernels' own temporaries need room
BUDGET_MARGIN = 0.9
KINDS = ("attention", "ffn", "lm_head", "matmul")
_SIZE_OPTIONS = {"attention": ("block_q", "block_kv"), "ffn": ("block_ffn",), "lm_head": ("block_lm_head",),
                 "matmul": ("block_matmul",)}


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


class BudgetError(ValueError):
    """No blocking plan brings the predicted peak under the memory budget.

    ``budget`` and ``reachable`` (the smallest predicted peak any plan
    reaches) are in bytes; ``peak_node`` is where that peak is. The pass
    manager lets this error through (``abort_pipeline``) instead of rolling
    the pass back, so ``optimize()`` raises it.
    """

    abort_pipeline = True

    def __init__(self, budget: int, reachable: int, peak_node: str, live: list[tuple[str, int]]) -> None:
        self.budget, self.reachable, self.peak_node, self.live = budget, reachable, peak_node, live
        top = ", ".join(f"{name} {_mib(b)}" for name, b in live[:4])
        super().__init__(
            f"memory budget {_mib(budget)} cannot be met: the smallest peak reachable by blocking is "
            f"{_mib(reachable)} (at node {peak_node}; live there: {top}). Raise the budget to at least "
            f"{_mib(reachable / BUDGET_MARGIN)}, or reduce the batch or sequence length."
        )


@dataclass
class Plan:
    """Which sites to block and how; the graph it gives and its predicted profile."""

    configs: dict[str, BlockConfig] = field(default_factory=dict)
    module: fx.GraphModule | None = None
    profile: MemoryProfile | None = None
    notes: list[str] = field(default_factory=list)


class _Planner:
    """Materialises plans on copies of the graph and searches for a cheap one under the budget."""

    def __init__(self, gm: fx.GraphModule, sites: list[BlockableSite], cost: BlockCostModel,
                 leaf_bytes: int = DEFAULT_LEAF_BYTES) -> None:
        self.gm = gm
        self.sites = {s.name: s for s in sites}
        self.cost = cost
        self.leaf_bytes = leaf_bytes
        self.fake_mode = fake_mode_of(gm)
        self.candidates = {s.name: cost.candidates(s) for s in sites}
        self.trials = 0

    def apply(self, base: fx.GraphModule, configs: dict[str, BlockConfig]) -> fx.GraphModule:
        """A copy of ``base`` with the sites in ``configs`` (found in ``self.gm``) blocked."""
        gm = ir.copy_graph_module(base)
        by_name = {n.name: n for n in gm.graph.nodes}
        for name, cfg in configs.items():
            apply_block_config(gm, remap_site(self.sites[name], by_name), cfg, self.fake_mode, self.leaf_bytes)
        gm.graph.eliminate_dead_code()
        return gm

    def profile(self, configs: dict[str, BlockConfig], base: fx.GraphModule | None = None,
                base_configs: dict[str, BlockConfig] | None = None) -> tuple[fx.GraphModule, MemoryProfile]:
        self.trials += 1
        if base is None:
            gm = self.apply(self.gm, configs)
        else:
            extra = {k: v for k, v in configs.items() if k not in (base_configs or {})}
            gm = self.apply(base, extra)
        return gm, memory_profile(gm)

    def slowdown(self, name: str, cfg: BlockConfig) -> float:
        site = self.sites[name]
        return self.cost.blocked_seconds(site, cfg) - self.cost.eager_seconds(site)

    def search(self, target: int, forced: dict[str, BlockConfig]) -> Plan:
        configs = dict(forced)
        cur, prof = self.profile(configs)
        free = [n for n in self.sites if n not in configs and self.candidates[n]]
        while prof.peak_bytes > target and free:
            options = []  # (meets, peak, slowdown, name, cfg)
            for name in free:
                cands = self.candidates[name]
                peaks: dict[int, int] = {}

                def peak_at(i: int) -> int:
                    if i not in peaks:
                        peaks[i] = self.profile({**configs, name: cands[i]}, cur, configs)[1].peak_bytes
                    return peaks[i]

                last = len(cands) - 1
                if peak_at(last) <= target:
                    lo, hi = 0, last
                    while lo < hi:  # first (cheapest) configuration meeting the target
                        mid = (lo + hi) // 2
                        if peak_at(mid) <= target:
                            hi = mid
                        else:
                            lo = mid + 1
                    options.append((True, peak_at(lo), self.slowdown(name, cands[lo]), name, cands[lo]))
                else:
                    options.append((False, peak_at(last), self.slowdown(name, cands[last]), name, cands[last]))
            meeting = [o for o in options if o[0]]
            if meeting:
                _, _, _, name, cfg = min(meeting, key=lambda o: o[2])
                configs[name] = cfg
            else:
                best = min(options, key=lambda o: (o[1], o[2]))
                if best[1] < prof.peak_bytes:
                    configs[best[3]] = best[4]
                else:  # no single site lowers the peak: a value shared by several sites holds it
                    together = {**configs, **{n: self.candidates[n][-1] for n in free}}
                    _, together_prof = self.profile(together)
                    if together_prof.peak_bytes >= prof.peak_bytes:
                        break
                    configs = together
            cur, prof = self.profile(configs)
            free = [n for n in free if n not in configs]
        if prof.peak_bytes <= target:
            configs = self.relax(configs, forced, target)
            cur, prof = self.profile(configs)
        return Plan(configs, cur, prof)

    def relax(self, configs: dict[str, BlockConfig], forced: dict[str, BlockConfig], target: int) \
            -> dict[str, BlockConfig]:
        """Give each chosen site the cheapest configuration that keeps the peak under ``target``."""
        configs = dict(configs)
        for name in [n for n in configs if n not in forced]:
            cands = self.candidates[name]
            current = cands.index(configs[name]) if configs[name] in cands else len(cands) - 1
            for i in range(current):
                trial = {**configs, name: cands[i]}
                if self.profile(trial)[1].peak_bytes <= target:
                    configs = trial
                    break
        # a site the rest of the plan made unnecessary is dropped
        for name in [n for n in configs if n not in forced]:
            trial = {k: v for k, v in configs.items() if k != name}
            if self.profile(trial)[1].peak_bytes <= target:
                configs = trial
        return configs

    def minimum(self, forced: dict[str, BlockConfig]) -> MemoryProfile:
        """The profile with every site at its smallest configuration."""
        configs = {**{n: c[-1] for n, c in self.candidates.items() if c}, **forced}
        return self.profile(configs)[1]


def plan_blocking(gm: fx.GraphModule, budget: int | None, device: torch.device | None = None,
                  kinds: tuple[str, ...] = KINDS, forced_sizes: dict[str, tuple[int, ...]] | None = None,
                  leaf_bytes: int = DEFAULT_LEAF_BYTES) -> tuple[Plan, list[Declined]]:
    """Choose the sites to block in ``gm`` (which must carry ``meta["val"]``) and their block sizes.

    ``budget`` in bytes (None: block only where predicted faster).
    ``forced_sizes`` {kind: sizes} blocks every site of that kind with those sizes.
    Raises :class:`BudgetError` when no plan meets the budget.
    """
    cost = BlockCostModel(device)
    sites, declined = find_blockable_sites(gm)
    forced_sizes = forced_sizes or {}
    usable = []
    for s in sites:
        if s.kind not in kinds and s.kind not in forced_sizes:
            if s.kind != "matmul":
                declined.append(Declined(s.name, f"{s.kind} sites are not in blocked_kinds"))
            continue
        if s.kind == "matmul" and "matmul" not in forced_sizes:
            continue  # plain matmuls: blocked on request (block_matmul) or by autotune
        usable.append(s)
    planner = _Planner(gm, usable, cost, leaf_bytes)
    forced = {s.name: BlockConfig(s.kind, forced_sizes[s.kind]) for s in usable if s.kind in forced_sizes}
    before = memory_profile(gm)
    notes = [f"predicted peak before: {_mib(before.peak_bytes)} at {before.peak_node.name if before.peak_node else '-'}"]
    for s in usable:
        if isinstance(s, AttentionSite):
            plan = bias_plan(s, RowSlicer(gm, leaf_bytes))
            kept = [t.name for t, how in plan.items() if how == "keep"]
            if kept:
                reason = RowSlicer(gm, leaf_bytes)
                why = "; ".join(reason.why_not(t, len(ir.shape_of(t)) - 2) for t, how in plan.items() if how == "keep")
                notes.append(f"{s.name}: bias {', '.join(kept)} kept whole (not recomputable: {why})")
    if budget is None:
        configs = dict(forced)
        for s in usable:
            if s.name in configs or not planner.candidates[s.name]:
                continue
            best = planner.candidates[s.name][0]
            eager, blocked = cost.eager_seconds(s), cost.blocked_seconds(s, best)
            if blocked < 0.95 * eager:
                configs[s.name] = best
            else:
                declined.append(Declined(s.name, f"{s.describe()}: blocking not predicted faster "
                                         f"({blocked * 1e3:.2f} ms vs {eager * 1e3:.2f} ms eager) and no memory budget"))
        result_gm, prof = planner.profile(configs)
        result = Plan(configs, result_gm, prof, notes)
    else:
        target = int(budget * BUDGET_MARGIN)
        if before.peak_bytes <= target and not forced:
            notes.append(f"already under the budget {_mib(budget)}: nothing to block")
            return Plan({}, None, before, notes), declined
        result = planner.search(target, forced)
        if result.profile.peak_bytes > target:
            low = planner.minimum(forced)
            if low.peak_bytes > target:
                live = [(n.name, b) for n, b in low.live_at_peak]
                raise BudgetError(budget, low.peak_bytes, low.peak_node.name if low.peak_node else "-", live)
            result = Plan({n: c[-1] for n, c in planner.candidates.items() if c} | forced, None, low)
            result.module, result.profile = planner.profile(result.configs)
        result.notes = notes
    for name in planner.sites:
        if name not in result.configs and budget is not None:
            declined.append(Declined(name, f"{planner.sites[name].describe()}: not needed to meet the budget"))
    log.debug("blocked planner: %d trials", planner.trials)
    return result, declined


def _time_module(gm: fx.GraphModule, ctx: OptimizeContext, repeats: int = 3) -> float:
    times = []
    with torch.no_grad():
        gm(*ctx.args, **ctx.kwargs)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            gm(*ctx.args, **ctx.kwargs)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


class BlockedOperators(Pass):
    """Rewrite attention, FFNs, LM heads and matmuls into blocked operators to fit a memory budget."""

    name = "blocked"
    summary = "block attention / FFN / LM head / matmul so peak memory fits memory_budget"
    options = {
        "autotune": "time candidate blockings on the example inputs and keep the fastest (bool)",
        "block_q": "query rows per block for blocked attention (forces blocking of every attention site)",
        "block_kv": "keys per block for blocked attention (0: all keys, one softmax; with block_q)",
        "block_ffn": "token rows per chunk for chunked FFNs (forces blocking of every FFN site)",
        "block_lm_head": "token rows per chunk for chunked LM heads (forces every LM head + reduction)",
        "block_matmul": "output rows per block for blocked linear/matmul (forces every matmul)",
        "blocked_kinds": "site kinds the planner may block: comma list of attention,ffn,lm_head,matmul",
        "measure_peak": "measure the real peak memory before and after (default: when a budget is set)",
        "blocked_leaf_bytes": "attention biases/masks larger than this are recomputed per query block instead "
                              "of kept whole, when their producers allow (bytes, default 1 MiB)",
    }

    def call(self, gm: fx.GraphModule, ctx: OptimizeContext) -> PassResult:
        if ctx.flat_inputs:
            ir.refresh_meta(gm, ctx.flat_inputs)  # one fake mode for the whole graph
        kinds = tuple(k.strip() for k in str(ctx.option("blocked_kinds", ",".join(KINDS))).split(",") if k.strip())
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"blocked_kinds: unknown kind(s) {sorted(unknown)}; choose from {', '.join(KINDS)}")
        forced = self._forced_sizes(ctx)
        budget = ctx.memory_budget
        leaf_bytes = int(ctx.option("blocked_leaf_bytes", DEFAULT_LEAF_BYTES))
        plan, declined = plan_blocking(gm, budget, ctx.device, kinds, forced, leaf_bytes)
        notes = list(plan.notes)
        if ctx.option("autotune") and ctx.args is not None and plan.module is not None:
            plan = self._autotune(gm, plan, budget, ctx, notes)
        if not plan.configs or plan.module is None:
            return PassResult(gm, False, notes, declined)
        new = plan.module
        for name, cfg in plan.configs.items():
            notes.append(f"blocked {name}: {cfg.describe()}")
        notes.append(f"predicted peak after: {_mib(plan.profile.peak_bytes)}"
                     + (f" (budget {_mib(budget)})" if budget is not None else ""))
        summary: dict[str, Any] = {
            "budget_bytes": budget,
            "predicted_peak_after": plan.profile.peak_bytes,
            "sites": {n: c.describe() for n, c in plan.configs.items()},
        }
        if ctx.option("measure_peak", budget is not None) and ctx.args is not None:
            new.recompile()
            with torch.no_grad():
                before = measure_peak(gm, *ctx.args, device=ctx.device, **ctx.kwargs)
                after = measure_peak(new, *ctx.args, device=ctx.device, **ctx.kwargs)
            notes.append(f"measured peak: {_mib(before.bytes)} -> {_mib(after.bytes)} ({after.method})")
            summary.update(measured_peak_before=before.bytes, measured_peak_after=after.bytes,
                           measure_method=after.method)
            if budget is not None and after.bytes > budget:
                log.warning("blocked: measured peak %s is over the budget %s although %s was predicted",
                            _mib(after.bytes), _mib(budget), _mib(plan.profile.peak_bytes))
        ctx.report.extra["blocked"] = summary
        created = [n.name for n in new.graph.nodes
                   if n.op == "call_function" and getattr(n.target, "namespace", "") == "graphopt"]
        return PassResult(new, True, notes, declined, created)

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
        """Time variants of the plan per site kind; keep what is measured fastest (and under the budget)."""
        sites, _ = find_blockable_sites(gm)
        planner = _Planner(gm, sites, BlockCostModel(ctx.device),
                           int(ctx.option("blocked_leaf_bytes", DEFAULT_LEAF_BYTES)))
        target = int(budget * BUDGET_MARGIN) if budget is not None else None
        best_configs = dict(plan.configs)
        gm.recompile()
        best_time = _time_module(self._apply_all(planner, best_configs), ctx)
        eager_time = _time_module(gm, ctx)
        if target is None and best_time > eager_time:
            best_configs, best_time = {}, eager_time
        kinds = tuple(k.strip() for k in str(ctx.option("blocked_kinds", ",".join(KINDS))).split(","))
        for kind in kinds:
            kind_sites = [s for s in sites if s.kind == kind]
            if not kind_sites:
                continue
            variants = []
            for rank in range(3):  # the k-th cheapest predicted configuration at every site of this kind
                cfgs = {s.name: planner.candidates[s.name][min(rank, len(planner.candidates[s.name]) - 1)]
                        for s in kind_sites if planner.candidates[s.name]}
                variants.append(cfgs)
            if target is None:
                variants.append({})  # this kind left eager
            for variant in variants:
                configs = {k: v for k, v in best_configs.items() if self._kind_of(planner, k) != kind} | variant
                if configs == best_configs:
                    continue
                trial_gm, prof = planner.profile(configs)
                if target is not None and prof.peak_bytes > target:
                    continue
                trial_gm.recompile()
                seconds = _time_module(trial_gm, ctx)
                if seconds < best_time:
                    best_configs, best_time = configs, seconds
        notes.append(f"autotune: {best_time * 1e3:.1f} ms blocked vs {eager_time * 1e3:.1f} ms eager (measured)")
        if not best_configs:
            return Plan({}, None, plan.profile, plan.notes)
        module, prof = planner.profile(best_configs)
        return Plan(best_configs, module, prof, plan.notes)

    @staticmethod
    def _kind_of(planner: _Planner, name: str) -> str:
        site = planner.sites.get(name)
        return site.kind if site is not None else ""

    @staticmethod
    def _apply_all(planner: _Planner, configs: dict[str, BlockConfig]) -> fx.GraphModule:
        gm = planner.apply(planner.gm, configs)
        gm.recompile()
        return gm
