"""Tensor-parallel propagation through views, slices, splits and cat: how a shard marking maps to the output."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx as fx

from graphopt import ir
from graphopt.pattern import Decline
from graphopt.passes.tensor_parallel.shards import NeedSeeds, Shard, norm_dim, prod, view_groups, where

aten = torch.ops.aten


class ViewRules:
    """The propagation rules for views, slices, splits and cat (a mixin of :class:`Propagation`)."""

    world: int

    def _local_shape(self, shape: Sequence[int], state: Shard) -> list[int]:
        local = list(shape)
        local[state.dim] = shape[state.dim] // self.world
        return local

    def _map_view(self, node: fx.Node, in_shape: Sequence[int], out_shape: Sequence[int], xs: Shard) -> Shard:
        groups = view_groups(in_shape, out_shape)
        if groups is None:
            raise Decline(f"{where(node)}: cannot follow the view {list(in_shape)} -> {list(out_shape)}")
        gi, gj = next(g for g in groups if xs.dim in g[0])
        if not gj:
            raise Decline(f"{where(node)}: the sharded dim disappears in the view")
        if len(gi) == 1 and len(gj) == 1:  # the sharded dim is kept whole
            return Shard(gj[0], xs.blocks)
        k = len(xs.blocks)
        if len(set(xs.blocks)) != 1:
            raise Decline(f"{where(node)}: view of unequally blocked sharded features")
        pos = gi.index(xs.dim)
        pre_in = prod([in_shape[d] for d in gi[:pos]]) * k
        prefix = 1
        for j in gj:
            if out_shape[j] == 1:
                continue
            if pre_in % prefix == 0:
                m = pre_in // prefix
                if out_shape[j] % m == 0 and out_shape[j] // m > 0 and (prefix * out_shape[j]) % pre_in == 0:
                    size = out_shape[j] // m
                    suffix = prod([out_shape[d] for d in gj[gj.index(j) + 1:]])
                    what = "attention heads" if suffix > 1 else "features"
                    if size % self.world:
                        self.indivisible.append(
                            f"{ir.module_path(node) or node.name}: {size} {what} (view to {list(out_shape)}"
                            f"{' at ' + ir.source_line(node) if ir.source_line(node) else ''}) cannot be divided "
                            f"among {self.world} processes; use a world size that divides {size}")
                    return Shard(j, (size,) * m)
            prefix *= out_shape[j]
        raise Decline(f"{where(node)}: the view {list(in_shape)} -> {list(out_shape)} mixes the sharded features "
                       "with other dims")

    def _view(self, node: fx.Node, xs: Shard, shape_arg: int | None) -> Shard:
        in_shape, out_shape = ir.shape_of(node.args[0]), ir.shape_of(node)
        if in_shape is None or out_shape is None:
            raise Decline(f"{where(node)}: symbolic sizes along the sharded dim")
        out = self._map_view(node, in_shape, out_shape, xs)
        if shape_arg is not None:
            requested = node.args[shape_arg]
            if any(isinstance(s, fx.Node) for s in requested):
                raise Decline(f"{where(node)}: symbolic sizes in a view of a sharded value")
            local = self._local_shape(out_shape, out)
            new = [-1 if s == -1 else local[i] for i, s in enumerate(requested)]
            if new != list(requested):
                self.region.arg_edits.append((node, shape_arg, new))
        return out

    def _unflatten(self, node: fx.Node, xs: Shard) -> Shard:
        in_shape, out_shape = ir.shape_of(node.args[0]), ir.shape_of(node)
        out = self._map_view(node, in_shape, out_shape, xs)  # type: ignore[arg-type]
        dim = norm_dim(node.args[1], len(in_shape))  # type: ignore[arg-type]
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
            raise Decline(f"{where(node)}: symbolic expand size along the sharded dim")
        if s != -1:
            sizes[out.dim] = out_shape[out.dim] // self.world  # type: ignore[index]
            self.region.arg_edits.append((node, 1, sizes))
        return out

    def _permute(self, node: fx.Node, xs: Shard) -> Shard:
        nd = len(ir.shape_of(node) or ())
        if node.target == aten.permute.default:
            dims = [norm_dim(d, nd) for d in node.args[1]]
            return Shard(dims.index(xs.dim), xs.blocks)
        if node.target == aten.t.default:
            return Shard(nd - 1 - xs.dim if nd == 2 else xs.dim, xs.blocks)
        a, b = norm_dim(node.args[1], nd), norm_dim(node.args[2], nd)
        return Shard(b if xs.dim == a else a if xs.dim == b else xs.dim, xs.blocks)

    def _squeeze(self, node: fx.Node, xs: Shard) -> Shard:
        in_shape, out_shape = ir.shape_of(node.args[0]), ir.shape_of(node)
        if node.target == aten.unsqueeze.default:
            d = norm_dim(node.args[1], len(out_shape))  # type: ignore[arg-type]
            return Shard(xs.dim + (1 if d <= xs.dim else 0), xs.blocks)
        if node.target == aten.squeeze.default:
            removed = [i for i, s in enumerate(in_shape) if s == 1]  # type: ignore[arg-type]
        else:
            dims = node.args[1] if node.target == aten.squeeze.dims else [node.args[1]]
            removed = [norm_dim(d, len(in_shape)) for d in dims if in_shape[norm_dim(d, len(in_shape))] == 1]  # type: ignore
        return Shard(xs.dim - sum(1 for d in removed if d < xs.dim), xs.blocks)

    def _slice(self, node: fx.Node, xs: Shard) -> Shard:
        nd = len(ir.shape_of(node.args[0]) or ())
        dim = norm_dim(node.args[1] if len(node.args) > 1 else 0, nd)
        if dim == xs.dim:
            in_shape, out_shape = ir.shape_of(node.args[0]), ir.shape_of(node)
            if node.target == aten.slice.Tensor and in_shape == out_shape:
                return xs  # a full slice
            raise Decline(f"{where(node)}: {ir.op_name(node)} along the sharded dim")
        if node.target == aten.select.int:
            return Shard(xs.dim - (1 if dim < xs.dim else 0), xs.blocks)
        return xs

    def _split(self, node: fx.Node, xs: Shard) -> tuple[Shard, ...]:
        in_shape = ir.shape_of(node.args[0]) or ()
        nd = len(in_shape)
        t = node.target
        if t == aten.unbind.int:
            dim = norm_dim(node.args[1] if len(node.args) > 1 else 0, nd)
            if dim == xs.dim:
                raise Decline(f"{where(node)}: unbind along the sharded dim")
            return tuple(Shard(xs.dim - (1 if dim < xs.dim else 0), xs.blocks) for _ in range(in_shape[dim]))
        dim = norm_dim(node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0), nd)
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
            raise Decline(f"{where(node)}: split of the sharded dim into {sizes} does not follow its blocks "
                           f"{list(xs.blocks)}")
        if t == aten.split.Tensor:
            self.region.arg_edits.append((node, 1, node.args[1] // self.world))
        elif t == aten.split_with_sizes.default:
            self.region.arg_edits.append((node, 1, [s // self.world for s in sizes]))
        return tuple(Shard(dim, (s,)) for s in sizes)

    def _cat(self, node: fx.Node) -> Shard:
        tensors = list(node.args[0])
        nd = len(ir.shape_of(node) or ())
        dim = norm_dim(node.args[1] if len(node.args) > 1 else 0, nd)
        states = [self.states.get(t) for t in tensors]
        if any(s is None for s in states):
            missing = next(t for t, s in zip(tensors, states) if s is None)
            raise NeedSeeds(missing)
        if dim == states[0].dim:  # pieces concatenated along the sharded dim: a blocked result
            if not all(s.dim == dim for s in states):
                raise Decline(f"{where(node)}: cat of differently sharded values")
            return Shard(dim, tuple(b for s in states for b in s.blocks))
        if any(s != states[0] for s in states):
            raise Decline(f"{where(node)}: cat of differently sharded values")
        return states[0]
