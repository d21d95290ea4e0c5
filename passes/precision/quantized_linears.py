"""The linear sites the ``precision`` pass quantizes, their int8 / fp8 / weight-only weights, and the rewrite.

A quantizable linear is a :class:`~graphopt.passes.analysis.sites.linear.LinearSite`
whose weight is a constant (a parameter, possibly computed from parameters or
behind views such as ``t()``: anything :func:`graphopt.ir.constant_nodes`
finds) with its fp32 value in hand:

    linear(x, W[N,K], b)          -> graphopt.int8_linear(x, Wq, s, b, scheme)
    addmm(b, x, W[K,N])           -> graphopt.int8_linear(x, Wq, s, b, scheme)   (GPT-2's Conv1D)
    mm(x, W[K,N]) / matmul(x, W)  -> graphopt.int8_linear(x, Wq, s, None, scheme)
    (same shapes)                 -> graphopt.fp8_linear(x, Wq, s, b)
    (same shapes)                 -> graphopt.int8_weight_only_linear(x, Wq, s_bf16, b)          ("int8wo")
    (same shapes)                 -> graphopt.int4_weight_only_linear(x, W_packed, scales_and_zeros, G, b)  ("int4")
    linear(x, W, b) with an input shift mu (:func:`graphopt.precision.quantize.input_shift`)
                                  -> graphopt.int8_linear(x, Wq, s, b + W @ mu, scheme, mu)

The pass's acceptance is wider than :func:`~graphopt.passes.analysis.sites.linear.find_linear_sites`'
(which merge_matmuls and tensor_parallel rewrite, and which wants a stored
weight): a weight computed from constants, ``linear(x, W.t())`` and a bias
computed at run time are quantized too; the site's ``weight`` is then the
weight operand as the op reads it (``weight_transposed`` False).

Declines (``Decline``, reported per node): matmuls of two activations
(attention scores: no constant weight to quantize), addmm with
``beta``/``alpha`` other than 1, weights that are not 2-D fp32, activations
that are not fp32; for int4 (:func:`int4_decline`), ``in_features`` not
divisible by any group size (128, 64, 32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from graphopt import ir, meta
from graphopt.ir import constant_nodes, evaluate
from graphopt.ops import fp8_linear, int8_linear, weight_only_linear
from graphopt.passes.analysis.sites.linear import LINEAR_OPS, LinearSite
from graphopt.pattern import Decline, attempt

aten = torch.ops.aten

__all__ = ["QUANTIZED", "QuantizableLinear", "int4_decline", "quantizable_linear", "quantizable_linears",
           "QuantizedWeights", "replace_site"]

#: precisions that replace a linear site by a quantized op (the rest are float formats)
QUANTIZED = ("int8", "fp8", "int8wo", "int4")


@dataclass
class QuantizableLinear:
    """A linear site with its constant weight as a tensor: what quantizing it needs."""

    site: LinearSite
    weight: torch.Tensor  # [N, K] fp32
    bias_value: torch.Tensor | None = None  # the bias when it is a constant

    @property
    def name(self) -> str:
        return self.site.node.name


def quantizable_linear(gm: fx.GraphModule, node: fx.Node, const: set[fx.Node]) -> QuantizableLinear:
    """The quantizable linear at ``node``; raises :class:`Decline` with the reason it is not one."""
    t = node.target
    if t == aten.linear.default:
        kind, x, w = "linear", node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        transpose = False
    elif t == aten.addmm.default:
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            raise Decline("addmm with beta/alpha != 1")
        kind, b, x, w = "addmm", node.args[0], node.args[1], node.args[2]
        transpose = True
    elif t in (aten.mm.default, aten.matmul.default):
        kind, x, w, b = ("mm" if t == aten.mm.default else "matmul"), node.args[0], node.args[1], None
        transpose = True
    else:
        raise Decline("not a linear/matmul")
    if not isinstance(x, fx.Node) or x in const:
        raise Decline("the activation operand is a constant")
    if not isinstance(w, fx.Node) or w not in const:
        raise Decline("no constant weight (activation x activation matmul)")
    wval = ir.tensor_meta(w)
    if wval is None or wval.ndim != 2 or wval.dtype != torch.float32:
        raise Decline("weight is not a 2-D fp32 matrix")
    xval = ir.tensor_meta(x)
    if xval is None or xval.dtype != torch.float32:
        raise Decline("activation is not fp32")
    n_out = wval.shape[0] if not transpose else wval.shape[1]
    if b is not None and (not isinstance(b, fx.Node) or ir.shape_of(b) != (n_out,)):
        raise Decline("bias is not a vector over the output features")
    weight = evaluate(gm, [w], const)[w].detach().float()
    if transpose:
        weight = weight.t()
    bias_value = evaluate(gm, [b], const)[b].detach().float() if isinstance(b, fx.Node) and b in const else None
    site = LinearSite(node, kind, x, w, False, b, int(weight.shape[1]), int(weight.shape[0]))
    return QuantizableLinear(site, weight.contiguous(), bias_value)


def quantizable_linears(gm: fx.GraphModule) -> tuple[dict[str, QuantizableLinear], dict[str, str]]:
    """({node name: quantizable linear}, {node name: reason declined}) over every linear/matmul node."""
    const = constant_nodes(gm)
    sites, declined = {}, {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in LINEAR_OPS:
            found = attempt(quantizable_linear, gm, node, const)
            if isinstance(found, Decline):
                declined[node.name] = found.reason
            else:
                sites[node.name] = found
    return sites, declined


class QuantizedWeights:
    """Quantized weights per (node, precision), made once and reused by every trial plan.

    Reusing the same tensors keeps the CPU kernels' packed weights (packed once, at
    optimize time) valid for the module that is finally returned.
    """

    def __init__(self, int8_scheme: str | None, pair_safe: bool | None = None) -> None:
        self.int8_scheme = int8_scheme or "per_token_s8"
        #: int8 weights pair-safe (default: for the full-range uint8 schemes, whose kernels may saturate)
        self.pair_safe = self.int8_scheme in int8_linear.PAIR_SAFE_SCHEMES if pair_safe is None else pair_safe
        self._cache: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
        #: node name -> int8 input shift (see :func:`input_shift`)
        self.shifts: dict[str, torch.Tensor] = {}

    def get(self, site: QuantizableLinear, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
        key = (site.name, precision)
        if key not in self._cache:
            if precision == "int8":
                q, s = int8_linear.quantize_weight(site.weight, pair_safe=self.pair_safe)
                if self.int8_scheme != "per_token_s8":
                    int8_linear.prepack(q, s, self.int8_scheme)
            elif precision == "fp8":
                q, s = fp8_linear.quantize_weight(site.weight)
            elif precision == "int8wo":
                q, s = weight_only_linear.quantize_int8_weight_only(site.weight)
                weight_only_linear.prepack(q, s)
            elif precision == "int4":
                q, s, _ = weight_only_linear.quantize_int4(site.weight)
                weight_only_linear.prepack(q, s)
            else:
                raise ValueError(f"no quantized weights for precision {precision!r}")
            self._cache[key] = (q, s)
        return self._cache[key]

    def call(self, site: QuantizableLinear, precision: str, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Run the quantized op on real tensors (error and speed measurements)."""
        q, s = self.get(site, precision)
        if precision == "int8":
            shift = self.shifts.get(site.name)
            if shift is not None:
                folded = site.weight @ shift
                bias = folded if bias is None else bias.float() + folded
            return torch.ops.graphopt.int8_linear(x, q, s, bias, self.int8_scheme, shift)
        if precision == "int8wo":
            return torch.ops.graphopt.int8_weight_only_linear(x, q, s, bias)
        if precision == "int4":
            return torch.ops.graphopt.int4_weight_only_linear(x, q, s, _group_size(site), bias)
        return torch.ops.graphopt.fp8_linear(x, q, s, bias)


def int4_decline(site: QuantizableLinear) -> str | None:
    """Why ``site`` cannot be int4 (None: it can): its ``in_features`` must be a multiple of a group size."""
    k = site.site.in_features
    if weight_only_linear.int4_group_size(k) is None:
        return f"in_features {k} is not divisible by any int4 group size {weight_only_linear.GROUP_SIZES}"
    return None


def _group_size(site: QuantizableLinear) -> int:
    return int(weight_only_linear.int4_group_size(site.site.in_features))


def replace_site(gm: fx.GraphModule, site: QuantizableLinear, precision: str, weights: QuantizedWeights,
                 by_name: dict[str, fx.Node] | None = None) -> fx.Node:
    """Swap ``site``'s node (in ``gm``, a copy of the graph the site was found in) for the quantized op.

    ``by_name`` maps the original graph's node names to ``gm``'s nodes; it is
    updated with the replacement, so consecutive sites can be replaced in turn.
    """
    if by_name is None:
        by_name = {n.name: n for n in gm.graph.nodes}
    node, x = by_name[site.name], by_name[site.site.input.name]
    bias = by_name[site.site.bias.name] if site.site.bias is not None else None
    q, s = weights.get(site, precision)
    shift = weights.shifts.get(site.name) if precision == "int8" else None
    with gm.graph.inserting_before(node):
        qn = gm.graph.get_attr(ir.register_constant(gm, f"{node.name}_w_{precision}", q))
        sn = gm.graph.get_attr(ir.register_constant(gm, f"{node.name}_w_scale", s))
        args: tuple = (x, qn, sn, bias, weights.int8_scheme)
        if shift is not None:
            folded = site.weight @ shift  # fp32, unquantized weight
            if bias is None or site.bias_value is not None:
                value = folded if bias is None else site.bias_value + folded
                bias = gm.graph.get_attr(ir.register_constant(gm, f"{node.name}_bias_shifted", value))
            else:  # a bias computed at run time: add the folded term to it
                fn = gm.graph.get_attr(ir.register_constant(gm, f"{node.name}_bias_shift", folded))
                bias = gm.graph.call_function(torch.ops.aten.add.Tensor, (bias, fn))
            mu = gm.graph.get_attr(ir.register_constant(gm, f"{node.name}_input_shift", shift))
            args = (x, qn, sn, bias, weights.int8_scheme, mu)
        if precision == "int8":
            new = gm.graph.call_function(torch.ops.graphopt.int8_linear.default, args)
        elif precision == "int8wo":
            new = gm.graph.call_function(torch.ops.graphopt.int8_weight_only_linear.default, (x, qn, sn, bias))
        elif precision == "int4":
            new = gm.graph.call_function(torch.ops.graphopt.int4_weight_only_linear.default,
                                         (x, qn, sn, _group_size(site), bias))
        else:
            new = gm.graph.call_function(torch.ops.graphopt.fp8_linear.default, (x, qn, sn, bias))
    for key in ("nn_module_stack", "stack_trace", "val", "tensor_meta"):
        if key in node.meta:
            new.meta[key] = node.meta[key]
    new.meta[meta.PRECISION] = precision
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    by_name[site.name] = new
    _erase_unused(gm, by_name.get(site.site.weight.name), by_name)
    return new


def _erase_unused(gm: fx.GraphModule, node: fx.Node | None, by_name: dict[str, fx.Node]) -> None:
    """Erase the replaced fp32 weight (and the constant views it came through) once nothing reads it, so the
    module stops holding it (a weight another node still reads, e.g. a tied embedding, stays)."""
    stack = [node] if node is not None else []
    while stack:
        n = stack.pop()
        if n.users or n.op not in ("get_attr", "call_function") or n.graph is not gm.graph:
            continue
        inputs = list(n.all_input_nodes)
        gm.graph.erase_node(n)
        by_name.pop(n.name, None)
        stack.extend(inputs)
