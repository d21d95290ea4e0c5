"""Linear sites with constant weights, and their int8 / fp8 replacements.

Sites (``x`` an activation, ``W`` a constant -- a parameter, possibly behind
views such as ``t()``):

    linear(x, W[N,K], b)          -> graphopt.int8_linear(x, Wq, s, b, scheme)
    addmm(b, x, W[K,N])           -> graphopt.int8_linear(x, Wq, s, b, scheme)   (GPT-2's Conv1D)
    mm(x, W[K,N]) / matmul(x, W)  -> graphopt.int8_linear(x, Wq, s, None, scheme)
    (same shapes)                 -> graphopt.fp8_linear(x, Wq, s, b)

int8 with an input shift ``mu`` (the calibrated mean of each input channel,
used where it narrows the per-token range, :func:`input_shift`):

    linear(x, W, b)               -> graphopt.int8_linear(x, Wq, s, b + W @ mu, scheme, mu)

``W @ mu`` is computed in fp32 from the unquantized weight, so the component
every token shares (position/segment embeddings in the residual stream, the
near-uniform attention average of a random-weight model, the positive mean of
GELU outputs) is neither quantized in the activation nor multiplied by the
weight's rounding error. This is the channel-wise shift of Outlier
Suppression+ (Wei et al., 2023) with the mean as the shift.

Declines: matmuls of two activations (attention scores: no constant weight
to quantize), addmm with ``beta``/``alpha`` other than 1, weights that are not
2-D fp32.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from graphopt import ir, meta
from graphopt.ir import constant_nodes, evaluate
from graphopt.ops import fp8_linear, int8_linear

aten = torch.ops.aten

LINEAR_OPS = {aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default}


#: centre an input only when that narrows its mean per-token range to this fraction or less
SHIFT_MIN_GAIN = 0.9


@dataclass
class LinearSite:
    node: fx.Node
    x: fx.Node
    weight: torch.Tensor  # [N, K] fp32
    bias: fx.Node | None
    bias_value: torch.Tensor | None = None  # the bias when it is a constant


def input_shift(x: torch.Tensor, min_gain: float = SHIFT_MIN_GAIN) -> tuple[torch.Tensor | None, float]:
    """``(mu, gain)``: the per-channel mean of ``x`` (calibration activations) and how much it narrows the range.

    ``gain`` is ``mean_row(max|x - mu|) / mean_row(max|x|)``; ``mu`` is None
    when the gain is above ``min_gain`` (centring would cost a pass for nothing).
    """
    x2 = x.detach().float().reshape(-1, x.shape[-1])
    if x2.shape[0] < 2:
        return None, 1.0
    mu = x2.mean(dim=0)
    plain = float(x2.abs().amax(dim=-1).mean())
    centred = float((x2 - mu).abs().amax(dim=-1).mean())
    gain = centred / plain if plain > 0 else 1.0
    return (mu if gain <= min_gain else None), gain


def linear_site(gm: fx.GraphModule, node: fx.Node, const: set[fx.Node]) -> LinearSite | str:
    """The site at ``node`` or the reason it is not one."""
    # imported here: graphopt.passes imports this module (at the top the import would be circular)
    t = node.target
    if t == aten.linear.default:
        x, w = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        transpose = False
    elif t == aten.addmm.default:
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            return "addmm with beta/alpha != 1"
        b, x, w = node.args[0], node.args[1], node.args[2]
        transpose = True
    elif t in (aten.mm.default, aten.matmul.default):
        x, w, b = node.args[0], node.args[1], None
        transpose = True
    else:
        return "not a linear/matmul"
    if not isinstance(x, fx.Node) or x in const:
        return "the activation operand is a constant"
    if not isinstance(w, fx.Node) or w not in const:
        return "no constant weight (activation x activation matmul)"
    wval = ir.tensor_meta(w)
    if wval is None or wval.ndim != 2 or wval.dtype != torch.float32:
        return "weight is not a 2-D fp32 matrix"
    xval = ir.tensor_meta(x)
    if xval is None or xval.dtype != torch.float32:
        return "activation is not fp32"
    if b is not None and (not isinstance(b, fx.Node) or ir.shape_of(b) != (wval.shape[0] if not transpose
                                                                         else wval.shape[1],)):
        return "bias is not a vector over the output features"
    weight = evaluate(gm, [w], const)[w].detach().float()
    if transpose:
        weight = weight.t()
    bias_value = evaluate(gm, [b], const)[b].detach().float() if isinstance(b, fx.Node) and b in const else None
    return LinearSite(node, x, weight.contiguous(), b, bias_value)


def linear_sites(gm: fx.GraphModule) -> tuple[dict[str, LinearSite], dict[str, str]]:
    """({node name: site}, {node name: reason declined}) over every linear/matmul node."""
    # imported here: graphopt.passes imports this module (at the top the import would be circular)
    const = constant_nodes(gm)
    sites, declined = {}, {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in LINEAR_OPS:
            found = linear_site(gm, node, const)
            if isinstance(found, LinearSite):
                sites[node.name] = found
            else:
                declined[node.name] = found
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

    def get(self, site: LinearSite, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
        key = (site.node.name, precision)
        if key not in self._cache:
            if precision == "int8":
                q, s = int8_linear.quantize_weight(site.weight, pair_safe=self.pair_safe)
                if self.int8_scheme != "per_token_s8":
                    int8_linear.prepack(q, s, self.int8_scheme)
            elif precision == "fp8":
                q, s = fp8_linear.quantize_weight(site.weight)
            else:
                raise ValueError(f"no quantized weights for precision {precision!r}")
            self._cache[key] = (q, s)
        return self._cache[key]

    def call(self, site: LinearSite, precision: str, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Run the quantized op on real tensors (error and speed measurements)."""
        q, s = self.get(site, precision)
        if precision == "int8":
            shift = self.shifts.get(site.node.name)
            if shift is not None:
                folded = site.weight @ shift
                bias = folded if bias is None else bias.float() + folded
            return torch.ops.graphopt.int8_linear(x, q, s, bias, self.int8_scheme, shift)
        return torch.ops.graphopt.fp8_linear(x, q, s, bias)


def replace_site(gm: fx.GraphModule, site: LinearSite, precision: str, weights: QuantizedWeights,
                 by_name: dict[str, fx.Node] | None = None) -> fx.Node:
    """Swap ``site.node`` (in ``gm``, a copy of the graph the site was found in) for the quantized op.

    ``by_name`` maps the original graph's node names to ``gm``'s nodes; it is
    updated with the replacement, so consecutive sites can be replaced in turn.
    """
    if by_name is None:
        by_name = {n.name: n for n in gm.graph.nodes}
    node, x = by_name[site.node.name], by_name[site.x.name]
    bias = by_name[site.bias.name] if site.bias is not None else None
    q, s = weights.get(site, precision)
    shift = weights.shifts.get(site.node.name) if precision == "int8" else None
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
        else:
            new = gm.graph.call_function(torch.ops.graphopt.fp8_linear.default, (x, qn, sn, bias))
    for key in ("nn_module_stack", "stack_trace", "val", "tensor_meta"):
        if key in node.meta:
            new.meta[key] = node.meta[key]
    new.meta[meta.PRECISION] = precision
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    by_name[site.node.name] = new
    return new


def weights_not_pair_safe(module: torch.nn.Module) -> list[str]:
    """Nodes of ``module`` (a GraphModule) whose int8 weights x86 kernels without VNNI would saturate.

    These are the full-range uint8 schemes' linears quantized with plain
    weights (``precision_int8_pair_safe=False``, the default on VNNI CPUs):
    exact here, but onnxruntime's ``MatMulInteger`` on an AVX2 CPU saturates
    them (graphopt's own op there falls back to its exact, slow reference).
    Used to warn when such a graph is exported.
    """
    graph = getattr(module, "graph", None)
    out = []
    for node in graph.nodes if graph is not None else ():
        if node.target is not torch.ops.graphopt.int8_linear.default or len(node.args) < 5:
            continue
        weight = node.args[1]
        if node.args[4] not in int8_linear.PAIR_SAFE_SCHEMES or getattr(weight, "op", None) != "get_attr":
            continue
        value = operator.attrgetter(weight.target)(module)
        if isinstance(value, torch.Tensor) and not int8_linear.is_pair_safe(value):
            out.append(node.name)
    return out
