"""Horizontal fusion: matmuls that share an input become one matmul and a split.

Rewrites (weights concatenated once, at optimize time, as new constants; the
user's tensors are never changed):

    q = linear(x, Wq, bq); k = linear(x, Wk, bk); v = linear(x, Wv, bv)
        -> qkv = linear(x, cat[Wq; Wk; Wv], cat[bq, bk, bv])
           q, k, v = split_with_sizes(qkv, [Nq, Nk, Nv], -1)      (views: no copy)
    g = linear(x, Wg); u = linear(x, Wu)   (gate/up of a SwiGLU FFN)
        -> gu = linear(x, cat[Wg; Wu]); g, u = split_with_sizes(gu, [Ng, Nu], -1)
    addmm(b1, x, W1), addmm(b2, x, W2)     (transformers Conv1D)
        -> addmm(cat[b1, b2], x, cat[W1, W2]) + split
    x @ W1, x @ W2.T                       (mm / matmul with constant weights)
        -> x @ cat[W1, W2.T] + split

A site missing a bias gets zeros in the merged bias (adding 0.0 is exact).

Applied only where it is faster on the target: by default a short
micro-benchmark (``measure_merge``) times the separate and the merged shapes
on ``ctx.device``, interleaved rounds with the best round per side kept, and
the merge is kept when it measures at least ``MERGE_MIN_SPEEDUP`` (1.05x,
option ``merge_min_speedup``) faster -- a smaller gain is timing noise and
would flip between runs; the report gives both timings; the
timings are kept per shape on the context (``ctx.target.timings``), so a
model with 32 identical layers measures once per ``optimize()`` call.
Option ``merge_matmuls_policy``: ``measure`` (default), ``always`` (merge
without measuring: never more FLOPs, the activation is read once), or
``off``. Without the option, when ``precision`` is ``int8``, ``fp8``,
``int8wo``, ``int4`` or ``auto``, groups are merged without measuring: the
precision pass quantizes each matmul's activation at run time (the
weight-only modes round it to bf16), and a merged group does it once
(on BERT-base in int8, separate q/k/v linears quantize the same tensor three
times). Tests inject the decision with ``MergeMatmuls(decide=...)``.

Declines (with the reason in the report):
    * the merged matmul measured slower, or faster by less than the margin
      (both timings and the ratio are given);
    * weights of different dtypes or devices;
    * an input of symbolic shape when measuring (nothing to time).
Sites with different inputs are never grouped.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx

from graphopt import ir, meta
from graphopt.opsets import erase_dead
from graphopt.pass_infra import OptimizeContext, Option, Pass, PassResult
from graphopt.passes.analysis.sites.linear import LinearSite, find_linear_sites
from graphopt.report import Declined
from graphopt.target.timing import TimingCache, time_alternating

log = logging.getLogger(__name__)
aten = torch.ops.aten

POLICIES = ("measure", "always", "off")
#: the merged matmul must measure at least this much faster than the separate ones to be kept:
#: below it the gain is within timing noise and the decision would flip between runs
MERGE_MIN_SPEEDUP = 1.05
#: precisions that quantize (weight-only: round to bf16) each matmul's activation at run time: merged, once
QUANTIZING_PRECISIONS = ("int8", "fp8", "int8wo", "int4", "auto")


@dataclass(frozen=True)
class MergeShape:
    """What the micro-benchmark needs to know about a group of matmuls."""

    rows: int  # rows of the activation (product of its leading dims)
    in_features: int
    out_features: tuple[int, ...]
    dtype: torch.dtype
    bias: bool
    device: str

    def describe(self) -> str:
        return f"{self.rows}x{self.in_features} @ {self.in_features}x{'+'.join(map(str, self.out_features))}"


@dataclass(frozen=True)
class MergeDecision:
    """Whether to merge one group; the timings behind it (seconds per call) when measured."""

    merge: bool
    reason: str
    separate_s: float | None = None
    merged_s: float | None = None

    @property
    def speedup(self) -> float | None:
        if self.separate_s is None or not self.merged_s:
            return None
        return self.separate_s / self.merged_s


@dataclass
class MergeCandidate:
    """A group of linear sites with the same input, as the decision function sees it."""

    sites: list[LinearSite]
    shape: MergeShape | None
    device: torch.device


def measure_merge(shape: MergeShape, rounds: int = 5, round_seconds: float = 2e-3,
                  budget_seconds: float = 0.25, timings: TimingCache | None = None) -> tuple[float, float]:
    """Time the separate matmuls against the merged one: (separate_s, merged_s) per call.

    Both are timed in alternating rounds (:func:`graphopt.target.timing.time_alternating`:
    the machine's load hits both alike); the best round of each is kept. Large
    shapes get fewer rounds so one measurement stays near ``budget_seconds``.
    ``timings``: where results are kept per shape and thread count (the
    pass's ``ctx.target.timings``; None: measured afresh).
    """
    timings = timings if timings is not None else TimingCache()
    return timings.get_or_measure((shape, torch.get_num_threads()),
                                  lambda: _time_merge(shape, rounds, round_seconds, budget_seconds))


def _time_merge(shape: MergeShape, rounds: int, round_seconds: float, budget_seconds: float) -> tuple[float, float]:
    device = torch.device(shape.device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape.rows, shape.in_features, generator=g).to(device, shape.dtype)
    ws = [torch.randn(n, shape.in_features, generator=g).to(device, shape.dtype) for n in shape.out_features]
    bs = [torch.randn(n, generator=g).to(device, shape.dtype) if shape.bias else None for n in shape.out_features]
    w_cat = torch.cat(ws)
    b_cat = torch.cat(bs) if shape.bias else None  # type: ignore[arg-type]
    sizes = list(shape.out_features)
    linear = torch.nn.functional.linear

    def separate() -> object:
        return [linear(x, w, b) for w, b in zip(ws, bs)]

    def merged() -> object:
        return linear(x, w_cat, b_cat).split(sizes, -1)

    with torch.no_grad():
        best_sep, best_merged = time_alternating([separate, merged], rounds, round_seconds, budget_seconds)
    log.info("merge_matmuls: %s on %s: separate %.1f us, merged %.1f us", shape.describe(), shape.device,
             best_sep * 1e6, best_merged * 1e6)
    return best_sep, best_merged


def measured_decision(candidate: MergeCandidate, timings: TimingCache | None = None,
                      min_speedup: float = MERGE_MIN_SPEEDUP) -> MergeDecision:
    """Merge when the micro-benchmark on the target says the merged matmul is at least ``min_speedup``
    times faster (``timings``: see :func:`measure_merge`); the reason states both timings and the margin."""
    if candidate.shape is None:
        return MergeDecision(False, "input shape is symbolic; nothing to measure "
                             "(set merge_matmuls_policy='always' to merge anyway)")
    separate_s, merged_s = measure_merge(candidate.shape, timings=timings)
    return margin_decision(separate_s, merged_s, min_speedup, candidate.shape.device)


def margin_decision(separate_s: float, merged_s: float, min_speedup: float = MERGE_MIN_SPEEDUP,
                    device: str = "cpu") -> MergeDecision:
    """Merge only when ``separate_s / merged_s >= min_speedup``; the reason names both timings."""
    ratio = separate_s / merged_s if merged_s > 0 else float("inf")
    timing = f"merged {merged_s * 1e6:.1f} us vs separate {separate_s * 1e6:.1f} us on {device}"
    if ratio >= min_speedup:
        return MergeDecision(True, f"{timing}: {ratio:.2f}x >= {min_speedup:.2f}x", separate_s, merged_s)
    verdict = "merged matmul measured slower" if ratio < 1.0 else "gain within the margin"
    return MergeDecision(False, f"{verdict}: {timing}: {ratio:.2f}x < {min_speedup:.2f}x "
                         f"(option merge_min_speedup)", separate_s, merged_s)


def _check_min_speedup(value: float) -> str | None:
    if not value >= 1.0 or value == float("inf"):  # also refuses nan
        return "give a finite ratio >= 1.0 (1.0: merge at any measured gain)"
    return None


def _group_label(sites: list[LinearSite]) -> str:
    paths = [s.label for s in sites]
    prefix = paths[0].rsplit(".", 1)[0] if "." in paths[0] else ""
    if prefix and all(p.startswith(prefix + ".") for p in paths):
        return prefix + "." + "+".join(p[len(prefix) + 1:] for p in paths)
    return "+".join(paths)


def _shape_of_group(sites: list[LinearSite], device: torch.device, gm: fx.GraphModule) -> MergeShape | None:
    x_shape = ir.shape_of(sites[0].input)
    if x_shape is None:
        return None
    rows = 1
    for s in x_shape[:-1]:
        rows *= s
    w = ir.get_attr_value(gm, sites[0].weight)
    return MergeShape(rows, sites[0].in_features, tuple(s.out_features for s in sites), w.dtype,
                      any(s.bias is not None for s in sites), str(device))


def _groups(gm: fx.GraphModule) -> list[list[LinearSite]]:
    by_input: dict[tuple[fx.Node, str], list[LinearSite]] = {}
    for site in find_linear_sites(gm):
        family = "addmm" if site.kind == "addmm" else "linear" if site.kind == "linear" else "matmul"
        by_input.setdefault((site.input, family), []).append(site)
    return [sites for sites in by_input.values() if len(sites) >= 2]


def _incompatible(gm: fx.GraphModule, sites: list[LinearSite]) -> str:
    weights = [ir.get_attr_value(gm, s.weight) for s in sites]
    if len({w.dtype for w in weights}) > 1:
        return f"weights of different dtypes ({', '.join(sorted({str(w.dtype) for w in weights}))})"
    if len({w.device for w in weights}) > 1:
        return "weights on different devices"
    biases = [ir.get_attr_value(gm, s.bias) for s in sites if s.bias is not None]
    if any(b.dtype != weights[0].dtype for b in biases):
        return "bias dtype differs from the weight dtype"
    return ""


def _merge(gm: fx.GraphModule, sites: list[LinearSite], label: str) -> fx.Node:
    """Replace ``sites`` by one matmul and a split; return the merged node."""
    graph = gm.graph
    kind = sites[0].kind
    effective = [s.effective_weight(gm) for s in sites]  # (in, out) each
    like = effective[0]
    if kind == "linear":
        weight = torch.cat([e.t() for e in effective], 0).contiguous()  # (out, in) as aten.linear wants
    else:
        weight = torch.cat(effective, 1).contiguous()
    bias = None
    if any(s.bias is not None for s in sites):
        parts = [s.bias_value(gm) if s.bias is not None else torch.zeros(s.out_features, dtype=like.dtype,
                                                                            device=like.device)
                 for s in sites]
        bias = torch.cat([p.detach() for p in parts]).contiguous()
    sizes = [s.out_features for s in sites]
    first = sites[0].node
    with graph.inserting_before(first):
        w_node = graph.get_attr(ir.register_constant(gm, label + ".weight", weight.detach()))
        b_node = graph.get_attr(ir.register_constant(gm, label + ".bias", bias)) if bias is not None else None
        x = sites[0].input
        if kind == "linear":
            merged = graph.call_function(aten.linear.default, (x, w_node) + ((b_node,) if b_node else ()))
        elif kind == "addmm":
            merged = graph.call_function(aten.addmm.default, (b_node, x, w_node))
        else:
            mm = graph.call_function(aten.mm.default if kind == "mm" else aten.matmul.default, (x, w_node))
            merged = graph.call_function(aten.add.Tensor, (mm, b_node)) if b_node is not None else mm
        split = graph.call_function(aten.split_with_sizes.default, (merged, sizes, -1))
        pieces = [graph.call_function(operator.getitem, (split, i)) for i in range(len(sites))]
    for node in (w_node, merged, split, *pieces):
        node.meta.update({k: v for k, v in first.meta.items() if k in ("nn_module_stack", "stack_trace")})
    merged.meta[meta.MERGED_FROM] = label  # how the tensor-parallel plan and the report name it
    for site, piece in zip(sites, pieces):
        site.node.replace_all_uses_with(piece)
        graph.erase_node(site.node)
    return merged


class MergeMatmuls(Pass):
    name = "merge_matmuls"
    summary = "merge matmuls that share an input (q/k/v, gate/up) into one matmul and a split, where faster"
    options = {
        "merge_matmuls_policy": Option("'measure' (default: merge where a micro-benchmark on the device is "
                                       "faster; under int8/fp8/auto precision: merge), 'always' or 'off'",
                                       str, None, POLICIES),
        "merge_min_speedup": Option(f"the least measured speedup (separate / merged time) at which the "
                                    f"'measure' policy merges a group (default {MERGE_MIN_SPEEDUP}: gains "
                                    f"below it are timing noise)", float, MERGE_MIN_SPEEDUP,
                                    check=_check_min_speedup),
    }

    def __init__(self, decide: Callable[[MergeCandidate], MergeDecision] | None = None) -> None:
        self.decide = decide

    def _decider(self, ctx: OptimizeContext) -> Callable[[MergeCandidate], MergeDecision] | None:
        if self.decide is not None:
            return self.decide
        policy = ctx.option("merge_matmuls_policy")
        if policy is None and ctx.option("precision") in QUANTIZING_PRECISIONS:
            reason = (f"precision={ctx.option('precision')!r}: the shared activation is quantized once "
                      f"for the merged matmul instead of once per matmul")
            return lambda c: MergeDecision(True, reason)
        policy = policy or "measure"
        if policy == "off":
            return None
        if policy == "always":
            return lambda c: MergeDecision(True, "policy 'always'")
        min_speedup = self.option(ctx, "merge_min_speedup")
        return lambda candidate: measured_decision(candidate, ctx.target.timings, min_speedup)

    def call(self, gm: fx.GraphModule, ctx: OptimizeContext) -> PassResult:
        decide = self._decider(ctx)
        if decide is None:
            return PassResult(gm, False, ["merge_matmuls_policy='off'"])
        notes: list[str] = []
        declined: list[Declined] = []
        involved: list[str] = []
        for sites in _groups(gm):
            label = _group_label(sites)
            reason = _incompatible(gm, sites)
            if reason:
                declined.append(Declined(label, reason))
                continue
            decision = decide(MergeCandidate(sites, _shape_of_group(sites, ctx.device, gm), ctx.device))
            if not decision.merge:
                declined.append(Declined(label, decision.reason))
                continue
            merged = _merge(gm, sites, label)
            involved.append(merged.name)
            notes.append(f"merged {len(sites)} matmuls at {label} ({decision.reason})")
        if involved:
            erase_dead(gm)
        return PassResult(gm, bool(involved), notes, declined, involved)
