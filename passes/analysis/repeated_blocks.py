"""Repeated blocks: layers recognised as the same structure.

Finds (no rewrite): groups of two or more module instances (from each node's
``nn_module_stack``) of the same class whose subgraphs have the same
structural hash -- the same ops in the same order, on the same shapes and
dtypes, wired the same way inside the block, reading the same kinds of
outside values. Only the outermost repeated level is reported (a GPT-2
model's ``h.0``, ``h.1``, not the attention modules inside them).

Returns ``[RepeatedBlock, ...]`` (``ctx.analysis(RepeatedBlocks, gm)``) and writes, on the
nodes of each instance, ``node.meta[meta.REPEATED_BLOCK] = (group index, instance index)``.

Declines: modules with fewer than ``MIN_NODES`` compute nodes (a lone
``Linear`` or ``LayerNorm`` is not a layer); a group left with fewer than two
instances once those inside an outer repeated block are removed (e.g. a
final norm that matches the norms inside each layer); graphs without
``nn_module_stack`` metadata.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from graphopt import ir, meta
from graphopt.cost import NodeCost, shape, val_of
from graphopt.pass_infra import AnalysisPass, OptimizeContext, PassResult

#: a module instance needs this many call_function nodes to count as a block
MIN_NODES = 4


@dataclass
class RepeatedBlock:
    """Instances of one module class with the same structure."""

    module_class: str
    signature: str  # short structural hash
    instances: list[str]  # module paths
    nodes: list[list[fx.Node]] = field(default_factory=list)  # per instance, in graph order

    @property
    def count(self) -> int:
        return len(self.instances)

    def flops_per_instance(self) -> int:
        costs = [n.meta.get(meta.COST) for n in self.nodes[0]] if self.nodes else []
        return sum(c.flops for c in costs if isinstance(c, NodeCost))

    def to_dict(self) -> dict[str, Any]:
        return {
            "module_class": self.module_class, "signature": self.signature, "count": self.count,
            "instances": list(self.instances), "nodes_per_instance": len(self.nodes[0]) if self.nodes else 0,
            "nodes": [[n.name for n in inst] for inst in self.nodes],
        }


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"T{shape(value)}{value.dtype}"
    if isinstance(value, (list, tuple)):
        return "(" + ",".join(_describe(v) for v in value) + ")"
    return type(value).__name__


def structural_hash(nodes: list[fx.Node]) -> str:
    """A hash of the subgraph ``nodes`` that ignores names and module paths."""
    index = {n: i for i, n in enumerate(nodes)}
    parts = []

    def arg_key(a: Any) -> Any:
        if isinstance(a, fx.Node):
            if a in index:
                return ("in", index[a])
            return ("out", a.op, _describe(val_of(a)))
        if isinstance(a, (list, tuple)):
            return tuple(arg_key(x) for x in a)
        if isinstance(a, dict):
            return tuple(sorted((k, arg_key(v)) for k, v in a.items()))
        return repr(a)

    for n in nodes:
        parts.append((ir.op_name(n), _describe(val_of(n)), arg_key(tuple(n.args)), arg_key(dict(n.kwargs))))
    return hashlib.sha1(repr(parts).encode()).hexdigest()[:12]


def module_instances(gm: fx.GraphModule) -> dict[str, tuple[str, list[fx.Node]]]:
    """{module path: (class name, its call_function nodes in graph order)}."""
    out: dict[str, tuple[str, list[fx.Node]]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        for path, cls in ir.module_stack(node):
            if not path:
                continue
            out.setdefault(path, (cls, []))[1].append(node)
    return out


def _inside(path: str, outer: str) -> bool:
    return path != outer and path.startswith(outer + ".")


def find_repeated_blocks(gm: fx.GraphModule, min_nodes: int = MIN_NODES) -> list[RepeatedBlock]:
    """Outermost groups of structurally identical module instances, largest first."""
    groups: dict[tuple[str, str], list[str]] = {}
    instances = module_instances(gm)
    for path, (cls, nodes) in instances.items():
        if len(nodes) < min_nodes:
            continue
        groups.setdefault((cls, structural_hash(nodes)), []).append(path)
    candidates = [(k, v) for k, v in groups.items() if len(v) >= 2]
    # outer modules first: an enclosing module has at least as many nodes as any module inside it
    candidates.sort(key=lambda kv: (-len(instances[kv[1][0]][1]), min(p.count(".") for p in kv[1])))
    kept: list[RepeatedBlock] = []
    for (cls, sig), paths in candidates:
        outer_paths = [p for b in kept for p in b.instances]
        paths = [p for p in paths if not any(_inside(p, o) for o in outer_paths)]
        if len(paths) < 2:
            continue
        kept.append(RepeatedBlock(cls, sig, paths, [instances[p][1] for p in paths]))
    kept.sort(key=lambda b: -(b.count * len(b.nodes[0])))
    return kept


class RepeatedBlocks(AnalysisPass["list[RepeatedBlock]"]):
    name = "repeated_blocks"
    summary = "recognise layers that repeat the same structure (nn_module_stack + structural hash)"

    def analyze(self, gm: fx.GraphModule, ctx: OptimizeContext) -> list[RepeatedBlock]:
        blocks = find_repeated_blocks(gm)
        for gi, block in enumerate(blocks):
            for ii, nodes in enumerate(block.nodes):
                for node in nodes:
                    node.meta[meta.REPEATED_BLOCK] = (gi, ii)
        return blocks

    def describe(self, gm: fx.GraphModule, blocks: list[RepeatedBlock], ctx: OptimizeContext) -> PassResult:
        notes = [f"{b.count} x {b.module_class} ({', '.join(b.instances[:3])}{', ...' if b.count > 3 else ''})"
                 for b in blocks] or ["no repeated blocks"]
        return PassResult(gm, False, notes)
