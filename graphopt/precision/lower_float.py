"""bf16 / fp16 regions with fp32 islands.

Rewrites, for a chosen set of compute nodes (matmuls, convolutions, attention)
and a low dtype (bf16 or fp16):

    op(x, W)                      -> op(cast(x, low), W_low)           (W cast once, at optimize time)
    follow-op(low values)         -> runs in low precision (views, GELU, bias add, mask add...)
    island(low value)             -> island(cast(x, fp32))             (softmax, norms, reductions, exp/log)
    residual add (configurable)   -> fp32
    output(low value)             -> output(cast(x, fp32))
    fp16 linear(x, W, b) with |x| or |y| beyond fp16's range
                                  -> linear(cast(x / s, fp16), W16) -> cast fp32 * s + b
                                     (s = max(1, amax|x| * c), per tensor, computed at run time)
    cast(cast(x_low, fp32), low)  -> x_low                             (redundant cast pairs)

Each value gets at most one cast per direction (casts are shared by every
consumer). Declines (the node stays fp32, with the reason): islands; under
fp16, values whose observed range does not fit fp16 and ops without a
scaling rule (matmuls of two activations, attention, convolution).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from graphopt import ir, meta
from graphopt.ir import constant_nodes, evaluate
from graphopt.opsets import DTYPE_CASTS
from graphopt.precision.calibrate import Calibration
from graphopt.precision.ops_classes import (
    FOLLOW_OPS,
    FP16_MAX,
    SCALABLE_OPS,
    is_float_tensor,
    is_residual_add,
)

log = logging.getLogger(__name__)
aten = torch.ops.aten

#: fp16 values must stay this far below 65504 (fresh inputs may be larger than the calibration's)
FP16_HEADROOM = 4.0
#: a scaled fp16 matmul aims its input and output maxima at 65504 / this
FP16_SCALE_TARGET = 16.0



@dataclass
class LoweringResult:
    low_nodes: list[str] = field(default_factory=list)  # compute nodes run in low precision
    scaled: list[str] = field(default_factory=list)  # fp16 nodes with overflow scaling
    kept: dict[str, str] = field(default_factory=dict)  # compute node -> why it stayed fp32
    casts: int = 0


def _fits_fp16(cal: Calibration | None, node: Any) -> bool:
    return cal is None or cal.range_of(node) * FP16_HEADROOM <= FP16_MAX


def _scalable(node: fx.Node, const: set[fx.Node]) -> bool:
    if node.target not in SCALABLE_OPS:
        return False
    if node.target == aten.addmm.default:
        return isinstance(node.args[2], fx.Node) and node.args[2] in const and node.args[1] not in const
    return isinstance(node.args[1], fx.Node) and node.args[1] in const and node.args[0] not in const


def plan_regions(gm: fx.GraphModule, compute: set[str], dtype: torch.dtype, cal: Calibration | None,
                 keep_residual_fp32: bool = True) -> tuple[set[fx.Node], set[fx.Node], dict[str, str]]:
    """Decide which nodes produce low-precision values and which compute nodes are fp16-scaled."""
    # imported here: graphopt.passes imports this module (at the top the import would be circular)
    const = constant_nodes(gm)
    low: set[fx.Node] = set()
    scaled: set[fx.Node] = set()
    kept: dict[str, str] = {}
    fp16 = dtype == torch.float16
    for node in gm.graph.nodes:
        if node.op != "call_function" or node in const:
            continue
        if node.name in compute:
            acts = [a for a in node.all_input_nodes if is_float_tensor(a) and a not in const]
            if not fp16 or (all(_fits_fp16(cal, a) for a in acts) and _fits_fp16(cal, node)):
                low.add(node)
            elif _scalable(node, const):
                scaled.add(node)
            else:
                kept[node.name] = (f"fp16 range: values up to {max([cal.range_of(a) for a in acts] + [cal.range_of(node)]):.3g}"
                                   " and no scaling rule for this op")
            continue
        if node.target not in FOLLOW_OPS or (keep_residual_fp32 and is_residual_add(node)):
            continue
        val = node.meta.get("val")
        if isinstance(val, (list, tuple)):
            if not all(u.target is __import__("operator").getitem for u in node.users):
                continue
        elif not is_float_tensor(node):
            continue
        acts = [a for a in node.all_input_nodes if a not in const and (is_float_tensor(a) or
                                                                        isinstance(a.meta.get("val"), (list, tuple)))]
        if acts and all(a in low for a in acts) and (not fp16 or _fits_fp16(cal, node)):
            low.add(node)
    return low, scaled, kept


def lower_float(gm: fx.GraphModule, compute: set[str], dtype: torch.dtype, cal: Calibration | None = None,
                keep_residual_fp32: bool = True) -> LoweringResult:
    """Rewrite ``gm`` in place so the ``compute`` nodes (names) run in ``dtype``; see the module docstring."""
    # imported here: graphopt.passes imports this module (at the top the import would be circular)
    low, scaled, kept = plan_regions(gm, compute, dtype, cal, keep_residual_fp32)
    const = constant_nodes(gm)
    result = LoweringResult(kept=kept)
    old_graph = gm.graph
    new = fx.Graph(owning_module=gm)
    new._codegen = old_graph._codegen
    env32: dict[fx.Node, fx.Node] = {}
    envlow: dict[fx.Node, fx.Node] = {}
    fp16 = dtype == torch.float16

    def cast(n: fx.Node, to: torch.dtype, like: fx.Node) -> fx.Node:
        kwargs: dict[str, Any] = {"dtype": to}
        val = ir.tensor_meta(like)
        if isinstance(val, torch.Tensor) and val.dim() >= 1 and val.stride(-1) == 1:
            # a value whose rows are runs in memory is cast to row-major strides (the cast copies either way):
            # ``preserve`` keeps a slice's strides (the last position of a prompt, ``h[:, -1:]``: (T*D, D, 1)), and
            # CPU bf16 ``linear`` then multiplies by a copied, expanded weight (batched): measured 72 ms for a
            # 32000 x 512 LM head, 3.7 ms with row-major strides (Intel Xeon with AMX, torch 2.13). A transposed or
            # channels-last value keeps its layout.
            kwargs["memory_format"] = torch.contiguous_format
        c = new.call_function(aten._to_copy.default, (n,), kwargs)
        c.meta["nn_module_stack"] = like.meta.get("nn_module_stack", {})
        result.casts += 1
        return c

    def as32(a: fx.Node) -> fx.Node:
        if a not in env32:
            env32[a] = cast(envlow[a], torch.float32, a)
        return env32[a]

    def aslow(a: fx.Node) -> fx.Node:
        if a in envlow:
            return envlow[a]
        if a in const and isinstance(ir.tensor_meta(a), torch.Tensor):
            value = evaluate(gm, [a], const)[a].detach().to(dtype)
            g = new.get_attr(ir.register_constant(gm, f"{a.name}_{str(dtype).split('.')[-1]}", value))
            g.meta.update({k: v for k, v in a.meta.items() if k != "val"})
            envlow[a] = g
        else:
            envlow[a] = cast(as32(a), dtype, a)
        return envlow[a]

    def plain(a: fx.Node) -> fx.Node:
        return env32[a] if a in env32 else envlow[a]

    for node in old_graph.nodes:
        if node.op == "output":
            out = new.output(fx.node.map_arg(node.args[0], lambda a: as32(a) if is_float_tensor(a) else plain(a)))
            out.meta.update(node.meta)
            continue
        if node in scaled:
            env32[node] = _emit_scaled(new, node, as32, aslow, dtype, cal, env32)
            result.scaled.append(node.name)
            continue
        if node in low:
            def to_low(a: fx.Node, node: fx.Node = node) -> fx.Node:
                if isinstance(a.meta.get("val"), (list, tuple)):
                    return plain(a)
                if not is_float_tensor(a):
                    return plain(a)
                if fp16 and node.target == aten.scaled_dot_product_attention.default and a in node.args[3:4] + \
                        tuple(v for k, v in node.kwargs.items() if k == "attn_mask"):
                    clamped = new.call_function(aten.clamp.default, (as32(a), -FP16_MAX, FP16_MAX))
                    return cast(clamped, dtype, a)
                return aslow(a)
            n2 = new.node_copy(node, to_low)
            envlow[node] = n2
            if node.name in compute:
                result.low_nodes.append(node.name)
            continue
        n2 = new.node_copy(node, lambda a: as32(a) if (is_float_tensor(a) and a not in env32) else plain(a))
        env32[node] = n2
    gm.graph = new
    result.casts -= remove_redundant_casts(gm)
    gm.graph.eliminate_dead_code()
    return result


def _emit_scaled(new: fx.Graph, node: fx.Node, as32: Any, aslow: Any, dtype: torch.dtype,
                 cal: Calibration | None, env32: dict) -> fx.Node:
    """fp16 linear with a per-tensor scale: x / s in fp16, result * s in fp32, bias added in fp32."""
    t = node.target
    if t == aten.addmm.default:
        bias, x, w = node.args[0], node.args[1], node.args[2]
    elif t == aten.linear.default:
        x, w = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    else:
        x, w, bias = node.args[0], node.args[1], None
    in_max = max(cal.range_of(x) if cal else 1.0, 1e-30)
    out_max = cal.range_of(node) if cal else in_max
    gain = out_max / in_max
    target = FP16_MAX / FP16_SCALE_TARGET
    c = max(1.0 / target, gain / target)
    origin = {"nn_module_stack": node.meta.get("nn_module_stack", {}), "stack_trace": node.meta.get("stack_trace")}
    x32 = as32(x)
    amax = new.call_function(aten.amax.default, (new.call_function(aten.abs.default, (x32,)),))
    s = new.call_function(aten.clamp.default, (new.call_function(aten.mul.Tensor, (amax, c)), 1.0))
    xs = new.call_function(aten._to_copy.default, (new.call_function(aten.div.Tensor, (x32, s)),),
                           {"dtype": dtype})
    wl = aslow(w)
    if t == aten.addmm.default:
        y = new.call_function(aten.mm.default, (xs, wl))
    elif t == aten.linear.default:
        y = new.call_function(aten.linear.default, (xs, wl))
    else:
        y = new.call_function(t, (xs, wl))
    y32 = new.call_function(aten.mul.Tensor, (new.call_function(aten._to_copy.default, (y,),
                                                                 {"dtype": torch.float32}), s))
    if bias is not None:
        y32 = new.call_function(aten.add.Tensor, (y32, as32(bias)))
    for n in (amax, s, xs, y, y32):
        n.meta.update(origin)
    y32.meta[meta.PRECISION] = "fp16 (scaled)"
    return y32


def remove_redundant_casts(gm: fx.GraphModule) -> int:
    """``cast(cast(x, wider), dtype(x)) -> x``: the round trip through a wider type is lossless."""
    removed = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in DTYPE_CASTS or not node.args:
            continue
        inner = node.args[0]
        if not isinstance(inner, fx.Node) or inner.op != "call_function" or inner.target not in DTYPE_CASTS:
            continue
        src = inner.args[0] if inner.args else None
        to = node.kwargs.get("dtype", node.args[1] if len(node.args) > 1 else None)
        mid = inner.kwargs.get("dtype", inner.args[1] if len(inner.args) > 1 else None)
        src_dtype = _dtype_of(src)
        if src_dtype is None or to != src_dtype or mid is None:
            continue
        if not _lossless(src_dtype, mid):
            continue
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        removed += 1
    return removed


def _dtype_of(node: Any) -> torch.dtype | None:
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_function" and node.target in DTYPE_CASTS:
        return node.kwargs.get("dtype", node.args[1] if len(node.args) > 1 else None)
    val = ir.tensor_meta(node)
    return val.dtype if val is not None else None


def _lossless(src: torch.dtype, mid: torch.dtype) -> bool:
    if src == mid:
        return True
    if not (src.is_floating_point and mid.is_floating_point):
        return False
    fs, fm = torch.finfo(src), torch.finfo(mid)
    return fm.bits >= fs.bits and fm.max >= fs.max and fm.eps <= fs.eps
