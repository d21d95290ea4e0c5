"""Recompute a slice of a large tensor from its producers instead of keeping it whole.

``RowSlicer(gm).slice(node, axis, start, stop, builder)`` returns a node whose
value is ``node``'s value narrowed to ``[start, stop)`` along ``axis``. Large
intermediate producers (more than ``leaf_bytes``) are *recomputed* on the
slice -- their small inputs are sliced instead -- so the full tensor need not
exist. This is what lets blocked attention drop a T5 relative-position bias
or a materialised ``(T, T)`` mask: each query block recomputes its rows.

Followed backwards, per op:
    pointwise ops (``Tag.pointwise``, casts, ``full_like``...) -> slice each
        input that is not broadcast along the axis
    unsqueeze / squeeze / permute / transpose / t / select -> the matching input axis
    expand -> slice the input, shrink the expanded size
    slice on the axis -> shift the range; on another axis -> slice then re-slice
    embedding(weight, idx) -> slice idx (axis must not be the embedding dim)
    index.Tensor(x, [i0, ..., in]) covering every dim -> slice the index tensors
    view / reshape that only adds or drops size-1 dims -> the matching input axis
    in-place ops (``add_``) -> their out-of-place form (the mutated input must
    have no other user)
Small values, placeholders and ``get_attr`` constants are leaves: sliced by a
view (``aten.slice``). Anything else stops the walk; :meth:`RowSlicer.why_not`
says where.

(Inductor's auto-chunker does a related analysis for training graphs; it is
off by default and not reusable on an inference ``GraphModule``, hence this.)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from graphopt import ir
from graphopt.opsets import CASTS_INCLUDING_DEVICE, DTYPE_CASTS, IDENTITY_LIKE, RESHAPES, is_inactive_dropout, is_inplace_op
from graphopt.node_builder import NodeBuilder, fake_mode_of, set_fake_val

aten = torch.ops.aten

__all__ = ["RowSlicer", "DEFAULT_LEAF_BYTES"]

DEFAULT_LEAF_BYTES = 1 << 20

_UNARY_LIKE = CASTS_INCLUDING_DEVICE | IDENTITY_LIKE | {
    aten.full_like.default,
    aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default,
    aten.lift_fresh_copy.default,
    # elementwise ops the pointwise tag misses
    aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar, aten.__and__.Tensor, aten.__or__.Tensor,
    aten.__xor__.Tensor,
}


def _nbytes(node: fx.Node) -> int:
    val = ir.tensor_meta(node)
    if val is None:
        return 0
    return int(val.numel() * val.element_size())


def _rank(node: Any) -> int:
    val = ir.tensor_meta(node)
    return val.ndim if val is not None else 0


def _norm(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


def _functional(target: Any) -> Any:
    """``aten.add_.Tensor`` -> ``aten.add.Tensor`` (None when there is no such op)."""
    if not is_inplace_op(target):
        return target
    name = target._schema.name.split("::")[-1].rstrip("_")
    packet = getattr(aten, name, None)
    return getattr(packet, target._overloadname, None) if packet is not None else None


def _is_pointwise(target: Any) -> bool:
    if target in _UNARY_LIKE:
        return True
    return isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags


def _squeeze_map(in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> dict[int, int] | None:
    """out axis -> in axis when the reshape only adds/drops size-1 dims, else None."""
    in_dims = [i for i, s in enumerate(in_shape) if s != 1]
    out_dims = [i for i, s in enumerate(out_shape) if s != 1]
    if [in_shape[i] for i in in_dims] != [out_shape[i] for i in out_dims]:
        return None
    return dict(zip(out_dims, in_dims))


def functionalize_inplace(gm: fx.GraphModule) -> int:
    """Replace in-place ops whose mutated input nobody else reads by their out-of-place form.

    ``add_(a, b)`` where ``a`` has no other user -> ``add(a, b)``: the same
    values, and ``a`` (possibly a folded constant) is no longer mutated, so a
    slice of it can be read at any point. Returns how many nodes were replaced.
    """
    count = 0
    fake_mode = fake_mode_of(gm)
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not is_inplace_op(node.target):
            continue
        mutated = node.args[0] if node.args else None
        functional = _functional(node.target)
        if functional is None or not isinstance(mutated, fx.Node) or len(mutated.users) != 1 \
                or mutated.op == "placeholder":
            continue
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(functional, node.args, dict(node.kwargs))
        new.meta.update(node.meta)
        set_fake_val(new, fake_mode)  # its own storage now, not the mutated input's
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        count += 1
    return count


class RowSlicer:
    """Emit slices of values by recomputing their large producers (see module docstring)."""

    def __init__(self, gm: fx.GraphModule, leaf_bytes: int = DEFAULT_LEAF_BYTES) -> None:
        self.gm = gm
        self.leaf_bytes = leaf_bytes
        self._why: dict[tuple[fx.Node, int], str] = {}
        self._cheap: dict[fx.Node, bool] = {}
        self._relative: dict[tuple[fx.Node, int], Any] = {}
        self._relative_tables: dict[Any, fx.Node] = {}

    # ------------------------------------------------------------ analysis
    def is_cheap(self, node: fx.Node) -> bool:
        """An input, a constant, a creation op, or a small value computed only from cheap values."""
        if node not in self._cheap:
            self._cheap[node] = node.op != "call_function" or not node.all_input_nodes or (
                _nbytes(node) <= self.leaf_bytes and all(self.is_cheap(i) for i in node.all_input_nodes))
        return self._cheap[node]

    def is_leaf(self, node: fx.Node, axis: int | None = None) -> bool:
        """Sliced by a view rather than recomputed.

        Cheap values are leaves. A small value computed from large ones is
        recomputed (so the large ones can die) when it can be along ``axis``,
        else it is a leaf too.
        """
        if self.is_cheap(node):
            return True
        if _nbytes(node) > self.leaf_bytes:
            return False
        return axis is None or bool(self._compute_reason(node, axis))

    def why_not(self, node: fx.Node, axis: int) -> str:
        """'' when ``node`` can be sliced along ``axis`` without materialising it, else the reason."""
        shape = ir.shape_of(node)
        if shape is None:
            return f"{node.name} has no static shape"
        if shape[axis] == 1 or self.is_leaf(node, axis):
            return ""
        return self._compute_reason(node, axis)

    def _compute_reason(self, node: fx.Node, axis: int) -> str:
        """'' when ``node``'s rows can be computed from its inputs' rows (recursively), else why not."""
        key = (node, axis)
        if key not in self._why:
            self._why[key] = "(cycle)"
            self._why[key] = self._check(node, axis)
        return self._why[key]

    def _check(self, node: fx.Node, axis: int) -> str:
        shape = ir.shape_of(node)
        if shape is None:
            return f"{node.name} has no static shape"
        if node.op != "call_function":
            return f"{node.name} is an input"
        if self.relative_grid(node, axis) is not None:
            return ""
        target = node.target
        if _functional(target) is None:
            return f"{node.name}: in-place {ir.op_name(node)} has no out-of-place form"
        if is_inplace_op(target):
            mutated = node.args[0]
            if isinstance(mutated, fx.Node) and len(mutated.users) > 1:
                return f"{node.name}: in-place {ir.op_name(node)} on a value other nodes read"
        try:
            pairs = self._input_axes(node, axis)
        except _Unsupported as exc:
            return f"{node.name}: {exc}"
        for inp, in_ax in pairs:
            if in_ax is not None:
                reason = self.why_not(inp, in_ax)
                if reason:
                    return reason
        return ""

    # ------------------------------------------------------------ relative-position grids
    def relative_grid(self, node: fx.Node, axis: int) -> tuple[fx.Node, int, list[fx.Node]] | None:
        """``(grid, other_axis, region)`` when ``node`` is a pointwise function (``embedding`` allowed)
        of a grid ``R[p, q] = (q + c1) - (p + c2)`` (or its negation) whose varying axes are ``axis``
        and ``other_axis``: T5's relative-position buckets. Its rows are then gathered from the
        function evaluated once on the ``Tq + Tk - 1`` distinct values of ``q - p``.
        ``region``: the nodes from the grid (excluded) to ``node`` in graph order.
        """
        key = (node, axis)
        if key not in self._relative:
            self._relative[key] = self._find_relative(node, axis)
        return self._relative[key]

    def _find_relative(self, node: fx.Node, axis: int) -> tuple[fx.Node, int, list[fx.Node]] | None:
        if self._grid_axes(node) is not None:
            return None  # the grid itself: slicing its two position ranges is cheaper
        region: list[fx.Node] = []
        grid: fx.Node | None = None
        stack, seen = [node], set()
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if self._grid_axes(n) is not None:
                if grid is not None and grid is not n:
                    return None
                grid = n
                continue
            if n.op != "call_function" or _functional(n.target) is None:
                return None
            if n.target is aten.embedding.default:
                inputs = [n.args[1]]
            elif _is_pointwise(n.target):
                inputs = [a for a in n.all_input_nodes if ir.tensor_meta(a) is not None]
            else:
                return None
            region.append(n)
            for inp in inputs:
                shape = ir.shape_of(inp)
                if shape is None:
                    return None
                if all(d == 1 for d in shape):
                    continue  # a scalar broadcast over the grid
                stack.append(inp)
        if grid is None:
            return None
        axes = self._grid_axes(grid)
        grid_shape = ir.shape_of(grid)
        for n in region:  # every value keeps the grid's leading shape (embedding adds trailing dims)
            if tuple(ir.shape_of(n)[:len(grid_shape)]) != tuple(grid_shape):
                return None
        if axis not in axes:
            return None
        order = {n: i for i, n in enumerate(self.gm.graph.nodes)}
        region.sort(key=order.__getitem__)
        return grid, axes[1] if axes[0] == axis else axes[0], region

    def _grid_axes(self, node: fx.Node) -> tuple[int, int] | None:
        """The two axes of ``sub(x, y)`` when x and y are unit-step position ranges along different axes."""
        if node.op != "call_function" or node.target is not aten.sub.Tensor or node.kwargs.get("alpha", 1) != 1:
            return None
        x, y = node.args[0], node.args[1]
        ax, ay = self._position_axis(x), self._position_axis(y)
        if ax is None or ay is None or ax == ay:
            return None
        shape = ir.shape_of(node)
        if any(d != 1 for i, d in enumerate(shape) if i not in (ax + len(shape) - _rank(x),
                                                                ay + len(shape) - _rank(y))):
            return None
        return tuple(sorted((ax + len(shape) - _rank(x), ay + len(shape) - _rank(y))))

    def _position_axis(self, node: Any, depth: int = 0) -> int | None:
        """The axis along which ``node`` holds ``arange(n) + c`` (all other dims size 1), else None."""
        if not isinstance(node, fx.Node) or node.op != "call_function" or depth > 12:
            return None
        shape = ir.shape_of(node)
        if shape is None:
            return None
        t, a = node.target, node.args
        if t is aten.arange.default or (t is aten.arange.start and (len(a) < 3 or a[2] == 1)):
            return 0 if len(shape) == 1 else None
        if t is aten.arange.start_step and a[2] == 1:
            return 0
        if t in (aten.add.Tensor, aten.sub.Tensor) and isinstance(a[1], (int, float)) \
                and node.kwargs.get("alpha", 1) == 1:
            return self._position_axis(a[0], depth + 1)
        if t in DTYPE_CASTS or t in (aten.alias.default, aten.clone.default):
            return self._position_axis(a[0], depth + 1)
        if t is aten.unsqueeze.default:
            inner = self._position_axis(a[0], depth + 1)
            if inner is None:
                return None
            d = _norm(a[1], len(shape))
            return inner if inner < d else inner + 1
        if t in RESHAPES or t in (aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default):
            inner = self._position_axis(a[0], depth + 1)
            mapping = _squeeze_map(ir.shape_of(a[0]), shape)
            if inner is None or mapping is None:
                return None
            back = {v: k for k, v in mapping.items()}
            return back.get(inner)
        return None

    def _emit_relative(self, node: fx.Node, axis: int, start: int, stop: int,
                       grid_info: tuple[fx.Node, int, list[fx.Node]], builder: NodeBuilder,
                       memo: dict[Any, fx.Node]) -> fx.Node:
        grid, other, region = grid_info
        grid_shape = ir.shape_of(grid)
        n_axis, n_other = grid_shape[axis], grid_shape[other]
        key = ("relative", node, axis)
        table = self._relative_tables.get((key, id(builder)))
        if table is None:
            table = self._relative_table(node, axis, grid_info, builder)
            self._relative_tables[(key, id(builder))] = table
        # rows [start, stop) along axis: value at (p, q) is table[q - p + n_axis - 1]
        device = ir.tensor_meta(grid).device
        rank = len(grid_shape)
        p_shape, q_shape = [1] * rank, [1] * rank
        p_shape[axis], q_shape[other] = stop - start, n_other
        ps = builder.call(aten.reshape.default, builder.call(aten.arange.start, start, stop, dtype=torch.int64,
                                                             device=device), p_shape)
        qs = builder.call(aten.reshape.default, builder.call(aten.arange.default, n_other, dtype=torch.int64,
                                                             device=device), q_shape)
        index = builder.call(aten.add.Tensor, builder.call(aten.sub.Tensor, qs, ps), n_axis - 1)
        return builder.call(aten.index.Tensor, table, [index])

    def _relative_table(self, node: fx.Node, axis: int, grid_info: tuple[fx.Node, int, list[fx.Node]],
                        builder: NodeBuilder) -> fx.Node:
        """``node``'s function evaluated on the distinct grid values, as ``[n_axis + n_other - 1, *trailing]``."""
        grid, other, region = grid_info
        grid_shape = ir.shape_of(grid)
        rank, n_axis, n_other = len(grid_shape), grid_shape[axis], grid_shape[other]
        # the grid's line at other=0 (all p) and at axis=0 (all q), recomputed from the position ranges
        line_p = self.slice(grid, other, 0, 1, builder, {})
        line_q = self.slice(grid, axis, 0, 1, builder, {})
        flat_p = builder.call(aten.reshape.default, builder.call(aten.flip.default, line_p, [axis]), [n_axis])
        flat_q = builder.call(aten.reshape.default, line_q, [n_other])
        values = builder.call(aten.cat.default, [flat_p, builder.call(aten.slice.Tensor, flat_q, 0, 1, n_other)])
        length = n_axis + n_other - 1
        shape = [1] * rank
        shape[axis] = length
        env = {grid: builder.call(aten.reshape.default, values, shape)}
        for n in region:  # the region's ops on the (length,)-long line instead of the grid
            args = fx.node.map_arg(n.args, lambda a: env.get(a, a))
            kwargs = fx.node.map_arg(n.kwargs, lambda a: env.get(a, a))
            env[n] = builder.call(_functional(n.target), *args, **kwargs)
        out_shape = ir.shape_of(node)
        return builder.call(aten.reshape.default, env[node], [length] + list(out_shape[rank:]))

    def _input_axes(self, node: fx.Node, axis: int) -> list[tuple[fx.Node, int | None]]:
        """For each tensor input of ``node``: the axis holding ``node``'s ``axis`` rows (None: broadcast)."""
        target, args = node.target, node.args
        out_shape = ir.shape_of(node)
        rank = len(out_shape)
        if target in (aten.embedding.default,):
            idx = args[1]
            if axis >= _rank(idx):
                raise _Unsupported("slicing the embedding dimension")
            return [(idx, axis)]
        if target is aten.index.Tensor:
            x, indices = args[0], args[1]
            if any(i is None for i in indices) or len(indices) != _rank(x):
                raise _Unsupported("index with slices or None (only full advanced indexing is followed)")
            return [(i, self._broadcast_axis(i, axis, rank)) for i in indices]
        if target is aten.unsqueeze.default:
            d = _norm(args[1], rank)
            return [(args[0], axis if axis < d else axis - 1)]
        if target in (aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default):
            mapping = _squeeze_map(ir.shape_of(args[0]), out_shape)
            return [(args[0], mapping[axis])]
        if target is aten.permute.default:
            return [(args[0], _norm(args[1][axis], rank))]
        if target is aten.transpose.int:
            d0, d1 = _norm(args[1], rank), _norm(args[2], rank)
            return [(args[0], d1 if axis == d0 else d0 if axis == d1 else axis)]
        if target is aten.t.default:
            return [(args[0], 1 - axis if rank == 2 else axis)]
        if target is aten.select.int:
            d = _norm(args[1], _rank(args[0]))
            return [(args[0], axis if axis < d else axis + 1)]
        if target is aten.expand.default:
            return [(args[0], self._broadcast_axis(args[0], axis, rank))]
        if target is aten.slice.Tensor:
            d = _norm(args[1] if len(args) > 1 else 0, rank)
            step = args[4] if len(args) > 4 else 1
            if d == axis and step != 1:
                raise _Unsupported("strided slice along the sliced axis")
            return [(args[0], axis)]
        if target in RESHAPES:
            mapping = _squeeze_map(ir.shape_of(args[0]), out_shape)
            if mapping is None or axis not in mapping:
                raise _Unsupported(f"{ir.op_name(node)} {ir.shape_of(args[0])} -> {out_shape} mixes the axis")
            return [(args[0], mapping[axis])]
        if target is aten.dropout.default:
            if not is_inactive_dropout(node):
                raise _Unsupported("dropout in training mode")
            return [(args[0], axis)]
        if _is_pointwise(target):
            pairs: list[tuple[fx.Node, int | None]] = []
            for a in list(args) + list(node.kwargs.values()):
                for inp in (a if isinstance(a, (list, tuple)) else [a]):
                    if isinstance(inp, fx.Node) and ir.tensor_meta(inp) is not None:
                        pairs.append((inp, self._broadcast_axis(inp, axis, rank)))
            return pairs
        raise _Unsupported(f"{ir.op_name(node)} is not followed")

    @staticmethod
    def _broadcast_axis(inp: fx.Node, axis: int, out_rank: int) -> int | None:
        shape = ir.shape_of(inp)
        aligned = axis - (out_rank - len(shape))
        if aligned < 0 or shape[aligned] == 1:
            return None
        return aligned

    # ------------------------------------------------------------ emission
    def slice(self, node: fx.Node, axis: int, start: int, stop: int, builder: NodeBuilder,
              memo: dict[Any, fx.Node] | None = None) -> fx.Node:
        """A node holding ``node``'s value narrowed to ``[start, stop)`` along ``axis``.

        Call :meth:`why_not` first; ``memo`` shares work between slices of one block.
        """
        memo = {} if memo is None else memo
        key = (node, axis, start, stop)
        if key in memo:
            return memo[key]
        out = self._emit(node, axis, start, stop, builder, memo)
        memo[key] = out
        return out

    def _emit(self, node: fx.Node, axis: int, start: int, stop: int, builder: NodeBuilder,
              memo: dict[Any, fx.Node]) -> fx.Node:
        shape = ir.shape_of(node)
        if shape[axis] == 1:
            return node
        if start == 0 and stop >= shape[axis]:
            return node
        if self.is_leaf(node, axis):
            return builder.call(aten.slice.Tensor, node, axis, start, stop)
        grid = self.relative_grid(node, axis)
        if grid is not None:
            return self._emit_relative(node, axis, start, stop, grid, builder, memo)
        target, args = node.target, list(node.args)
        rank = len(shape)
        sub = lambda n, ax: self.slice(n, ax, start, stop, builder, memo)  # noqa: E731
        if target is aten.embedding.default:
            args[1] = sub(args[1], axis)
        elif target is aten.index.Tensor:
            args[1] = [self._maybe(i, self._broadcast_axis(i, axis, rank), sub) for i in args[1]]
        elif target is aten.slice.Tensor:
            d = _norm(args[1] if len(args) > 1 else 0, rank)
            if d == axis:
                in_size = ir.shape_of(args[0])[axis]
                s0 = args[2] if len(args) > 2 and args[2] is not None else 0
                s0 = max(0, min(in_size, s0 + in_size if s0 < 0 else s0))
                return self.slice(args[0], axis, s0 + start, s0 + stop, builder, memo)
            args[0] = sub(args[0], axis)
        elif target is aten.expand.default:
            in_ax = self._broadcast_axis(args[0], axis, rank)
            args[0] = self._maybe(args[0], in_ax, sub)
            sizes = list(args[1])
            sizes[axis] = stop - start
            args[1] = sizes
        elif target in RESHAPES:
            mapping = _squeeze_map(ir.shape_of(args[0]), shape)
            args[0] = sub(args[0], mapping[axis])
            new_shape = list(shape)
            new_shape[axis] = stop - start
            return builder.call(aten.reshape.default, args[0], new_shape)
        elif target in (aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
                        aten.permute.default, aten.transpose.int, aten.t.default, aten.select.int,
                        aten.dropout.default):
            (inp, in_ax), = self._input_axes(node, axis)
            args[0] = sub(inp, in_ax)
        else:  # pointwise
            kwargs = dict(node.kwargs)
            args = [self._slice_arg(a, axis, rank, sub) for a in args]
            kwargs = {k: self._slice_arg(v, axis, rank, sub) for k, v in kwargs.items()}
            return builder.call(_functional(target), *args, **kwargs)
        return builder.call(_functional(target), *args, **dict(node.kwargs))

    def _slice_arg(self, a: Any, axis: int, rank: int, sub: Any) -> Any:
        if isinstance(a, (list, tuple)):
            return type(a)(self._slice_arg(x, axis, rank, sub) for x in a)
        if isinstance(a, fx.Node) and ir.tensor_meta(a) is not None:
            return self._maybe(a, self._broadcast_axis(a, axis, rank), sub)
        return a

    @staticmethod
    def _maybe(n: fx.Node, ax: int | None, sub: Any) -> fx.Node:
        return n if ax is None else sub(n, ax)


class _Unsupported(Exception):
    pass
