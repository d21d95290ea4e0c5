"""The ``ffn_chains`` analysis pass: record every FFN chain of the graph.

Finds (no rewrite), with :func:`graphopt.passes.analysis.sites.ffn.find_ffn_chains` (the chains
its reach view reports, ``chain.reported``):
    linear(x, W1) -> act -> linear(., W2)                       plain FFN (GPT-2, BERT, nanoGPT)
    act(linear(x, Wg)) * linear(x, Wu) -> linear(., Wd)         gated FFN (Llama's SwiGLU, GeGLU)

Returns ``[FFNChain, ...]`` (``ctx.analysis(FFNChains, gm)``) and writes, on every node of a
chain, ``node.meta[meta.FFN_CHAIN] = <index>``.
"""

from __future__ import annotations

import torch.fx as fx

from graphopt import meta
from graphopt.pass_infra import AnalysisPass, OptimizeContext, PassResult
from graphopt.passes.analysis.sites.ffn import FFNChain, find_ffn_chains

__all__ = ["FFNChains", "FFNChain", "find_ffn_chains"]


class FFNChains(AnalysisPass["list[FFNChain]"]):
    """Find ``linear -> activation -> linear`` chains (and gated variants); annotate their nodes."""

    name = "ffn_chains"
    summary = "find linear -> activation -> linear chains (and gated variants) by BFS/DFS"

    def analyze(self, gm: fx.GraphModule, ctx: OptimizeContext) -> list[FFNChain]:
        chains = [c for c in find_ffn_chains(gm) if c.reported]
        for i, chain in enumerate(chains):
            for node in chain.nodes:
                node.meta[meta.FFN_CHAIN] = i
        return chains

    def describe(self, gm: fx.GraphModule, chains: list[FFNChain], ctx: OptimizeContext) -> PassResult:
        gated = sum(c.gated for c in chains)
        return PassResult(gm, False, [f"{len(chains)} FFN chains ({gated} gated)"],
                          nodes_involved=[n.name for c in chains for n in c.nodes])
