"""Block configurations for blockable sites and their predicted cost (time and working memory).

A :class:`BlockConfig` is one way to block a site: ``(q_block, kv_block)`` for
attention, ``(chunk,)`` for an FFN or LM head, ``(rows, cols, k)`` for a
matmul; ``0`` means "the whole dimension".

:class:`BlockCostModel` predicts seconds with a small roofline-style model:
FLOPs at a sustained rate, bytes of the large intermediates at DRAM bandwidth
(or cache bandwidth when a tile fits in cache), a dispatch cost per op call,
and -- on CPU -- the first-touch cost of large fresh allocations (the
allocator returns big blocks to the OS, so eager attention pays page faults
for every ``T x T`` tensor on every call). Its figures are a
:class:`graphopt.target.Roofline` measured under the current load
(:func:`graphopt.target.measure_under_load`; round figures on CUDA); the
model itself is deliberately coarse, and ``autotune=True`` measures instead. The planner only uses the model to
*rank* configurations (least predicted slowdown first) and, without a memory
budget, to block a site only when it predicts a speed-up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from graphopt import ir
from graphopt.ops._blocking import n_blocks
from graphopt.ops.blocked_attention import attention_workspace_bytes
from graphopt.ops.chunked_ffn import ffn_workspace_bytes
from graphopt.ops.chunked_lm_head import lm_head_workspace_bytes
from graphopt.passes.analysis.blockable_sites import BlockableSite, FFNChain, LMHeadSite, MatmulSite
from graphopt.passes.analysis.sites import AttentionSite
from graphopt.target import Roofline, measure_under_load

__all__ = ["BlockConfig", "BlockCostModel"]

#: allocations above this size are mmapped (and page-faulted) afresh by glibc on every call
_MMAP_BYTES = 32 << 20


@dataclass(frozen=True)
class BlockConfig:
    """How to block one site: ``kind`` and its block sizes (0: whole dimension)."""

    kind: str
    sizes: tuple[int, ...]

    def describe(self) -> str:
        names = {"attention": ("q_block", "kv_block"), "ffn": ("chunk",), "lm_head": ("chunk",),
                 "matmul": ("rows", "cols", "k")}[self.kind]
        return ", ".join(f"{n}={'all' if s <= 0 else s}" for n, s in zip(names, self.sizes))


def _pow2_below(n: int, lowest: int) -> list[int]:
    """Powers of two < n, from the largest down to ``lowest``."""
    out, p = [], 1 << max(int(math.log2(max(n - 1, 1))), 0)
    while p >= lowest:
        if p < n:
            out.append(p)
        p //= 2
    return out


class BlockCostModel:
    """Predicted seconds and working bytes of a site, eager or blocked by a :class:`BlockConfig`."""

    def __init__(self, device: torch.device | None = None, roofline: Roofline | None = None) -> None:
        self.device = device or torch.device("cpu")
        self.m = roofline or measure_under_load(self.device)
        self.flops = self.m.peak_for(torch.float32)  # sustained FLOP/s of a large fp32 matmul

    # ------------------------------------------------------------ helpers
    def _traffic(self, nbytes: float, tile_bytes: float) -> float:
        in_cache = tile_bytes <= self.m.cache_bytes and self.m.cache_bandwidth > 0
        bw = self.m.cache_bandwidth if in_cache else self.m.mem_bandwidth
        return nbytes / bw

    def _faults(self, tile_bytes: float, count: float) -> float:
        return tile_bytes * count * self.m.fault_s_per_byte if tile_bytes >= _MMAP_BYTES else 0.0

    def _matmul_eff(self, *dims: int) -> float:
        return math.prod(min(1.0, d / 128) for d in dims)

    # ------------------------------------------------------------ candidates
    def candidates(self, site: BlockableSite) -> list[BlockConfig]:
        """Configurations worth trying, cheapest predicted first (Pareto-pruned on working memory)."""
        if isinstance(site, AttentionSite):
            # at most 32 query blocks: a bias recomputed per block unrolls that many copies into the graph
            qs = [0] + _pow2_below(site.tq, max(min(16, site.tq // 2), site.tq // 32, 1))
            kvs = [0] + _pow2_below(site.tk, max(min(128, site.tk // 2), 1))
            configs = [BlockConfig("attention", (q, kv)) for q in qs for kv in kvs if (q, kv) != (0, 0)]
        elif isinstance(site, FFNChain):
            configs = [BlockConfig("ffn", (c,)) for c in _pow2_below(site.rows, max(min(16, site.rows // 2), 1))]
        elif isinstance(site, LMHeadSite):
            configs = [BlockConfig("lm_head", (c,)) for c in _pow2_below(site.rows, 1)]
        else:
            rows = _output_rows(site)
            configs = [BlockConfig("matmul", (r, 0, 0)) for r in _pow2_below(rows, 16)]
        scored = sorted(configs, key=lambda c: (self.blocked_seconds(site, c), self.working_bytes(site, c)))
        frontier, best_bytes = [], math.inf
        for c in scored:
            b = self.working_bytes(site, c)
            if b < best_bytes:
                frontier.append(c)
                best_bytes = b
        return frontier

    # ------------------------------------------------------------ working memory
    def working_bytes(self, site: BlockableSite, cfg: BlockConfig | None) -> int:
        """Bytes the site needs at once beyond its inputs and output (``cfg`` None: eager)."""
        if isinstance(site, AttentionSite):
            batch_heads = math.prod(ir.shape_of(site.scores)[:-2])
            dv = ir.shape_of(site.v_operand)[-1]
            if cfg is None:
                return 3 * site.scores_bytes
            q, kv = cfg.sizes
            rows = site.tq if q <= 0 else min(q, site.tq)
            bias_rows = sum(_row_bytes(b, site.tq) * rows for b in site.biases if _is_full(b, site))
            return attention_workspace_bytes(batch_heads, site.tq, site.tk, dv, q, kv, torch.float32) + bias_rows
        if isinstance(site, FFNChain):
            d_out = site.lin_out.out_features
            item = _itemsize(site.output)
            if cfg is None:
                return site.rows * site.hidden * item * (4 if site.lin_gate is not None else 2)
            return ffn_workspace_bytes(site.rows, site.hidden, d_out, cfg.sizes[0], site.lin_gate is not None,
                                       _dtype(site.output))
        if isinstance(site, LMHeadSite):
            item = 4 if site.upcast else _itemsize(site.head.node)
            if cfg is None:
                return site.rows * site.vocab * item * (1 if site.normalize == "none" else 2)
            return lm_head_workspace_bytes(site.rows, site.vocab, cfg.sizes[0], site.normalize,
                                           torch.float32 if site.upcast else _dtype(site.head.node))
        val = ir.tensor_meta(site.output)
        if val is None:
            return 0
        if cfg is None:
            return 0
        rows = _output_rows(site)
        return int(val.numel() * val.element_size() / max(rows, 1) * min(rows, cfg.sizes[0] or rows))

    # ------------------------------------------------------------ time
    def eager_seconds(self, site: BlockableSite) -> float:
        m = self.m
        if isinstance(site, AttentionSite):
            big = site.scores_bytes
            n_big = 2 + len(site.between_products)  # scores, chain results, probabilities
            return (self._flops(site) / self.flops + self._traffic(2 * big * n_big, big)
                    + self._faults(big, n_big) + (n_big + 2) * m.op_overhead_s)
        if isinstance(site, FFNChain):
            inter = site.rows * site.hidden * _itemsize(site.output)
            n_big = 4 if site.lin_gate is not None else 2
            return (self._flops(site) / self.flops + self._traffic(2 * inter * n_big, inter)
                    + self._faults(inter, n_big) + 4 * m.op_overhead_s)
        if isinstance(site, LMHeadSite):
            logits = site.rows * site.vocab * (4 if site.upcast else _itemsize(site.head.node))
            n_big = 1 + (site.normalize != "none") + site.upcast
            return (self._flops(site) / self.flops + self._traffic(2 * logits * n_big, logits)
                    + self._faults(logits, n_big) + 4 * m.op_overhead_s)
        return self._flops(site) / self.flops + m.op_overhead_s

    def blocked_seconds(self, site: BlockableSite, cfg: BlockConfig) -> float:
        m = self.m
        if isinstance(site, AttentionSite):
            q, kv = cfg.sizes
            nq, nk = n_blocks(site.tq, q), n_blocks(site.tk, kv)
            rows, keys = math.ceil(site.tq / nq), math.ceil(site.tk / nk)
            batch_heads = math.prod(ir.shape_of(site.scores)[:-2])
            tile = batch_heads * rows * keys * 4
            passes = 4 if nk == 1 else 7  # online softmax: max, exp, correction, sum, accumulate
            ops_per_tile = 6 if nk == 1 else 14
            recompute = sum(self._recompute_seconds(b, site) for b in site.biases if _is_full(b, site))
            eff = self._matmul_eff(rows, keys)
            return (self._flops(site) / (self.flops * eff) + self._traffic(2 * tile * passes * nq * nk, tile)
                    + self._faults(tile, 2 * nq * nk) + nq * nk * ops_per_tile * m.op_overhead_s + recompute)
        # FFN and LM head: matmul-bound, and a small row block makes a less efficient matmul, so their
        # intermediates are charged at DRAM bandwidth whatever the tile: only page faults and per-call
        # overheads separate the chunk sizes (the largest chunk that is not mmapped afresh wins).
        if isinstance(site, FFNChain):
            c = cfg.sizes[0] if cfg.sizes[0] > 0 else site.rows
            n = n_blocks(site.rows, c)
            tile = min(c, site.rows) * site.hidden * _itemsize(site.output)
            n_big = 4 if site.lin_gate is not None else 2
            return (self._flops(site) / (self.flops * self._matmul_eff(min(c, site.rows))) +
                    2 * tile * n_big * n / m.mem_bandwidth + self._faults(tile, n_big * n) + 6 * n * m.op_overhead_s)
        if isinstance(site, LMHeadSite):
            c = cfg.sizes[0] if cfg.sizes[0] > 0 else site.rows
            n = n_blocks(site.rows, c)
            tile = min(c, site.rows) * site.vocab * (4 if site.upcast else _itemsize(site.head.node))
            n_big = 1 + (site.normalize != "none") + site.upcast
            return (self._flops(site) / (self.flops * self._matmul_eff(min(c, site.rows))) +
                    2 * tile * n_big * n / m.mem_bandwidth + self._faults(tile, n_big * n) + 5 * n * m.op_overhead_s)
        rows = _output_rows(site)
        n = n_blocks(rows, cfg.sizes[0])
        eff = self._matmul_eff(min(rows, cfg.sizes[0] or rows))
        return self._flops(site) / (self.flops * eff) + 2 * n * m.op_overhead_s

    def _recompute_seconds(self, bias: torch.fx.Node, site: AttentionSite) -> float:
        # a bias recomputed per query block, per layer: a gather from a relative-position table and an add
        # (T5); a longer elementwise chain when the bias is not relative -- charged a few passes over it
        return 3 * 2 * _row_bytes(bias, site.tq) * site.tq / self.m.mem_bandwidth

    def _flops(self, site: BlockableSite) -> float:
        if isinstance(site, AttentionSite):
            batch_heads = math.prod(ir.shape_of(site.scores)[:-2])
            d, dv = ir.shape_of(site.q_operand)[-1], ir.shape_of(site.v_operand)[-1]
            return 2.0 * batch_heads * site.tq * site.tk * (d + dv)
        if isinstance(site, FFNChain):
            d_in = ir.shape_of(site.x)[-1]
            n_in = 2 if site.lin_gate is not None else 1
            return 2.0 * site.rows * site.hidden * (d_in * n_in + site.lin_out.out_features)
        if isinstance(site, LMHeadSite):
            return 2.0 * site.rows * site.vocab * ir.shape_of(site.head.input)[-1]
        val = ir.tensor_meta(site.output)
        k = ir.shape_of(site.output.args[0] if site.linear is None else site.linear.input)[-1]
        return 2.0 * (val.numel() if val is not None else 0) * k


def _dtype(node: torch.fx.Node) -> torch.dtype:
    val = ir.tensor_meta(node)
    return val.dtype if val is not None else torch.float32


def _itemsize(node: torch.fx.Node) -> int:
    return _dtype(node).itemsize


def _output_rows(site: MatmulSite) -> int:
    shape = ir.shape_of(site.output) or (1, 1)
    return math.prod(shape[:-1]) if site.linear is not None else shape[-2]


def _is_full(bias: torch.fx.Node, site: AttentionSite) -> bool:
    """The bias has a query axis (it is not broadcast over queries)."""
    shape = ir.shape_of(bias)
    return shape is not None and len(shape) >= 2 and shape[-2] == site.tq and site.tq > 1


def _row_bytes(node: torch.fx.Node, rows: int) -> float:
    val = ir.tensor_meta(node)
    if val is None:
        return 0.0
    return val.numel() * val.element_size() / max(rows, 1)
