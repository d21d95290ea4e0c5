"""Tensor parallelism (Megatron-style): shard column -> row linear pairs over ranks.

Rewrites, on each rank ``r`` of ``W`` (attention: QKV -> attention -> output
projection; FFN: up/gate -> activation -> down):

    y = linear(x, W_col, b_col)            -> linear(x, W_col[rows of rank r], b_col[r])   (column)
    view(y, [B, T, H, D])                  -> view(y, [B, T, H/W, D])     (hard-coded head counts)
    split(qkv, C, -1)                      -> split(qkv, C/W, -1)          (fused QKV: each of q/k/v sharded)
    expand / reshape / unflatten sizes     -> local sizes
    attention, softmax, masks, rotary, activations: unchanged (they act per head / per feature)
    z = linear(h, W_row, b_row)            -> z = all_reduce(linear(h, W_row[:, cols of rank r])) + b_row  (row)

One all-reduce per column -> row pair; everything between runs on 1/W of the
heads or FFN features. The same rules cover ``aten.linear`` (nn.Linear),
``aten.addmm`` (transformers' Conv1D, GPT-2) and ``x @ W`` with constant
weights; constants broadcast along the sharded features (a bias added by
hand) are sharded too.

How the pairs are found: linear sites that share an input are seeds (q/k/v,
gate/up, a fused c_attn); their outputs are marked *sharded on the last
dim* and the marking is propagated forward through the graph in topological
order (``Shard(dim, blocks)``: which dim is split over the ranks; ``blocks``
the sizes of the pieces that are each split, e.g. (C, C, C) for a fused QKV
that is split later). Each op either maps the marking to its output (views
through their dim groups, permutes, pointwise ops with broadcasting,
per-head attention, softmax over another dim, splits at block boundaries) or
the region is declined. A linear that contracts over the sharded dim is the
row half of the pair: its output is summed over ranks (all_reduce) and the
region ends there. When an op meets an unsharded operand that must be
sharded (keys from a different projection), the linear sites that operand
comes from (``networkx`` BFS upstream, :func:`graphopt.ir.to_networkx`) join
the seeds and the propagation restarts.

Why a graph rewrite and not ``torch.distributed.tensor.parallel``'s
``ColwiseParallel`` / ``RowwiseParallel``: those shard ``nn.Linear``
parameters but the model's own forward still uses the full head count in its
``view`` calls (transformers#45109) and GPT-2's ``Conv1D`` is not an
``nn.Linear``; in the graph the hard-coded sizes are visible and are
rewritten, and the communication is one explicit
``torch.ops._c10d_functional.all_reduce`` per pair (torch.distributed's
functional collectives: traceable, work on gloo and NCCL).

Declines, with the reason (the region stays replicated):
    * a sharded value reaches the model output (e.g. lm_head: no vocab-parallel head);
    * an op that does not act per head / per feature (layer_norm over the
      sharded features, a slice or reduction over them, a matmul contracting
      over them outside a linear, an op graphopt does not know);
    * an unsharded, non-constant operand with the full sharded size;
    * symbolic (dynamic) sizes in a view along the sharded dim.
Raises :class:`ShardingError` when a region could be sharded but its head
count (or feature count) is not divisible by the world size.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
import torch.fx as fx

from graphopt import ir
from graphopt.pass_infra import OptimizeContext, Pass, PassResult
from graphopt.passes.analysis.sites.linear import LinearSite, find_linear_sites, linear_site
from graphopt.report import Declined

log = logging.getLogger(__name__)
aten = torch.ops.aten

_SAME_SHAPE = {
    aten._to_copy.default, aten.contiguous.default, aten.alias.default, aten.detach.default,
    aten.dropout.default, aten.lift_fresh_copy.default, aten.clone.default, aten.type_as.default,
}
_SOFTMAX = {aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default}
_REDUCTIONS = {aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.amin.default,
               aten.var.correction, aten.std.correction, aten.logsumexp.default}
_SHAPE_ARG_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int}
_MAX_RESTARTS = 4


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


class _Decline(Exception):
    pass


class _NeedSeeds(Exception):
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


def _norm(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _local_blocks(blocks: Sequence[int], world: int) -> tuple[int, ...]:
    return tuple(b // world for b in blocks)


def shard_tensor(t: torch.Tensor, dim: int, blocks: Sequence[int], rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s part of ``t`` along ``dim``: the rank-th slice of every block, concatenated (a copy)."""
    pieces, start = [], 0
    for b in blocks:
        part = b // world
        pieces.append(t.narrow(dim, start + rank * part, part))
        start += b
    return torch.cat(pieces, dim).contiguous().clone()


def _where(node: fx.Node) -> str:
    src = ir.source_line(node)
    path = ir.module_path(node)
    return f"{node.name}" + (f" in {path}" if path else "") + (f" ({src})" if src else "")


def _view_groups(a: Sequence[int], b: Sequence[int]) -> list[tuple[list[int], list[int]]] | None:
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


def _prod(xs: Sequence[int]) -> int:
    p = 1
    for x in xs:
        p *= x
    return p


class _Propagation:
    """Forward propagation of :class:`Shard` markings from a set of seed sites."""

    def __init__(self, gm: fx.GraphModule, seeds: list[LinearSite], world: int) -> None:
        self.gm, self.world = gm, world
        self.seeds = {s.node: s for s in seeds}
        self.states: dict[fx.Node, Any] = {}  # Shard, or a tuple of Shard for split nodes
        self.region = ShardedRegion([], [])
        self.indivisible: list[str] = []

    # -- divisibility is checked everywhere but reported only if the region is otherwise fine
    def _divisible(self, size: int, what: str) -> None:
        if size % self.world:
            self.indivisible.append(what)

    def run(self) -> ShardedRegion:
        first = min(self.seeds, key=lambda n: self._order(n))
        started = False
        for node in self.gm.graph.nodes:
            started = started or node is first
            if not started:
                continue
            if node in self.seeds:
                if self.seeds[node].input in self.states:
                    raise _Decline(f"{_where(node)} would be both a column and a row of one region")
                self._seed(self.seeds[node])
                continue
            if not any(a in self.states for a in node.all_input_nodes):
                continue
            if node.op == "output":
                src = next(a for a in node.all_input_nodes if a in self.states)
                raise _Decline(f"a sharded value ({_where(src)}) reaches the model output without a "
                               "row-parallel linear; kept replicated")
            state = self._visit(node)
            if state is not None:
                self.states[node] = state
                self.region.nodes.append(node)
        if not self.region.rows:
            raise _Decline("no row-parallel linear consumes the sharded values")
        return self.region

    def _order(self, node: fx.Node) -> int:
        if not hasattr(self, "_index"):
            self._index = {n: i for i, n in enumerate(self.gm.graph.nodes)}
        return self._index[node]

    # -- seeds and rows
    def _seed(self, site: LinearSite) -> None:
        blocks = _seed_blocks(site)
        for b in blocks:
            self._divisible(b, f"{site.label}: {b} output features cannot be divided among {self.world} "
                               f"processes; use a world size that divides {b}")
        ndim = len(ir.shape_of(site.node) or ())
        self.states[site.node] = Shard(ndim - 1, blocks)
        self.region.columns.append((site, blocks))
        self.region.nodes.append(site.node)

    def _row(self, node: fx.Node, site: LinearSite, state: Shard) -> None:
        x_ndim = len(ir.shape_of(site.input) or ())
        if state.dim != x_ndim - 1:
            raise _Decline(f"{_where(node)} multiplies a constant weight with a value sharded along dim "
                           f"{state.dim}, not the contracted features")
        if site.weight in self.states or (site.bias is not None and site.bias in self.states):
            raise _Decline(f"{_where(node)}: weight is sharded")
        self.region.rows.append((site, state.blocks))
        self.region.nodes.append(node)

    # -- the rules
    def _visit(self, node: fx.Node) -> Any:
        if node.op != "call_function":
            raise _Decline(f"{_where(node)} ({node.op}) takes a sharded value")
        site = linear_site(node)
        if site is not None and site.declined is None and site.input in self.states:
            self._row(node, site, self.states[site.input])
            return None
        t = node.target
        if t is operator.getitem:
            src_state = self.states[node.args[0]]
            if isinstance(src_state, tuple):
                return src_state[node.args[1]]
            raise _Decline(f"{_where(node)}: indexing a sharded tensor")
        if t == aten._assert_tensor_metadata.default:
            if any(k in node.kwargs for k in ("size", "stride")) or len(node.args) > 1:
                raise _Decline(f"{_where(node)} asserts the global size of a sharded value")
            return None
        x = node.args[0] if node.args else None
        xs = self.states.get(x) if isinstance(x, fx.Node) else None
        if t in _SAME_SHAPE or (isinstance(t, torch._ops.OpOverload) and t.overloadpacket == aten.to):
            if xs is None or any(isinstance(a, fx.Node) and a in self.states for a in node.args[1:]):
                raise _Decline(f"{_where(node)}: unsupported use of a sharded value")
            return xs
        if isinstance(t, torch._ops.OpOverload) and (torch.Tag.pointwise in t.tags or t == aten.masked_fill.Tensor):
            return self._pointwise(node)
        if t in _SHAPE_ARG_VIEWS:
            return self._view(node, xs, 1)
        if t == aten.flatten.using_ints:
            return self._view(node, xs, None)
        if t == aten.unflatten.int:
            return self._unflatten(node, xs)
        if t == aten.expand.default:
            return self._expand(node, xs)
        if t in (aten.permute.default, aten.transpose.int, aten.t.default):
            return self._permute(node, xs)
        if t in (aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default):
            return self._squeeze(node, xs)
        if t in (aten.slice.Tensor, aten.select.int, aten.narrow.default):
            return self._slice(node, xs)
        if t in _SPLITS:
            return self._split(node, xs)
        if t == aten.cat.default:
            return self._cat(node)
        if t in _SOFTMAX:
            nd = len(ir.shape_of(node) or ())
            if _norm(node.args[1], nd) == xs.dim:
                raise _Decline(f"{_where(node)}: softmax over the sharded dim")
            return xs
        if t in _REDUCTIONS:
            return self._reduction(node, xs)
        if t == aten.layer_norm.default:
            nd = len(ir.shape_of(x) or ())
            if xs.dim >= nd - len(node.args[1]):
                raise _Decline(f"{_where(node)}: layer_norm over the sharded features")
            return xs
        if t in (aten.matmul.default, aten.bmm.default, aten.mm.default):
            return self._matmul(node)
        if t in (aten.scaled_dot_product_attention.default,):
            return self._sdpa(node)
        raise _Decline(f"{_where(node)}: {ir.op_name(node)} is not known to act per head / per feature")

    def _check_unsharded_operand(self, node: fx.Node, arg_key: int | str, operand: fx.Node, out_dim: int,
                                 offset: int, blocks: tuple[int, ...]) -> None:
        shape = ir.shape_of(operand)
        if shape is None:
            raise _Decline(f"{_where(node)}: operand {operand.name} has an unknown shape")
        aligned = out_dim - offset
        if aligned < 0 or shape[aligned] == 1:
            return  # broadcast along the sharded dim: the same on every rank
        if operand.op == "get_attr":
            for b in blocks:
                self._divisible(b, f"{_where(node)}: constant {operand.target} of {b} features cannot be divided")
            self.region.const_edits.append((node, arg_key, operand, aligned, blocks))
            return
        raise _NeedSeeds(operand)

    def _pointwise(self, node: fx.Node) -> Shard:
        out_shape = ir.shape_of(node)
        if out_shape is None:
            raise _Decline(f"{_where(node)}: unknown output shape")
        nd = len(out_shape)
        operands: list[tuple[int | str, fx.Node]] = [(i, a) for i, a in enumerate(node.args)
                                                     if isinstance(a, fx.Node)]
        operands += [(k, v) for k, v in node.kwargs.items() if isinstance(v, fx.Node)]
        marking: Shard | None = None
        for _, a in operands:
            st = self.states.get(a)
            if st is None:
                continue
            offset = nd - len(ir.shape_of(a) or ())
            m = Shard(st.dim + offset, st.blocks)
            if marking is not None and m != marking:
                raise _Decline(f"{_where(node)}: operands are sharded differently ({marking} vs {m})")
            marking = m
        assert marking is not None
        for key, a in operands:
            if a not in self.states and ir.tensor_meta(a) is not None:
                offset = nd - len(ir.shape_of(a) or ())
                self._check_unsharded_operand(node, key, a, marking.dim, offset, marking.blocks)
        return marking

    def _local_shape(self, shape: Sequence[int], state: Shard) -> list[int]:
        local = list(shape)
        local[state.dim] = shape[state.dim] // self.world
        return local

    def _map_view(self, node: fx.Node, in_shape: Sequence[int], out_shape: Sequence[int], xs: Shard) -> Shard:
        groups = _view_groups(in_shape, out_shape)
        if groups is None:
            raise _Decline(f"{_where(node)}: cannot follow the view {list(in_shape)} -> {list(out_shape)}")
        gi, gj = next(g for g in groups if xs.dim in g[0])
        if not gj:
            raise _Decline(f"{_where(node)}: the sharded dim disappears in the view")
        if len(gi) == 1 and len(gj) == 1:  # the sharded dim is kept whole
            return Shard(gj[0], xs.blocks)
        k = len(xs.blocks)
        if len(set(xs.blocks)) != 1:
            raise _Decline(f"{_where(node)}: view of unequally blocked sharded features")
        pos = gi.index(xs.dim)
        pre_in = _prod([in_shape[d] for d in gi[:pos]]) * k
        prefix = 1
        for j in gj:
            if out_shape[j] == 1:
                continue
            if pre_in % prefix == 0:
                m = pre_in // prefix
                if out_shape[j] % m == 0 and out_shape[j] // m > 0 and (prefix * out_shape[j]) % pre_in == 0:
                    size = out_shape[j] // m
                    suffix = _prod([out_shape[d] for d in gj[gj.index(j) + 1:]])
                    what = "attention heads" if suffix > 1 else "features"
                    if size % self.world:
                        self.indivisible.append(
                            f"{ir.module_path(node) or node.name}: {size} {what} (view to {list(out_shape)}"
                            f"{' at ' + ir.source_line(node) if ir.source_line(node) else ''}) cannot be divided "
                            f"among {self.world} processes; use a world size that divides {size}")
                    return Shard(j, (size,) * m)
            prefix *= out_shape[j]
        raise _Decline(f"{_where(node)}: the view {list(in_shape)} -> {list(out_shape)} mixes the sharded features "
                       "with other dims")

    def _view(self, node: fx.Node, xs: Shard, shape_arg: int | None) -> Shard:
        in_shape, out_shape = ir.shape_of(node.args[0]), ir.shape_of(node)
        if in_shape is None or out_shape is None:
            raise _Decline(f"{_where(node)}: symbolic sizes along the sharded dim")
        out = self._map_view(node, in_shape, out_shape, xs)
        if shape_arg is not None:
            requested = node.args[shape_arg]
            if any(isinstance(s, fx.Node) for s in requested):
                raise _Decline(f"{_where(node)}: symbolic sizes in a view of a sharded value")
            local = self._local_shape(out_shape, out)
            new = [-1 if s == -1 else local[i] for i, s in enumerate(requested)]
            if new != list(requested):
                self.region.arg_edits.append((node, shape_arg, new))
        return out

    def _unflatten(self, node: fx.Node, xs: Shard) -> Shard:
        in_shape, out_shape = ir.shape_of(node.args[0]), ir.shape_of(node)
        out = self._map_view(node, in_shape, out_shape, xs)  # type: ignore[arg-type]
        dim = _norm(node.args[1], len(in_shape))  # type: ignore[arg-type]
        sizes = list(node.args[2])
        if dim == xs.dim:
            local = self._local_shape(out_shape, out)  # type: ignore[arg-type]
            new = [-1 if s == -1 else local[dim + i] for i, s in enumerate(sizes)]
            if new != sizes:
                self.region.arg_edits.append((node, 2, new))
        return out

    def _expand(self, node: fx.Node, xs: Shard) -> Shard:
        out_shape = ir.shape_of(node)
        in_nd = len(ir.shape_of(node.args[0]) or ())
        sizes = list(node.args[1])
        out = Shard(xs.dim + len(sizes) - in_nd, xs.blocks)
        s = sizes[out.dim]
        if isinstance(s, fx.Node):
            raise _Decline(f"{_where(node)}: symbolic expand size along the sharded dim")
        if s != -1:
            sizes[out.dim] = out_shape[out.dim] // self.world  # type: ignore[index]
            self.region.arg_edits.append((node, 1, sizes))
        return out

    def _permute(self, node: fx.Node, xs: Shard) -> Shard:
        nd = len(ir.shape_of(node) or ())
        if node.target == aten.permute.default:
            dims = [_norm(d, nd) for d in node.args[1]]
            return Shard(dims.index(xs.dim), xs.blocks)
        if node.target == aten.t.default:
            return Shard(nd - 1 - xs.dim if nd == 2 else xs.dim, xs.blocks)
        a, b = _norm(node.args[1], nd), _norm(node.args[2], nd)
        return Shard(b if xs.dim == a else a if xs.dim == b else xs.dim, xs.blocks)

    def _squeeze(self, node: fx.Node, xs: Shard) -> Shard:
        in_shape, out_shape = ir.shape_of(node.args[0]), ir.shape_of(node)
        if node.target == aten.unsqueeze.default:
            d = _norm(node.args[1], len(out_shape))  # type: ignore[arg-type]
            return Shard(xs.dim + (1 if d <= xs.dim else 0), xs.blocks)
        if node.target == aten.squeeze.default:
            removed = [i for i, s in enumerate(in_shape) if s == 1]  # type: ignore[arg-type]
        else:
            dims = node.args[1] if node.target == aten.squeeze.dims else [node.args[1]]
            removed = [_norm(d, len(in_shape)) for d in dims if in_shape[_norm(d, len(in_shape))] == 1]  # type: ignore
        return Shard(xs.dim - sum(1 for d in removed if d < xs.dim), xs.blocks)

    def _slice(self, node: fx.Node, xs: Shard) -> Shard:
        nd = len(ir.shape_of(node.args[0]) or ())
        dim = _norm(node.args[1] if len(node.args) > 1 else 0, nd)
        if dim == xs.dim:
            in_shape, out_shape = ir.shape_of(node.args[0]), ir.shape_of(node)
            if node.target == aten.slice.Tensor and in_shape == out_shape:
                return xs  # a full slice
            raise _Decline(f"{_where(node)}: {ir.op_name(node)} along the sharded dim")
        if node.target == aten.select.int:
            return Shard(xs.dim - (1 if dim < xs.dim else 0), xs.blocks)
        return xs

    def _split(self, node: fx.Node, xs: Shard) -> tuple[Shard, ...]:
        in_shape = ir.shape_of(node.args[0]) or ()
        nd = len(in_shape)
        t = node.target
        if t == aten.unbind.int:
            dim = _norm(node.args[1] if len(node.args) > 1 else 0, nd)
            if dim == xs.dim:
                raise _Decline(f"{_where(node)}: unbind along the sharded dim")
            return tuple(Shard(xs.dim - (1 if dim < xs.dim else 0), xs.blocks) for _ in range(in_shape[dim]))
        dim = _norm(node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0), nd)
        total = in_shape[dim]
        if t == aten.chunk.default:
            n = node.args[1]
            step = -(-total // n)
            sizes = [min(step, total - i * step) for i in range(n) if total - i * step > 0]
        elif t == aten.split.Tensor:
            step = node.args[1]
            sizes = [min(step, total - i) for i in range(0, total, step)]
        else:
            sizes = list(node.args[1])
        if dim != xs.dim:
            return tuple(xs for _ in sizes)
        if tuple(sizes) != xs.blocks:
            raise _Decline(f"{_where(node)}: split of the sharded dim into {sizes} does not follow its blocks "
                           f"{list(xs.blocks)}")
        if t == aten.split.Tensor:
            self.region.arg_edits.append((node, 1, node.args[1] // self.world))
        elif t == aten.split_with_sizes.default:
            self.region.arg_edits.append((node, 1, [s // self.world for s in sizes]))
        return tuple(Shard(dim, (s,)) for s in sizes)

    def _cat(self, node: fx.Node) -> Shard:
        tensors = list(node.args[0])
        nd = len(ir.shape_of(node) or ())
        dim = _norm(node.args[1] if len(node.args) > 1 else 0, nd)
        states = [self.states.get(t) for t in tensors]
        if any(s is None for s in states):
            missing = next(t for t, s in zip(tensors, states) if s is None)
            raise _NeedSeeds(missing)
        if dim == states[0].dim:  # pieces concatenated along the sharded dim: a blocked result
            if not all(s.dim == dim for s in states):
                raise _Decline(f"{_where(node)}: cat of differently sharded values")
            return Shard(dim, tuple(b for s in states for b in s.blocks))
        if any(s != states[0] for s in states):
            raise _Decline(f"{_where(node)}: cat of differently sharded values")
        return states[0]

    def _reduction(self, node: fx.Node, xs: Shard) -> Shard:
        nd = len(ir.shape_of(node.args[0]) or ())
        dims = node.args[1] if len(node.args) > 1 else None
        if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
            raise _Decline(f"{_where(node)}: reduction over all dims of a sharded value")
        dims = [_norm(d, nd) for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
        if xs.dim in dims:
            raise _Decline(f"{_where(node)}: reduction over the sharded dim")
        keepdim = bool(node.args[2]) if len(node.args) > 2 else bool(node.kwargs.get("keepdim", False))
        return xs if keepdim else Shard(xs.dim - sum(1 for d in dims if d < xs.dim), xs.blocks)

    def _matmul(self, node: fx.Node) -> Shard:
        a, b = node.args[0], node.args[1]
        sa, sb = self.states.get(a), self.states.get(b)
        shape_a, shape_b, out = ir.shape_of(a), ir.shape_of(b), ir.shape_of(node)
        if shape_a is None or shape_b is None or out is None or len(shape_a) < 2 or len(shape_b) < 2:
            raise _Decline(f"{_where(node)}: matmul of a sharded vector or unknown shape")
        nd = len(out)
        na, nb = len(shape_a), len(shape_b)

        def to_out(st: Shard, n_in: int, which: str) -> Shard:
            d = st.dim
            if d < n_in - 2:
                return Shard(d + nd - n_in, st.blocks)  # a batch dim (per head)
            if which == "a" and d == n_in - 2:
                return Shard(nd - 2, st.blocks)  # rows of the left operand
            if which == "b" and d == n_in - 1:
                return Shard(nd - 1, st.blocks)  # columns of the right operand
            raise _Decline(f"{_where(node)} contracts over the sharded dim outside a linear")

        ma = to_out(sa, na, "a") if sa is not None else None
        mb = to_out(sb, nb, "b") if sb is not None else None
        if ma is not None and mb is not None and ma != mb:
            raise _Decline(f"{_where(node)}: operands are sharded differently")
        marking = ma or mb
        assert marking is not None
        for other, n_other, st in ((a, na, sa), (b, nb, sb)):
            if st is not None:
                continue
            if marking.dim >= nd - 2:  # the other operand is not split along a batch dim: fine
                continue
            aligned = marking.dim - (nd - n_other)
            if aligned >= 0 and (ir.shape_of(other) or ())[aligned] != 1:
                raise _NeedSeeds(other)
        return marking

    def _sdpa(self, node: fx.Node) -> Shard:
        q, k, v = node.args[:3]
        states = [self.states.get(x) for x in (q, k, v)]
        for x, st in zip((q, k, v), states):
            if st is None:
                raise _NeedSeeds(x)
        nd = len(ir.shape_of(q) or ())
        if any(st.dim != nd - 3 for st in states):
            raise _Decline(f"{_where(node)}: attention inputs not sharded along heads")
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        if isinstance(mask, fx.Node):
            ms = self.states.get(mask)
            mshape = ir.shape_of(mask) or ()
            aligned = len(mshape) - 3
            if ms is None and aligned >= 0 and mshape[aligned] != 1:
                raise _Decline(f"{_where(node)}: per-head attention mask is not sharded")
        return Shard(nd - 3, states[0].blocks)


def _seed_blocks(site: LinearSite) -> tuple[int, ...]:
    """Block sizes of a column linear's output: the sizes of a split along its features that follows it.

    ``c_attn(x).split(C, dim=-1)`` (fused QKV) gives (C, C, C): each of q, k,
    v is sharded, not the fused output as one piece.
    """
    node = site.node
    n = site.out_features
    for _ in range(4):  # through views / casts that keep the last dim
        users = list(node.users)
        if len(users) != 1:
            return (n,)
        user = users[0]
        shape = ir.shape_of(user)
        if user.target in _SPLITS and user.target != aten.unbind.int:
            nd = len(ir.shape_of(node) or ())
            dim = user.args[2] if len(user.args) > 2 else user.kwargs.get("dim", 0)
            if _norm(dim, nd) != nd - 1:
                return (n,)
            if user.target == aten.split_with_sizes.default:
                return tuple(user.args[1])
            if user.target == aten.split.Tensor:
                step = user.args[1]
                return tuple(min(step, n - i) for i in range(0, n, step))
            chunks = user.args[1]
            step = -(-n // chunks)
            return tuple(min(step, n - i * step) for i in range(chunks) if n - i * step > 0)
        if shape is None or not shape or shape[-1] != n or not (
                user.target in _SHAPE_ARG_VIEWS or user.target in _SAME_SHAPE):
            return (n,)
        node = user
    return (n,)


def _upstream_sites(graph: nx.DiGraph, node: fx.Node, sites: dict[str, LinearSite], depth: int = 16) -> list[LinearSite]:
    """Linear sites found walking upstream from ``node`` (BFS), not beyond the first site on each path."""
    found: list[LinearSite] = []
    frontier, seen = [node.name], {node.name}
    for _ in range(depth):
        nxt = []
        for name in frontier:
            if name in sites:
                found.append(sites[name])
                continue
            for pred in graph.predecessors(name):
                if pred not in seen:
                    seen.add(pred)
                    nxt.append(pred)
        frontier = nxt
        if not frontier:
            break
    return found


def plan_tensor_parallel(gm: fx.GraphModule, world_size: int) -> TensorParallelPlan:
    """Find the column -> row regions of ``gm`` and how to make each local to one of ``world_size`` ranks.

    Raises :class:`ShardingError` when a region is shardable but a head (or
    feature) count is not divisible by ``world_size``.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    sites = find_linear_sites(gm)
    by_input: dict[fx.Node, list[LinearSite]] = {}
    for s in sites:
        by_input.setdefault(s.input, []).append(s)
    site_by_name = {s.node.name: s for s in sites}
    graph = ir.to_networkx(gm)
    assigned: set[fx.Node] = set()
    regions: list[ShardedRegion] = []
    declined: list[Declined] = []
    for group in by_input.values():
        if any(s.node in assigned for s in group):
            continue
        seeds = list(group)
        outcome: ShardedRegion | str = ""
        for _ in range(_MAX_RESTARTS + 1):
            prop = _Propagation(gm, seeds, world_size)
            try:
                outcome = prop.run()
            except _Decline as exc:
                outcome = str(exc)
            except _NeedSeeds as need:
                extra = [s for s in _upstream_sites(graph, need.operand, site_by_name)
                         if s not in seeds and s.node not in assigned]
                more = [t for s in extra for t in by_input[s.input] if t not in seeds and t.node not in assigned]
                if not more:
                    outcome = (f"{_where(need.operand)} must be sharded like the values it meets but does not come "
                               "from a linear layer graphopt can shard")
                    break
                seeds += list(dict.fromkeys(more))
                continue
            break
        label = "+".join(s.label for s in seeds)
        if isinstance(outcome, str):
            declined.append(Declined(label, outcome))
            continue
        if prop.indivisible:
            raise ShardingError(prop.indivisible[0])
        regions.append(outcome)
        assigned.update(s.node for s, _ in outcome.columns + outcome.rows)
    return TensorParallelPlan(world_size, regions, declined)


# --------------------------------------------------------------------------- rewrite


def _all_reduce(graph: fx.Graph, value: fx.Node, group_name: str) -> fx.Node:
    reduced = graph.call_function(torch.ops._c10d_functional.all_reduce.default, (value, "sum", group_name))
    return graph.call_function(torch.ops._c10d_functional.wait_tensor.default, (reduced,))


def _set_arg(node: fx.Node, key: int | str, value: Any) -> None:
    if isinstance(key, int):
        args = list(node.args)
        args[key] = value
        node.args = tuple(args)
    else:
        kwargs = dict(node.kwargs)
        kwargs[key] = value
        node.kwargs = kwargs


def _constant(gm: fx.GraphModule, before: fx.Node, name: str, value: torch.Tensor) -> fx.Node:
    target = ir.register_constant(gm, name, value)
    gm.meta["tensor_parallel_shards"] = [*gm.meta.get("tensor_parallel_shards", []), target]
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(target)
    node.meta.update({k: v for k, v in before.meta.items() if k in ("nn_module_stack", "stack_trace")})
    return node


def apply_plan(gm: fx.GraphModule, plan: TensorParallelPlan, rank: int, group_name: str) -> list[str]:
    """Rewrite ``gm`` in place into rank ``rank``'s part of ``plan``; returns the names of the nodes involved."""
    world = plan.world_size
    graph = gm.graph
    involved: list[str] = []
    for region in plan.regions:
        for node, key, value in region.arg_edits:
            _set_arg(node, key, value)
        for node, key, const, dim, blocks in region.const_edits:
            local = shard_tensor(ir.get_attr_value(gm, const), dim, blocks, rank, world)
            _set_arg(node, key, _constant(gm, node, f"{const.target}.tp{rank}", local))
        for site, blocks in region.columns:
            e = shard_tensor(site.effective_weight(gm).detach(), 1, blocks, rank, world)  # (in, out/W)
            bias = site.bias_value(gm)
            b_node = None
            if bias is not None:
                b_node = _constant(gm, site.node, f"{site.label}.bias.tp{rank}",
                                   shard_tensor(bias.detach(), 0, blocks, rank, world))
            if site.kind == "linear":
                w_node = _constant(gm, site.node, f"{site.label}.weight.tp{rank}", e.t().contiguous())
                site.node.args = (site.input, w_node) + ((b_node,) if b_node is not None else ())
                site.node.kwargs = {}
            elif site.kind == "addmm":
                w_node = _constant(gm, site.node, f"{site.label}.weight.tp{rank}", e)
                site.node.args = (b_node, site.input, w_node)
            else:
                w_node = _constant(gm, site.node, f"{site.label}.weight.tp{rank}", e)
                site.node.args = (site.input, w_node)
            involved.append(site.node.name)
        for site, blocks in region.rows:
            e = shard_tensor(site.effective_weight(gm).detach(), 0, blocks, rank, world)  # (in/W, out)
            node = site.node
            with graph.inserting_before(node):
                if site.kind == "linear":
                    w_node = _constant(gm, node, f"{site.label}.weight.tp{rank}", e.t().contiguous())
                    partial = graph.call_function(aten.linear.default, (site.input, w_node))
                else:
                    w_node = _constant(gm, node, f"{site.label}.weight.tp{rank}", e)
                    op = aten.matmul.default if site.kind == "matmul" else aten.mm.default
                    partial = graph.call_function(op, (site.input, w_node))
                total = _all_reduce(graph, partial, group_name)
                result = total
                if site.bias is not None:
                    result = graph.call_function(aten.add.Tensor, (total, site.bias))
            for new in (partial, total, total.args[0], result):
                new.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")})
            node.replace_all_uses_with(result)
            graph.erase_node(node)
            involved += [partial.name, total.name]
    ir.erase_dead(gm)
    return involved


def _distributed_defaults() -> tuple[int, int, str] | None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    return dist.get_world_size(), dist.get_rank(), dist.group.WORLD.group_name


class TensorParallel(Pass):
    name = "tensor_parallel"
    summary = "shard column -> row linear pairs (attention, FFN) over torch.distributed ranks, one all-reduce each"

    def __init__(self, world_size: int | None = None, rank: int | None = None, group_name: str | None = None) -> None:
        self.world_size, self.rank, self.group_name = world_size, rank, group_name

    def _setup(self) -> tuple[int, int, str] | None:
        if self.world_size is not None and self.rank is not None and self.group_name is not None:
            return self.world_size, self.rank, self.group_name
        return _distributed_defaults()

    def call(self, gm: fx.GraphModule, ctx: OptimizeContext) -> PassResult:
        setup = self._setup()
        if setup is None:
            return PassResult(gm, False, declined=[Declined(
                "model", "torch.distributed is not initialised; launch with `graphopt run --nproc N SPEC` "
                "or use graphopt.parallel.shard inside an initialised process group")])
        world, rank, group_name = setup
        if world == 1:
            return PassResult(gm, False, ["world size 1: nothing to shard"])
        plan = plan_tensor_parallel(gm, world)
        if not plan.regions:
            return PassResult(gm, False, ["found no column -> row pair to shard"], plan.declined)
        summary = {"world_size": world, "rank": rank, "regions": plan.summary(),
                   "sharded_full_bytes": plan.sharded_weight_bytes(gm),
                   "allreduce_bytes": plan.communication()}
        involved = apply_plan(gm, plan, rank, group_name)
        gm.meta["tensor_parallel"] = summary
        notes = [f"rank {rank}/{world}: sharded {len(plan.regions)} column -> row regions"] + plan.summary()
        return PassResult(gm, True, notes, plan.declined, involved)
