"""Find the sites the blocked-operator planner can rewrite, and say why others are left.

Each finder is a semantic search from an anchor node (DESIGN.md "Patterns"):

* **attention** -- the sites of :func:`graphopt.passes.analysis.sites.find_attention_sites`
  the blocked-attention operator can express
  (:mod:`graphopt.passes.analysis.blockable_attention`):
  ``matmul(q, k^T) * s + bias (+ ...) [masked] -> softmax -> matmul v``.
* **ffn** -- anchored at a linear-like node (``linear``, ``addmm`` as in
  GPT-2's Conv1D, ``mm``/``matmul`` with a 2-D weight) whose input is an
  activation of another linear of the same tokens, or a gated product
  ``act(linear_g(x)) * linear_u(x)``. The activation may be one op or a chain
  of pointwise ops (GPT-2's tanh GELU written out); it is identified by
  evaluating the chain on probe values against
  :data:`graphopt.ops._blocking.ACTIVATIONS`.
* **lm_head** -- anchored at ``gather`` / ``argmax`` / ``topk`` over the last
  axis of ``[log_]softmax(linear(h))`` (casts and leading-dim views allowed)
  whose logits feed nothing else.
* **matmul** -- any ``linear`` / activation x activation ``matmul``: the
  planner only blocks these when asked to (``block_matmul``) or when
  ``autotune`` measures it faster.

Every intermediate a rewrite removes must have no user outside the site;
otherwise the site is declined with the reason (e.g. attention weights that
are also returned).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.fx as fx

from graphopt import ir
from graphopt.ops._blocking import ACTIVATIONS
from graphopt.passes.analysis.blockable_attention import check_blockable_attention, is_blockable_candidate
from graphopt.passes.analysis.sites import AttentionSite, find_attention_sites
from graphopt.pattern import Decline, attempt
from graphopt.report import Declined

aten = torch.ops.aten

__all__ = [
    "LinearLike", "AttentionSite", "FFNSite", "LMHeadSite", "MatmulSite", "BlockableSite",
    "as_linear", "find_blockable_sites",
]

_CASTS = {aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout}
_IDENTITY_LIKE = {aten.alias.default, aten.clone.default, aten.contiguous.default, aten.detach.default}
_ROW_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_SOFTMAX = {aten.softmax.int: "softmax", aten._softmax.default: "softmax",
            aten.log_softmax.int: "log_softmax", aten._log_softmax.default: "log_softmax"}
_MATMULS = {aten.matmul.default, aten.bmm.default}
_SINGLE_OP_ACTIVATIONS = {aten.relu.default: "relu", aten.silu.default: "silu", aten.sigmoid.default: "sigmoid",
                          aten.tanh.default: "tanh"}


# ---------------------------------------------------------------- small helpers

def _users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if u.op != "call_function" or u.target is not aten._assert_tensor_metadata.default]


def _last_axis(dim: Any, node: fx.Node) -> bool:
    shape = ir.shape_of(node)
    return shape is not None and isinstance(dim, int) and dim in (-1, len(shape) - 1)


def _dtype(node: fx.Node) -> torch.dtype | None:
    val = ir.tensor_meta(node)
    return val.dtype if val is not None else None


def _is_float_cast(node: fx.Node) -> bool:
    if node.op != "call_function" or node.target not in _CASTS:
        return False
    dtype = node.kwargs.get("dtype", node.args[1] if node.target is aten.to.dtype and len(node.args) > 1 else None)
    return dtype is None or (isinstance(dtype, torch.dtype) and dtype.is_floating_point)


def _is_eval_dropout(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is aten.dropout.default and (
        not node.args[2] or node.args[1] == 0)


def _is_passthrough(node: fx.Node) -> bool:
    return node.op == "call_function" and (
        _is_float_cast(node) or _is_eval_dropout(node) or node.target in _IDENTITY_LIKE)


def _keeps_last_dim(node: fx.Node) -> bool:
    """A view/reshape that only regroups leading dims (rows keep their order)."""
    if node.op != "call_function" or node.target not in _ROW_VIEWS:
        return False
    a, b = ir.shape_of(node.args[0]), ir.shape_of(node)
    return a is not None and b is not None and len(a) >= 1 and len(b) >= 1 and a[-1] == b[-1]


# ---------------------------------------------------------------- linear-like nodes

@dataclass
class LinearLike:
    """A node computing ``x @ W^T + b``: ``weight`` is ``(out, in)`` unless ``weight_is_in_out``.

    ``out_slice`` = ``(start, stop)``: the node is that slice of the output features of a merged
    linear (``getitem`` of its ``split``, as horizontal fusion leaves gate/up projections).
    """

    node: fx.Node
    x: fx.Node
    weight: fx.Node
    weight_is_in_out: bool
    bias: fx.Node | None
    out_slice: tuple[int, int] | None = None

    @property
    def out_features(self) -> int:
        if self.out_slice is not None:
            return self.out_slice[1] - self.out_slice[0]
        shape = ir.shape_of(self.weight)
        return shape[1] if self.weight_is_in_out else shape[0]


_SPLITS = {aten.split_with_sizes.default, aten.split.Tensor}


def _split_output_slice(getitem: fx.Node) -> tuple[fx.Node, tuple[int, int]] | None:
    """``(merged linear node, (start, stop))`` when ``getitem`` takes a last-dim split of a linear's output."""
    split, index = getitem.args[0], getitem.args[1]
    if not isinstance(split, fx.Node) or split.op != "call_function" or split.target not in _SPLITS:
        return None
    src = split.args[0]
    shape = ir.shape_of(src)
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    if shape is None or not isinstance(index, int) or dim not in (-1, len(shape) - 1):
        return None
    sizes = split.args[1]
    if isinstance(sizes, int):
        sizes = [min(sizes, shape[-1] - i) for i in range(0, shape[-1], sizes)]
    start = sum(sizes[:index])
    return src, (start, start + sizes[index])


def as_linear(node: Any, allow_split: bool = False) -> LinearLike | None:
    """``node`` as a :class:`LinearLike` when it is ``linear``/``addmm``/``mm``/``matmul`` by a 2-D weight.

    ``allow_split``: also a ``getitem`` of a last-dim ``split`` of such a node (a merged projection).
    """
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    if allow_split and node.target is operator.getitem:
        found = _split_output_slice(node)
        merged = as_linear(found[0]) if found is not None else None
        if merged is None:
            return None
        return LinearLike(node, merged.x, merged.weight, merged.weight_is_in_out, merged.bias, found[1])
    t, a = node.target, node.args
    if t is aten.linear.default:
        if _rank(a[1]) != 2:
            return None
        return LinearLike(node, a[0], a[1], False, a[2] if len(a) > 2 else node.kwargs.get("bias"))
    if t is aten.addmm.default:
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1 or _rank(a[0]) != 1:
            return None
        return LinearLike(node, a[1], a[2], True, a[0])
    if t in (aten.mm.default, aten.matmul.default) and _rank(a[1]) == 2 and _is_weight(a[1]):
        w = a[1]
        if w.op == "call_function" and w.target in (aten.t.default, aten.transpose.int, aten.permute.default) \
                and _rank(w.args[0]) == 2 and _is_weight(w.args[0]):
            return LinearLike(node, a[0], w.args[0], False, None)
        return LinearLike(node, a[0], w, True, None)
    return None


def _rank(node: Any) -> int:
    shape = ir.shape_of(node)
    return len(shape) if shape is not None else -1


def _is_weight(node: fx.Node) -> bool:
    """A parameter (or a view of one): values that do not depend on the inputs."""
    while node.op == "call_function" and node.target in ir.VIEW_OPS and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node.op == "get_attr"


# ---------------------------------------------------------------- sites

@dataclass
class FFNSite:
    """``linear_out(act(linear_in(x)))`` or ``linear_out(act(linear_gate(x)) * linear_in(x))``."""

    kind: ClassVar[str] = "ffn"
    output: fx.Node
    x: fx.Node
    lin_in: LinearLike
    lin_gate: LinearLike | None
    lin_out: LinearLike
    activation: str
    nodes: list[fx.Node] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.output.name

    @property
    def rows(self) -> int:
        return math.prod(ir.shape_of(self.x)[:-1])

    @property
    def hidden(self) -> int:
        return self.lin_in.out_features

    def describe(self) -> str:
        gate = "gated " if self.lin_gate is not None else ""
        return f"{gate}FFN at {self.output.name} ({self.rows} rows x {self.hidden} hidden, {self.activation})"


@dataclass
class LMHeadSite:
    """``reduction(normalize(linear(h)))`` where the logits feed nothing else."""

    kind: ClassVar[str] = "lm_head"
    reduction: str  # "gather", "argmax", "topk"
    output: fx.Node  # the reduction node
    head: LinearLike
    normalize: str  # "none", "log_softmax", "softmax"
    upcast: bool
    logits_view: fx.Node  # the node whose leading shape the reduction sees
    index: fx.Node | None = None
    k: int = 1
    largest: bool = True
    keepdim: bool = False
    nodes: list[fx.Node] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.output.name

    @property
    def rows(self) -> int:
        return math.prod(ir.shape_of(self.logits_view)[:-1])

    @property
    def vocab(self) -> int:
        return ir.shape_of(self.logits_view)[-1]

    def describe(self) -> str:
        return f"LM head + {self.normalize}/{self.reduction} at {self.output.name} ({self.rows} rows x {self.vocab})"


@dataclass
class MatmulSite:
    """A ``linear`` or activation x activation ``matmul`` (blocked only on request or when measured faster)."""

    kind: ClassVar[str] = "matmul"
    output: fx.Node
    linear: LinearLike | None  # None: a plain matmul of output.args[0] @ output.args[1]

    @property
    def name(self) -> str:
        return self.output.name

    def describe(self) -> str:
        return f"{ir.op_name(self.output)} at {self.output.name} {ir.shape_of(self.output)}"


BlockableSite = AttentionSite | FFNSite | LMHeadSite | MatmulSite


# ---------------------------------------------------------------- FFN

def _same_dtype_passthrough(node: fx.Node) -> bool:
    return _is_passthrough(node) and _dtype(node) == _dtype(node.args[0])


def _strip_row_views(node: fx.Node, chain: list[fx.Node]) -> fx.Node:
    """Step over row-keeping views, eval dropouts and dtype-keeping casts (single-user only)."""
    while isinstance(node, fx.Node) and (_keeps_last_dim(node) or _same_dtype_passthrough(node)) \
            and len(_users(node)) == 1:
        chain.append(node)
        node = node.args[0]
    return node


def _activation_region(top: fx.Node) -> tuple[LinearLike, list[fx.Node]] | None:
    """The pointwise region from a linear's output up to ``top`` (a unary function of it)."""
    region: list[fx.Node] = []
    base: LinearLike | None = None
    stack = [top]
    while stack:
        n = stack.pop()
        if n in region:
            continue
        lin = as_linear(n, allow_split=True)
        if lin is not None:
            if base is not None and base.node is not n:
                return None
            base = lin
            continue
        if n.op != "call_function":
            return None
        pointwise = isinstance(n.target, torch._ops.OpOverload) and torch.Tag.pointwise in n.target.tags
        if not (pointwise or _is_passthrough(n) or _keeps_last_dim(n)) or torch.Tag.inplace in getattr(
                n.target, "tags", ()):
            return None
        region.append(n)
        for inp in n.all_input_nodes:
            val = ir.tensor_meta(inp)
            if inp.op == "get_attr" and val is not None and val.numel() == 1:
                continue
            stack.append(inp)
    if base is None:
        return None
    inside = set(region)
    for n in region:
        if n is not top and any(u not in inside for u in _users(n)):
            return None
    if any(u not in inside for u in _users(base.node)) and (region or len(_users(base.node)) != 1):
        return None
    return base, region


def _identify_activation(gm: fx.GraphModule, base: fx.Node, region: list[fx.Node]) -> str | None:
    """Name the unary function ``region`` computes of ``base``, by probing it."""
    compute = [n for n in region if not (_keeps_last_dim(n) or _is_passthrough(n))]
    if not compute:
        return "identity"
    if len(compute) == 1:
        n = compute[0]
        if n.target in _SINGLE_OP_ACTIVATIONS:
            return _SINGLE_OP_ACTIVATIONS[n.target]
        if n.target is aten.gelu.default:
            return "gelu_tanh" if n.kwargs.get("approximate", "none") == "tanh" else "gelu"
    dtype = _dtype(base) or torch.float32
    probe = torch.cat([torch.linspace(-8, 8, 1601), torch.randn(512, generator=torch.Generator().manual_seed(0))])
    probe = probe.to(dtype if dtype.is_floating_point else torch.float32)
    values: dict[fx.Node, Any] = {base: probe}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    with torch.no_grad():
        for n in sorted(region, key=order.__getitem__):
            if _keeps_last_dim(n):
                values[n] = values[n.args[0]]
                continue
            args = fx.node.map_arg(n.args, lambda a: values[a] if a in values else ir.get_attr_value(gm, a))
            kwargs = fx.node.map_arg(n.kwargs, lambda a: values[a] if a in values else ir.get_attr_value(gm, a))
            try:
                values[n] = n.target(*args, **kwargs)
            except Exception:
                return None
    out = values[region[0]].float()  # region[0] is the top node
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for name, act in ACTIVATIONS.items():
        ref = act.torch_fn(probe.float())
        if torch.allclose(out, ref, rtol=tol, atol=tol * 0.1):
            return name
    return None


def _ffn_site(gm: fx.GraphModule, out: LinearLike) -> FFNSite | str | None:
    nodes: list[fx.Node] = []
    top = _strip_row_views(out.x, nodes)
    if not isinstance(top, fx.Node) or top.op != "call_function":
        return None
    if top.target is aten.mul.Tensor and all(isinstance(a, fx.Node) for a in top.args[:2]) \
            and len(_users(top)) == 1:
        a, b = top.args[0], top.args[1]
        for act_side, up_side in ((a, b), (b, a)):
            up_chain: list[fx.Node] = []
            up = as_linear(_strip_row_views(up_side, up_chain), allow_split=True)
            found = _activation_region(act_side)
            if up is None or found is None or len(_users(up.node)) != 1:
                continue
            gate, region = found
            if gate.node is up.node or _canonical_input(gate.x) is not _canonical_input(up.x):
                continue
            name = _identify_activation(gm, gate.node, region)
            if name is None:
                return f"gated FFN at {out.node.name}: the activation is not one graphopt knows"
            site_nodes = nodes + [top] + up_chain + region + [up.node, gate.node]
            return FFNSite(out.node, up.x, up, gate, out, name, site_nodes)
    found = _activation_region(top)
    if found is None:
        return None
    lin_in, region = found
    if lin_in.node is out.node or ir.shape_of(lin_in.x) is None:
        return None
    name = _identify_activation(gm, lin_in.node, region)
    if name is None:
        return f"FFN at {out.node.name}: the activation between the linears is not one graphopt knows"
    return FFNSite(out.node, lin_in.x, lin_in, None, out, name, nodes + region + [lin_in.node])


def _canonical_input(node: fx.Node) -> fx.Node:
    while isinstance(node, fx.Node) and _keeps_last_dim(node):
        node = node.args[0]
    return node


# ---------------------------------------------------------------- LM head

def _lm_head_site(reduction: fx.Node) -> LMHeadSite | str | None:
    t, a = reduction.target, reduction.args
    src = a[0]
    if not isinstance(src, fx.Node):
        return None
    if t is aten.gather.default:
        if not _last_axis(a[1], src):
            return None
        kind, extra = "gather", {"index": a[2]}
        idx_shape, src_shape = ir.shape_of(a[2]), ir.shape_of(src)
        if idx_shape is None or src_shape is None or idx_shape[:-1] != src_shape[:-1]:
            return f"{reduction.name}: gather index does not cover every row"
    elif t is aten.argmax.default:
        dim = a[1] if len(a) > 1 else reduction.kwargs.get("dim")
        if dim is None or not _last_axis(dim, src):
            return None
        kind = "argmax"
        extra = {"keepdim": bool(a[2] if len(a) > 2 else reduction.kwargs.get("keepdim", False))}
    elif t is aten.topk.default:
        dim = a[2] if len(a) > 2 else reduction.kwargs.get("dim", -1)
        if not _last_axis(dim, src):
            return None
        kind = "topk"
        extra = {"k": int(a[1]), "largest": bool(a[3] if len(a) > 3 else reduction.kwargs.get("largest", True))}
        if not all(u.op == "call_function" and u.target.__name__ == "getitem" for u in reduction.users):
            return f"{reduction.name}: topk result used whole"
    else:
        return None
    nodes: list[fx.Node] = []
    normalize = "none"
    cur = src
    while True:
        if not isinstance(cur, fx.Node) or cur.op != "call_function":
            return None
        if len(_users(cur)) != 1:
            return f"{reduction.name}: the logits ({cur.name}) are also used elsewhere"
        nodes.append(cur)
        head = as_linear(cur)
        if head is not None:
            break
        if cur.target in _SOFTMAX and normalize == "none":
            if not _last_axis(cur.args[1], cur):
                return None
            normalize = _SOFTMAX[cur.target]
            cur = cur.args[0]
        elif _keeps_last_dim(cur) or _is_passthrough(cur):
            cur = cur.args[0]
        else:
            return None
    head_dtype, src_dtype = _dtype(head.node), _dtype(src)
    if src_dtype == head_dtype:
        upcast = False
    elif src_dtype == torch.float32:
        upcast = True
    else:
        return f"{reduction.name}: the logits are cast to {src_dtype}"
    return LMHeadSite(kind, reduction, head, normalize, upcast, src, nodes=nodes, **extra)


# ---------------------------------------------------------------- entry point

def find_blockable_sites(gm: fx.GraphModule, kinds: tuple[str, ...] = ("attention", "ffn", "lm_head", "matmul")) \
        -> tuple[list[BlockableSite], list[Declined]]:
    """Every site of ``kinds`` the planner can block, in graph order, and the candidates it cannot, with reasons.

    Kinds are searched in the order lm_head, attention, ffn, matmul; a node
    claimed by one site is not part of another.
    """
    sites: list[BlockableSite] = []
    declined: list[Declined] = []
    taken: set[fx.Node] = set()

    def add(site: BlockableSite) -> None:
        sites.append(site)
        taken.update(getattr(site, "nodes", []))
        taken.add(site.output)

    for node in gm.graph.nodes if "lm_head" in kinds else ():
        if node.op != "call_function":
            continue
        if node.target in (aten.gather.default, aten.argmax.default, aten.topk.default):
            found = _lm_head_site(node)
            if isinstance(found, str):
                declined.append(Declined(node.name, found))
            elif found is not None:
                add(found)
    for site in find_attention_sites(gm) if "attention" in kinds else ():
        if site.softmax in taken or not is_blockable_candidate(site):
            continue  # a softmax that is not attention (e.g. a classifier head): not a candidate
        found = attempt(check_blockable_attention, site)
        if isinstance(found, Decline):
            declined.append(Declined(site.name, found.reason))
        else:
            sites.append(site)
            taken.update(site.between_products)
            taken.add(site.output)
    for node in gm.graph.nodes if "ffn" in kinds else ():
        lin = as_linear(node)
        if lin is None or node in taken:
            continue
        found = _ffn_site(gm, lin)
        if isinstance(found, str):
            declined.append(Declined(node.name, found))
        elif found is not None and not (set(found.nodes) & taken):
            add(found)
    for node in gm.graph.nodes if "matmul" in kinds else ():
        if node in taken or node.op != "call_function":
            continue
        lin = as_linear(node)
        if lin is not None and node.target in (aten.linear.default, aten.addmm.default, aten.mm.default,
                                               aten.matmul.default):
            sites.append(MatmulSite(node, lin))
        elif node.target in _MATMULS and _rank(node.args[0]) >= 2 and _rank(node.args[1]) >= 2:
            sites.append(MatmulSite(node, None))
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    sites.sort(key=lambda s: order[s.output])
    return sites, declined
