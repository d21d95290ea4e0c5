"""Per-node cost model: FLOPs and bytes moved.

:func:`node_cost` reads a node's ``meta["val"]`` (and its inputs') and returns
a :class:`NodeCost`:

* ``flops`` -- floating-point operations. Matmul-class ops (``mm``, ``bmm``,
  ``addmm``, ``baddbmm``, ``matmul``, ``linear``, ``einsum``, convolutions,
  ``scaled_dot_product_attention``) count ``2*M*N*K`` multiply-adds exactly as
  ``torch.utils.flop_counter.FlopCounterMode`` does (bias adds not counted).
  Other ops (elementwise, softmax, norms, reductions) count a few FLOPs per
  element (:data:`ELEMENTWISE_FLOPS`); their ``category`` tells them apart, so
  whole-model figures can be given in FlopCounterMode's convention
  (:data:`MATMUL_CATEGORIES`) with the rest reported beside them.
* ``bytes_read`` -- distinct bytes of every tensor input (a broadcast
  ``expand`` reads its small source once: stride-0 dims are not counted);
  ``bytes_written`` -- bytes of every tensor output.
* views and ops whose output aliases an input (:func:`alias_source`) cost
  nothing.

graphopt's own operators declare their cost in their module
(:mod:`graphopt.ops.declare`); :func:`register_cost` gives one to an op
graphopt does not own. :func:`annotate_costs` predicts each node's time on a
:class:`graphopt.target.Roofline` (:mod:`graphopt.target.roofline`).

Not ``FlopCounterMode``: it runs the graph and sees only matmul-class ops; the
roofline needs bytes and a cost for every node, from metadata alone. The
tests hold us to FlopCounterMode's totals.
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.fx as fx

from graphopt import meta, ops
from graphopt.ir import VIEW_OPS
from graphopt.opsets import MATMUL_OPS, SOFTMAX_FORMS_INCLUDING_SAFE, is_inactive_dropout
from graphopt.tensor_sizes import (  # noqa: F401  (re-exported: the cost model's users read sizes from here)
    _int, distinct_bytes, itemsize, nbytes, numel, shape, storage_bytes, tensors_in, val_of,
)
from graphopt.ops.declare import OpCall
from graphopt.target.roofline import Roofline

log = logging.getLogger(__name__)

aten = torch.ops.aten

#: categories whose FLOPs FlopCounterMode counts ("model FLOPs")
MATMUL_CATEGORIES = frozenset({"matmul", "conv", "attention"})

#: every category :func:`node_cost` assigns
CATEGORIES = (
    "matmul", "conv", "attention", "softmax", "norm", "elementwise", "reduction", "pool",
    "gather", "copy", "view", "custom", "other", "none",
)


@dataclass
class NodeCost:
    """The cost of one node.

    ``flops``/``bytes_read``/``bytes_written`` come from :func:`node_cost`;
    ``bound``, ``predicted_s`` and ``measured_s`` are filled by the analysis
    (:func:`annotate_costs` on a :class:`graphopt.target.Roofline`, the measured profile).
    """

    flops: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    category: str = "none"
    bound: str = ""  # 'compute' | 'memory' once predicted ('' for free nodes)
    predicted_s: float = 0.0
    measured_s: float | None = None

    @property
    def bytes(self) -> int:
        """Bytes moved: read + written."""
        return self.bytes_read + self.bytes_written

    @property
    def intensity(self) -> float:
        """Arithmetic intensity, FLOPs per byte moved (0 when nothing moves)."""
        return self.flops / self.bytes if self.bytes else 0.0

    @property
    def is_matmul_class(self) -> bool:
        """True for matmul, convolution and attention (FlopCounterMode's FLOPs)."""
        return self.category in MATMUL_CATEGORIES

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bytes"] = self.bytes
        d["intensity"] = self.intensity
        return d


CostFn = Callable[[fx.Node], NodeCost]

_REGISTRY: dict[Any, CostFn] = {}


def register_cost(op: Any, fn: CostFn) -> CostFn:
    """Register ``fn(node) -> NodeCost`` as the cost of ``op``, an operator graphopt does not own.

    (graphopt's own operators declare their cost in their module instead:
    :mod:`graphopt.ops.declare`.) ``op`` is an OpOverload (``torch.ops.graphopt.x.default``), an
    OpOverloadPacket (``torch.ops.graphopt.x``, covering all overloads) or any
    other call_function target. Returns ``fn`` (usable as a decorator helper).
    """
    _REGISTRY[op] = fn
    return fn


def registered_cost(op: Any) -> CostFn | None:
    """The cost function of ``op``: registered (for ``op`` or its packet), or declared by a graphopt op."""
    fn = _REGISTRY.get(op)
    if fn is None and isinstance(op, torch._ops.OpOverload):
        fn = _REGISTRY.get(op.overloadpacket)
    if fn is None:
        declaration = ops.declaration_for(op)
        if declaration is not None and declaration.cost is not None:
            return _declared_cost(declaration.cost)
    return fn


def _declared_cost(cost: Callable[[OpCall], Any]) -> CostFn:
    def node_cost_of(node: fx.Node) -> NodeCost:
        c = cost(OpCall(node))
        return NodeCost(c.flops, c.bytes_read, c.bytes_written, c.category)

    return node_cost_of


# --------------------------------------------------------------------------- bytes of a node


def _input_tensor_nodes(node: fx.Node) -> list[fx.Node]:
    return [n for n in node.all_input_nodes if tensors_in(val_of(n))]


def _bytes_read(node: fx.Node) -> int:
    seen: set[str] = set()
    total = 0
    for n in _input_tensor_nodes(node):
        if n.name in seen:
            continue
        seen.add(n.name)
        total += sum(distinct_bytes(t) for t in tensors_in(val_of(n)))
    return total


def _bytes_written(node: fx.Node) -> int:
    return sum(nbytes(t) for t in tensors_in(val_of(node)))


# --------------------------------------------------------------------------- aliasing


_MAYBE_VIEW = {aten.reshape.default, aten.flatten.using_ints}
_SAME_DTYPE_ALIAS = {aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.to.other, aten.type_as.default}


def alias_source(node: fx.Node) -> fx.Node | None:
    """The input node whose storage ``node``'s output shares, or None if it allocates.

    Views (:data:`graphopt.ir.VIEW_OPS`) alias their first input, except a
    ``reshape``/``flatten`` that has to copy; ``getitem`` of a view-producing
    op (split, unbind) aliases the split tensor; ``dropout`` in eval mode,
    ``contiguous`` of a contiguous tensor and ``to`` without a dtype/device
    change return their input, as eager PyTorch does.
    """
    if node.op != "call_function":
        return None
    target = node.target
    first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if first is None:
        return None
    if target is operator.getitem:
        src = first
        return src if src.op == "call_function" and src.target in VIEW_OPS else None
    if target in _MAYBE_VIEW:
        return first if _reshape_is_view(first, node) else None
    if target in VIEW_OPS:
        return first
    if target is aten.dropout.default:
        return first if is_inactive_dropout(node) else None
    if target is aten.contiguous.default:
        v = val_of(first)
        return first if isinstance(v, torch.Tensor) and _is_contiguous(v) else None
    if target in _SAME_DTYPE_ALIAS:
        vin, vout = val_of(first), val_of(node)
        if node.kwargs.get("copy") or (len(node.args) > 3 and node.args[3] is True):
            return None
        if isinstance(vin, torch.Tensor) and isinstance(vout, torch.Tensor) and vin.dtype == vout.dtype \
                and vin.device == vout.device:
            return first
    if target is aten.alias.default or target is aten.lift_fresh.default:
        return first
    return None


def _is_contiguous(t: torch.Tensor) -> bool:
    try:
        return bool(t.is_contiguous())
    except Exception:
        return True


def _reshape_is_view(src: fx.Node, node: fx.Node) -> bool:
    vin, vout = val_of(src), val_of(node)
    if not isinstance(vin, torch.Tensor) or not isinstance(vout, torch.Tensor):
        return True
    try:
        probe = torch.empty_strided(shape(vin), [_int(s) for s in vin.stride()], device="meta", dtype=vin.dtype)
        return probe.view(shape(vout)) is not None
    except RuntimeError:  # view impossible for these strides: reshape copies
        return False
    except Exception:
        return True


def alias_root(node: fx.Node) -> fx.Node:
    """Follow :func:`alias_source` to the node that owns the storage."""
    seen = set()
    while (src := alias_source(node)) is not None and node not in seen:
        seen.add(node)
        node = src
    return node


# --------------------------------------------------------------------------- formulas

#: FLOPs per output element for elementwise ops (default 1)
ELEMENTWISE_FLOPS = {
    "gelu": 8, "silu": 4, "sigmoid": 4, "tanh": 4, "erf": 4, "exp": 2, "log": 2, "pow": 2, "rsqrt": 2,
    "sqrt": 2, "sin": 4, "cos": 4, "softplus": 4, "mish": 6, "hardswish": 3, "elu": 3, "leaky_relu": 2,
}


def _matmul_flops(a: Any, b: Any, out: Any) -> int:
    """2 * numel(out) * K, K the contracted size (FlopCounterMode's mm/bmm count)."""
    sa = shape(a)
    k = sa[-1] if sa else 1
    return 2 * numel(out) * k


def _einsum_flops(node: fx.Node) -> int:
    equation = node.args[0]
    operands = node.args[1] if len(node.args) > 1 else []
    vals = [val_of(o) for o in operands]
    if not isinstance(equation, str) or not all(isinstance(v, torch.Tensor) for v in vals):
        return 0
    lhs, _, rhs = equation.replace(" ", "").partition("->")
    sizes: dict[str, int] = {}
    for letters, v in zip(lhs.split(","), vals):
        letters = letters.replace("...", "")
        dims = shape(v)[len(shape(v)) - len(letters):]
        for c, d in zip(letters, dims):
            sizes[c] = max(sizes.get(c, 1), d)
    contracted = set(sizes) - set(rhs)
    total = math.prod(sizes.values()) if sizes else 0
    ell = shape(val_of(node))[: max(0, len(shape(val_of(node))) - len(rhs.replace("...", "")))]
    total *= math.prod(ell) if ell else 1
    return 2 * total if contracted and len(vals) > 1 else total


def _conv_flops(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, transposed: bool) -> int:
    """FlopCounterMode's conv_flop_count (bias ignored)."""
    xs, ws, os_ = shape(x), shape(w), shape(out)
    batch = xs[0]
    conv_shape = (xs if transposed else os_)[2:]
    c_out, c_in, *filt = ws
    return 2 * math.prod(conv_shape) * math.prod(filt) * batch * c_out * c_in


def _sdpa_flops(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    """Two batched matmuls over the query heads (GQA: K/V heads broadcast)."""
    qs, ks, vs = shape(q), shape(k), shape(v)
    batch_heads = math.prod(qs[:-2])
    L, E = qs[-2], qs[-1]
    S, Ev = ks[-2], vs[-1]
    return 2 * batch_heads * L * S * E + 2 * batch_heads * L * S * Ev


_MATMUL = MATMUL_OPS | {aten._scaled_mm.default}
_CONV = {aten.convolution.default, aten._convolution.default, aten.conv1d.default, aten.conv2d.default,
         aten.conv3d.default, aten.conv_transpose1d.default, aten.conv_transpose2d.input,
         aten.conv_transpose3d.input, aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding}
_SDPA = {aten.scaled_dot_product_attention.default, aten._scaled_dot_product_flash_attention_for_cpu.default,
         aten._scaled_dot_product_flash_attention.default, aten._scaled_dot_product_efficient_attention.default,
         aten._scaled_dot_product_cudnn_attention.default}
_NORM = {aten.layer_norm.default, aten.native_layer_norm.default, aten.batch_norm.default,
         aten._native_batch_norm_legit_no_training.default, aten.native_batch_norm.default,
         aten.group_norm.default, aten.native_group_norm.default, aten.instance_norm.default}
_RMS = [getattr(aten, "rms_norm", None), getattr(aten, "_fused_rms_norm", None)]
_NORM |= {p.default for p in _RMS if p is not None and hasattr(p, "default")}
_GATHER = {aten.embedding.default, aten.gather.default, aten.index.Tensor, aten.index_select.default,
           aten.take.default, aten.take_along_dim.default}
_POOL = {aten.max_pool1d.default, aten.max_pool2d.default, aten.max_pool3d.default,
         aten.max_pool2d_with_indices.default, aten.avg_pool1d.default, aten.avg_pool2d.default,
         aten.avg_pool3d.default, aten.adaptive_avg_pool1d.default, aten.adaptive_avg_pool2d.default,
         aten._adaptive_avg_pool2d.default, aten.adaptive_max_pool2d.default}
_FREE = {aten._assert_tensor_metadata.default, aten.sym_size.int, aten.sym_numel.default,
         aten._assert_async.msg, aten.sym_constrain_range_for_size.default, aten._assert_scalar.default}


def _arg_val(node: fx.Node, i: int, name: str | None = None) -> Any:
    if len(node.args) > i:
        a = node.args[i]
    elif name is not None and name in node.kwargs:
        a = node.kwargs[name]
    else:
        return None
    return val_of(a) if isinstance(a, fx.Node) else a


def _matmul_class_flops(node: fx.Node, outs: list[torch.Tensor], n_out: int) -> tuple[int, str] | None:
    """(FLOPs, category) of a matmul, einsum, convolution or attention node; None for other ops."""
    target = node.target
    if target in _MATMUL:
        if target in (aten.addmm.default, aten.baddbmm.default):
            a, b = _arg_val(node, 1), _arg_val(node, 2)
        else:
            a, b = _arg_val(node, 0), _arg_val(node, 1)
        if target is aten.linear.default and isinstance(b, torch.Tensor):
            return int(2 * n_out * shape(b)[-1]), "matmul"
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            if a.dim() == 1 and b.dim() == 1:
                return int(2 * numel(a)), "matmul"
            return int(_matmul_flops(a, b, outs[0])), "matmul"
    if target is aten.einsum.default:
        return int(_einsum_flops(node)), "matmul"
    if target in _CONV:
        x, w = _arg_val(node, 0), _arg_val(node, 1)
        name = getattr(target, "_opname", "")
        transposed = "transpose" in name or (target in (aten.convolution.default, aten._convolution.default)
                                             and bool(_arg_val(node, 6)))
        if isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor):
            if x.dim() == w.dim() - 1:  # unbatched conv
                return int(_conv_flops(x.unsqueeze(0), w, outs[0].unsqueeze(0), transposed)), "conv"
            return int(_conv_flops(x, w, outs[0], transposed)), "conv"
    if target in _SDPA:
        q, k, v = _arg_val(node, 0), _arg_val(node, 1), _arg_val(node, 2)
        if all(isinstance(t, torch.Tensor) for t in (q, k, v)):
            return int(_sdpa_flops(q, k, v)), "attention"
    return None


def node_cost(node: fx.Node) -> NodeCost:
    """FLOPs and bytes of ``node`` from its ``meta["val"]`` and its inputs'.

    >>> import torch, graphopt
    >>> gm = graphopt.capture(torch.nn.Linear(64, 32), (torch.randn(8, 64),)).module
    >>> lin = next(n for n in gm.graph.nodes if n.op == "call_function")
    >>> node_cost(lin).flops   # 2 * 8 * 32 * 64
    32768
    """
    if node.op != "call_function":
        return NodeCost(category="none")
    target = node.target
    out = val_of(node)
    fn = registered_cost(target)
    if fn is not None:
        cost = fn(node)
        if cost.category == "none":
            cost.category = "custom"
        return cost
    if target is operator.getitem or target in _FREE or not tensors_in(out):
        return NodeCost(category="none")
    if alias_source(node) is not None:
        return NodeCost(category="view")

    read, written = _bytes_read(node), _bytes_written(node)
    outs = tensors_in(out)
    n_out = numel(outs[0]) if outs else 0

    def make(flops: int, category: str) -> NodeCost:
        return NodeCost(int(flops), read, written, category)

    matmul_class = _matmul_class_flops(node, outs, n_out)
    if matmul_class is not None:
        return make(*matmul_class)
    if target in SOFTMAX_FORMS_INCLUDING_SAFE:
        return make(5 * n_out, "softmax")
    if target in _NORM:
        x = _arg_val(node, 0)
        return make(8 * (numel(x) if isinstance(x, torch.Tensor) else n_out), "norm")
    if target in _GATHER:
        # a gather reads the rows it picks (plus the indices), not the whole table
        idx_bytes = sum(distinct_bytes(t) for n in node.all_input_nodes[1:] for t in tensors_in(val_of(n)))
        return NodeCost(0, written + idx_bytes, written, "gather")
    if target in _POOL:
        x = _arg_val(node, 0)
        return make(numel(x) if isinstance(x, torch.Tensor) else n_out, "pool")
    if isinstance(target, torch._ops.OpOverload):
        tags = target.tags
        if torch.Tag.pointwise in tags:
            per = ELEMENTWISE_FLOPS.get(target._opname.lstrip("_").split(".")[0], 1)
            return make(per * n_out, "elementwise")
        if torch.Tag.reduction in tags or target._opname in ("cumsum", "cumprod", "var", "std", "var_mean",
                                                             "logsumexp", "norm", "linalg_vector_norm"):
            x = _arg_val(node, 0)
            return make(numel(x) if isinstance(x, torch.Tensor) else n_out, "reduction")
        if target.namespace == "graphopt":
            log.warning("no cost declared for %s; counting its bytes only (declare one in its module: "
                        "graphopt.ops.declare.OpDeclaration)", target)
            return make(0, "custom")
    return make(0, "copy" if _is_copy(target) else "other")


_COPY_NAMES = {"clone", "contiguous", "_to_copy", "to", "cat", "stack", "copy", "constant_pad_nd", "pad",
               "repeat", "roll", "flip", "index_put", "scatter", "slice_scatter", "select_scatter",
               "tril", "triu", "new_ones", "new_zeros", "new_full", "new_empty", "zeros", "ones", "full",
               "empty", "arange", "zeros_like", "ones_like", "full_like", "empty_like", "lift_fresh_copy",
               "repeat_interleave", "expand_copy", "permute_copy", "view_copy", "_unsafe_view"}


def _is_copy(target: Any) -> bool:
    name = getattr(target, "_opname", getattr(target, "__name__", ""))
    return name in _COPY_NAMES


def node_dtype(node: fx.Node) -> torch.dtype | None:
    """The dtype an op computes in: its first floating tensor input's, else its output's."""
    for n in node.all_input_nodes:
        for t in tensors_in(val_of(n)):
            if t.dtype.is_floating_point:
                return t.dtype
    outs = tensors_in(val_of(node))
    return outs[0].dtype if outs else None


def annotate_costs(gm: fx.GraphModule, target: Roofline | None = None) -> dict[str, NodeCost]:
    """Write ``node.meta[meta.COST]`` (a :class:`NodeCost`, predicted on the roofline ``target``) for every node."""
    costs: dict[str, NodeCost] = {}
    for node in gm.graph.nodes:
        cost = node_cost(node)
        if target is not None:
            cost.predicted_s, cost.bound = target.predict(cost, node_dtype(node))
        node.meta[meta.COST] = cost
        costs[node.name] = cost
    return costs
