"""Forward propagation of a shard marking from the seed linears to the row linears that end a region."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from graphopt import ir
from graphopt.opsets import RESHAPES, SOFTMAX_FORMS, SPLITS_AND_UNBINDS
from graphopt.passes.analysis.sites.linear import LinearSite, linear_site
from graphopt.pattern import Decline
from graphopt.passes.tensor_parallel.shards import NeedSeeds, Shard, ShardedRegion, norm_dim, where
from graphopt.passes.tensor_parallel.view_rules import ViewRules

aten = torch.ops.aten


_SAME_SHAPE = {
    aten._to_copy.default, aten.contiguous.default, aten.alias.default, aten.detach.default,
    aten.dropout.default, aten.lift_fresh_copy.default, aten.clone.default, aten.type_as.default,
}
_REDUCTIONS = {aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.amin.default,
               aten.var.correction, aten.std.correction, aten.logsumexp.default}


class Propagation(ViewRules):
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
                    raise Decline(f"{where(node)} would be both a column and a row of one region")
                self._seed(self.seeds[node])
                continue
            if not any(a in self.states for a in node.all_input_nodes):
                continue
            if node.op == "output":
                src = next(a for a in node.all_input_nodes if a in self.states)
                raise Decline(f"a sharded value ({where(src)}) reaches the model output without a "
                               "row-parallel linear; kept replicated")
            state = self._visit(node)
            if state is not None:
                self.states[node] = state
                self.region.nodes.append(node)
        if not self.region.rows:
            raise Decline("no row-parallel linear consumes the sharded values")
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
            raise Decline(f"{where(node)} multiplies a constant weight with a value sharded along dim "
                           f"{state.dim}, not the contracted features")
        if site.weight in self.states or (site.bias is not None and site.bias in self.states):
            raise Decline(f"{where(node)}: weight is sharded")
        self.region.rows.append((site, state.blocks))
        self.region.nodes.append(node)

    # -- the rules
    def _visit(self, node: fx.Node) -> Any:
        if node.op != "call_function":
            raise Decline(f"{where(node)} ({node.op}) takes a sharded value")
        site = linear_site(node)
        if site is not None and site.declined is None and site.input in self.states:
            self._row(node, site, self.states[site.input])
            return None
        t = node.target
        if t is operator.getitem:
            src_state = self.states[node.args[0]]
            if isinstance(src_state, tuple):
                return src_state[node.args[1]]
            raise Decline(f"{where(node)}: indexing a sharded tensor")
        if t == aten._assert_tensor_metadata.default:
            if any(k in node.kwargs for k in ("size", "stride")) or len(node.args) > 1:
                raise Decline(f"{where(node)} asserts the global size of a sharded value")
            return None
        x = node.args[0] if node.args else None
        xs = self.states.get(x) if isinstance(x, fx.Node) else None
        if t in _SAME_SHAPE or (isinstance(t, torch._ops.OpOverload) and t.overloadpacket == aten.to):
            if xs is None or any(isinstance(a, fx.Node) and a in self.states for a in node.args[1:]):
                raise Decline(f"{where(node)}: unsupported use of a sharded value")
            return xs
        if isinstance(t, torch._ops.OpOverload) and (torch.Tag.pointwise in t.tags or t == aten.masked_fill.Tensor):
            return self._pointwise(node)
        if t in RESHAPES:
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
        if t in SPLITS_AND_UNBINDS:
            return self._split(node, xs)
        if t == aten.cat.default:
            return self._cat(node)
        if t in SOFTMAX_FORMS:
            nd = len(ir.shape_of(node) or ())
            if norm_dim(node.args[1], nd) == xs.dim:
                raise Decline(f"{where(node)}: softmax over the sharded dim")
            return xs
        if t in _REDUCTIONS:
            return self._reduction(node, xs)
        if t == aten.layer_norm.default:
            nd = len(ir.shape_of(x) or ())
            if xs.dim >= nd - len(node.args[1]):
                raise Decline(f"{where(node)}: layer_norm over the sharded features")
            return xs
        if t in (aten.matmul.default, aten.bmm.default, aten.mm.default):
            return self._matmul(node)
        if t in (aten.scaled_dot_product_attention.default,):
            return self._sdpa(node)
        raise Decline(f"{where(node)}: {ir.op_name(node)} is not known to act per head / per feature")

    def _check_unsharded_operand(self, node: fx.Node, arg_key: int | str, operand: fx.Node, out_dim: int,
                                 offset: int, blocks: tuple[int, ...]) -> None:
        shape = ir.shape_of(operand)
        if shape is None:
            raise Decline(f"{where(node)}: operand {operand.name} has an unknown shape")
        aligned = out_dim - offset
        if aligned < 0 or shape[aligned] == 1:
            return  # broadcast along the sharded dim: the same on every rank
        if operand.op == "get_attr":
            for b in blocks:
                self._divisible(b, f"{where(node)}: constant {operand.target} of {b} features cannot be divided")
            self.region.const_edits.append((node, arg_key, operand, aligned, blocks))
            return
        raise NeedSeeds(operand)

    def _pointwise(self, node: fx.Node) -> Shard:
        out_shape = ir.shape_of(node)
        if out_shape is None:
            raise Decline(f"{where(node)}: unknown output shape")
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
                raise Decline(f"{where(node)}: operands are sharded differently ({marking} vs {m})")
            marking = m
        assert marking is not None
        for key, a in operands:
            if a not in self.states and ir.tensor_meta(a) is not None:
                offset = nd - len(ir.shape_of(a) or ())
                self._check_unsharded_operand(node, key, a, marking.dim, offset, marking.blocks)
        return marking


    def _reduction(self, node: fx.Node, xs: Shard) -> Shard:
        nd = len(ir.shape_of(node.args[0]) or ())
        dims = node.args[1] if len(node.args) > 1 else None
        if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
            raise Decline(f"{where(node)}: reduction over all dims of a sharded value")
        dims = [norm_dim(d, nd) for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
        if xs.dim in dims:
            raise Decline(f"{where(node)}: reduction over the sharded dim")
        keepdim = bool(node.args[2]) if len(node.args) > 2 else bool(node.kwargs.get("keepdim", False))
        return xs if keepdim else Shard(xs.dim - sum(1 for d in dims if d < xs.dim), xs.blocks)

    def _matmul(self, node: fx.Node) -> Shard:
        a, b = node.args[0], node.args[1]
        sa, sb = self.states.get(a), self.states.get(b)
        shape_a, shape_b, out = ir.shape_of(a), ir.shape_of(b), ir.shape_of(node)
        if shape_a is None or shape_b is None or out is None or len(shape_a) < 2 or len(shape_b) < 2:
            raise Decline(f"{where(node)}: matmul of a sharded vector or unknown shape")
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
            raise Decline(f"{where(node)} contracts over the sharded dim outside a linear")

        ma = to_out(sa, na, "a") if sa is not None else None
        mb = to_out(sb, nb, "b") if sb is not None else None
        if ma is not None and mb is not None and ma != mb:
            raise Decline(f"{where(node)}: operands are sharded differently")
        marking = ma or mb
        assert marking is not None
        for other, n_other, st in ((a, na, sa), (b, nb, sb)):
            if st is not None:
                continue
            if marking.dim >= nd - 2:  # the other operand is not split along a batch dim: fine
                continue
            aligned = marking.dim - (nd - n_other)
            if aligned >= 0 and (ir.shape_of(other) or ())[aligned] != 1:
                raise NeedSeeds(other)
        return marking

    def _sdpa(self, node: fx.Node) -> Shard:
        q, k, v = node.args[:3]
        states = [self.states.get(x) for x in (q, k, v)]
        for x, st in zip((q, k, v), states):
            if st is None:
                raise NeedSeeds(x)
        nd = len(ir.shape_of(q) or ())
        if any(st.dim != nd - 3 for st in states):
            raise Decline(f"{where(node)}: attention inputs not sharded along heads")
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        if isinstance(mask, fx.Node):
            ms = self.states.get(mask)
            mshape = ir.shape_of(mask) or ()
            aligned = len(mshape) - 3
            if ms is None and aligned >= 0 and mshape[aligned] != 1:
                raise Decline(f"{where(node)}: per-head attention mask is not sharded")
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
        if user.target in SPLITS_AND_UNBINDS and user.target != aten.unbind.int:
            nd = len(ir.shape_of(node) or ())
            dim = user.args[2] if len(user.args) > 2 else user.kwargs.get("dim", 0)
            if norm_dim(dim, nd) != nd - 1:
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
                user.target in RESHAPES or user.target in _SAME_SHAPE):
            return (n,)
        node = user
    return (n,)
