"""FFN chains: ``linear -> activation -> linear`` and gated variants, by BFS/DFS.

Finds (no rewrite):
    linear(x, W1) -> act -> linear(., W2)                       plain FFN (GPT-2, BERT, nanoGPT)
    act(linear(x, Wg)) * linear(x, Wu) -> linear(., Wd)         gated FFN (Llama's SwiGLU, GeGLU)

Returns ``[FFNChain, ...]`` (``ctx.analysis(FFNChains, gm)``) and writes, on every node of a
chain, ``node.meta[meta.FFN_CHAIN] = <index>``.

The search: from each *weight matmul* (a matmul-family node whose right-hand
operand is a constant, through views), BFS forward over the networkx view
(:func:`graphopt.ir.to_networkx`) through pointwise ops and views only; a
weight matmul reached that way closes a chain when an activation lies on a
path between the two (DFS backward from the second matmul inside the
reached set). A ``mul`` on that path whose other operand is a weight matmul
of the same input makes the chain gated (that matmul is ``up``).

Declines (not FFN chains):
    the output width differs from the input width (a classifier head such as
    the CNN's 2048 -> 64 -> 10: an FFN maps d -> hidden -> d);
    no activation between the two matmuls (e.g. o_proj -> residual add -> norm -> q_proj);
    matmuls of two activations (attention's Q @ K^T, P @ V) -- they stop the search.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
import torch.fx as fx

from graphopt import ir, meta
from graphopt.cost import alias_root, alias_source, shape, val_of
from graphopt.pass_infra import AnalysisPass, OptimizeContext, PassResult
from graphopt.passes.analysis.hot_matmuls import weight_operand

aten = torch.ops.aten

_WEIGHT_MATMULS = {aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default}

#: pointwise ops that make a chain non-linear
ACTIVATIONS = frozenset({
    "gelu", "relu", "silu", "tanh", "sigmoid", "erf", "mish", "hardswish", "hardsigmoid", "elu", "selu",
    "celu", "leaky_relu", "softplus", "relu6", "hardtanh", "gelu_", "relu_", "silu_",
})

#: how far (in nodes) the forward search goes from a matmul before giving up
MAX_SEARCH_NODES = 200


@dataclass
class FFNChain:
    """One feed-forward block.

    ``up``: first matmul (for gated FFNs the gate projection is ``gate`` and
    the plain one ``up``); ``down``: the closing matmul; ``activation``: the
    activation ops on the path; ``nodes``: every node of the chain.
    """

    up: fx.Node
    down: fx.Node
    activation: list[fx.Node]
    gate: fx.Node | None = None
    nodes: list[fx.Node] = field(default_factory=list)
    d_model: int | None = None
    d_hidden: int | None = None

    @property
    def gated(self) -> bool:
        return self.gate is not None

    @property
    def module(self) -> str:
        """The innermost module path shared by the chain's matmuls."""
        paths = [ir.module_path(n).split(".") for n in (self.up, self.down, self.gate) if n is not None]
        common = []
        for parts in zip(*paths):
            if len(set(parts)) != 1:
                break
            common.append(parts[0])
        return ".".join(common)

    def to_dict(self) -> dict[str, Any]:
        return {
            "up": self.up.name, "gate": self.gate.name if self.gate is not None else None,
            "down": self.down.name, "activation": [n.name for n in self.activation],
            "gated": self.gated, "module": self.module, "d_model": self.d_model, "d_hidden": self.d_hidden,
            "nodes": [n.name for n in self.nodes],
        }


def is_weight_matmul(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _WEIGHT_MATMULS and weight_operand(node) is not None


def activation_operand(node: fx.Node) -> fx.Node | None:
    """The non-constant operand of a weight matmul."""
    idx = 1 if getattr(node.target, "_opname", "") == "addmm" else 0
    arg = node.args[idx] if len(node.args) > idx else None
    return arg if isinstance(arg, fx.Node) else None


def _passes_through(node: fx.Node) -> bool:
    """Ops the search walks through: pointwise ops and views."""
    if node.op != "call_function":
        return False
    if alias_source(node) is not None or node.target in ir.VIEW_OPS:
        return True
    t = node.target
    return isinstance(t, torch._ops.OpOverload) and torch.Tag.pointwise in t.tags


def _is_activation(node: fx.Node) -> bool:
    name = getattr(node.target, "_opname", "")
    return node.op == "call_function" and name in ACTIVATIONS


def _last_dim(node: fx.Node | None) -> int | None:
    v = val_of(node) if node is not None else None
    return shape(v)[-1] if isinstance(v, torch.Tensor) and v.dim() else None


def _same_source(a: fx.Node | None, b: fx.Node | None) -> bool:
    return a is not None and b is not None and alias_root(a) is alias_root(b)


def find_ffn_chains(gm: fx.GraphModule, graph: nx.DiGraph | None = None) -> list[FFNChain]:
    """Every FFN chain in ``gm``, in graph order."""
    g = graph if graph is not None else ir.to_networkx(gm)
    node_of = {name: data["node"] for name, data in g.nodes(data=True)}
    chains: dict[str, FFNChain] = {}
    for start in gm.graph.nodes:
        if not is_weight_matmul(start):
            continue
        # BFS forward through pointwise ops and views
        reached: set[str] = set()
        ends: list[fx.Node] = []
        queue = deque([start.name])
        while queue and len(reached) < MAX_SEARCH_NODES:
            for succ in g.successors(queue.popleft()):
                if succ in reached:
                    continue
                node = node_of[succ]
                if is_weight_matmul(node):
                    ends.append(node)
                elif _passes_through(node):
                    reached.add(succ)
                    queue.append(succ)
        for end in ends:
            chain = _chain(start, end, reached, g, node_of)
            if chain is not None and end.name not in chains:
                chains[end.name] = chain
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return sorted(chains.values(), key=lambda c: order[c.down])


def _chain(start: fx.Node, end: fx.Node, reached: set[str], g: nx.DiGraph,
           node_of: dict[str, fx.Node]) -> FFNChain | None:
    operand = activation_operand(end)
    if operand is None or (operand.name not in reached and operand is not start):
        return None
    # DFS backward from the closing matmul's operand, inside the reached set: the path nodes
    path: set[str] = set()
    stack = [operand.name]
    while stack:
        name = stack.pop()
        if name in path or name not in reached:
            continue
        path.add(name)
        stack.extend(g.predecessors(name))
    acts = [node_of[n] for n in path if _is_activation(node_of[n])]
    if not acts:
        return None
    d_in, d_out = _last_dim(activation_operand(start)), _last_dim(end)
    if d_in is None or d_in != d_out:
        return None
    up, gate = start, None
    extra: list[fx.Node] = []
    for name in path:
        node = node_of[name]
        if getattr(node.target, "_opname", "") != "mul":
            continue
        for other in node.all_input_nodes:
            root = other
            while root.name not in path and alias_source(root) is not None:
                extra.append(root)
                root = alias_source(root)
            if root.name in path or root is start or not is_weight_matmul(root):
                continue
            if _same_source(activation_operand(root), activation_operand(start)):
                up, gate = root, start
    order = {n: i for i, n in enumerate(start.graph.nodes)}
    members = {start, end, *(node_of[n] for n in path), *([up] if gate is not None else [])}
    if gate is not None:
        members |= {n for n in extra if order[n] < order[end]}
    nodes = sorted(members, key=lambda n: order[n])
    acts.sort(key=lambda n: order[n])
    return FFNChain(up, end, acts, gate, nodes, d_in, _last_dim(start))


class FFNChains(AnalysisPass["list[FFNChain]"]):
    name = "ffn_chains"
    summary = "find linear -> activation -> linear chains (and gated variants) by BFS/DFS"

    def analyze(self, gm: fx.GraphModule, ctx: OptimizeContext) -> list[FFNChain]:
        chains = find_ffn_chains(gm)
        for i, chain in enumerate(chains):
            for node in chain.nodes:
                node.meta[meta.FFN_CHAIN] = i
        return chains

    def describe(self, gm: fx.GraphModule, chains: list[FFNChain], ctx: OptimizeContext) -> PassResult:
        gated = sum(c.gated for c in chains)
        return PassResult(gm, False, [f"{len(chains)} FFN chains ({gated} gated)"],
                          nodes_involved=[n.name for c in chains for n in c.nodes])
