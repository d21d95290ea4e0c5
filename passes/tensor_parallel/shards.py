"""What a tensor-parallel plan is made of: shards, regions, the plan, and the helpers its rules share."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from graphopt import ir
from graphopt.passes.analysis.sites.linear import LinearSite
from graphopt.report import Declined


class ShardingError(ValueError):
    """The model cannot be sharded over this many processes; the message says what to change."""


@dataclass(frozen=True)
class Shard:
    """A value split over the ranks along ``dim``.

    ``blocks``: the global sizes of the consecutive pieces along ``dim``; each
    piece is split evenly, rank ``r`` holding the ``r``-th part of every piece
    (one piece for an ordinary column shard, three for a fused QKV).
    """

    dim: int
    blocks: tuple[int, ...]

    @property
    def plain(self) -> bool:
        return len(self.blocks) == 1


class NeedSeeds(Exception):
    """Raised when an unsharded operand must be sharded: the linear sites it comes from join the seeds."""

    def __init__(self, operand: fx.Node) -> None:
        super().__init__(operand.name)
        self.operand = operand


@dataclass
class ShardedRegion:
    """One column -> row group: its sites, the edits that make it local, the traffic it costs."""

    columns: list[tuple[LinearSite, tuple[int, ...]]]  # (site, blocks of its output features)
    rows: list[tuple[LinearSite, tuple[int, ...]]]  # (site, blocks of its input features)
    arg_edits: list[tuple[fx.Node, int | str, Any]] = field(default_factory=list)  # (node, arg, local value)
    const_edits: list[tuple[fx.Node, int | str, fx.Node, int, tuple[int, ...]]] = field(default_factory=list)
    nodes: list[fx.Node] = field(default_factory=list)  # every sharded node

    @property
    def label(self) -> str:
        paths = [s.label for s, _ in self.columns + self.rows]
        common = paths[0]
        for p in paths[1:]:
            while common and not (p == common or p.startswith(common + ".")):
                common = common.rsplit(".", 1)[0] if "." in common else ""
        return common or "+".join(paths)

    def allreduce_bytes(self) -> list[tuple[str, int]]:
        """(row linear, bytes all-reduced per forward) for each row-parallel linear."""
        out = []
        for site, _ in self.rows:
            val = ir.tensor_meta(site.node)
            out.append((site.label, int(val.numel() * val.element_size()) if val is not None else 0))
        return out


@dataclass
class TensorParallelPlan:
    """What :func:`plan_tensor_parallel` found: regions to shard and sites declined."""

    world_size: int
    regions: list[ShardedRegion]
    declined: list[Declined]

    def sharded_weight_bytes(self, gm: fx.GraphModule) -> int:
        """Bytes of the tensors the plan shards, whole: column weights and biases, row weights, feature constants.

        (A row-parallel linear's bias stays whole: it is added once, after the all-reduce.)
        """
        seen: set[str] = set()
        total = 0
        for region in self.regions:
            tensors = [(s.weight, s.bias) for s, _ in region.columns] + [(s.weight, None) for s, _ in region.rows]
            tensors += [(const, None) for _, _, const, _, _ in region.const_edits]
            for pair in tensors:
                for node in pair:
                    if node is not None and str(node.target) not in seen:
                        seen.add(str(node.target))
                        t = ir.get_attr_value(gm, node)
                        total += t.numel() * t.element_size()
        return total

    def communication(self) -> list[tuple[str, int]]:
        """(row linear, bytes all-reduced per forward pass) over the whole model."""
        return [item for region in self.regions for item in region.allreduce_bytes()]

    def summary(self) -> list[str]:
        lines = []
        for region in self.regions:
            cols = ", ".join(s.label for s, _ in region.columns)
            rows = ", ".join(s.label for s, _ in region.rows)
            lines.append(f"{region.label}: column [{cols}] -> row [{rows}]")
        return lines


# --------------------------------------------------------------------------- helpers


def norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def shard_tensor(t: torch.Tensor, dim: int, blocks: Sequence[int], rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s part of ``t`` along ``dim``: the rank-th slice of every block, concatenated (a copy)."""
    pieces, start = [], 0
    for b in blocks:
        part = b // world
        pieces.append(t.narrow(dim, start + rank * part, part))
        start += b
    return torch.cat(pieces, dim).contiguous().clone()


def where(node: fx.Node) -> str:
    src = ir.source_line(node)
    path = ir.module_path(node)
    return f"{node.name}" + (f" in {path}" if path else "") + (f" ({src})" if src else "")


def view_groups(a: Sequence[int], b: Sequence[int]) -> list[tuple[list[int], list[int]]] | None:
    """Group the dims of two shapes of equal numel: each input group holds as many elements as its output group."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(a) or j < len(b):
        if i < len(a) and a[i] == 1 and (j >= len(b) or b[j] != 1):
            groups.append(([i], []))
            i += 1
            continue
        if j < len(b) and b[j] == 1 and (i >= len(a) or a[i] != 1):
            groups.append(([], [j]))
            j += 1
            continue
        if i >= len(a) or j >= len(b):
            return None
        gi, gj, pa, pb = [i], [j], a[i], b[j]
        while pa != pb:
            if pa < pb:
                i += 1
                if i >= len(a):
                    return None
                gi.append(i)
                pa *= a[i]
            else:
                j += 1
                if j >= len(b):
                    return None
                gj.append(j)
                pb *= b[j]
        groups.append((gi, gj))
        i += 1
        j += 1
    return groups


def prod(xs: Sequence[int]) -> int:
    p = 1
    for x in xs:
        p *= x
    return p
