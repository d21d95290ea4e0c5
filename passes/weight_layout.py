"""Matrix-vector layout: a linear whose activation has few rows multiplies with its weight stored (in, out).

Rewrites (the weight transposed once, at optimize time, as a new constant; the
user's tensors are never changed):

    linear(x, W)          -> matmul(x, W_in_out)            W_in_out = W.T, contiguous
    linear(x, W, b)       -> add(matmul(x, W_in_out), b)

Why: a decode step multiplies one token per row by every weight, and on CPU
the BLAS matrix-vector kernel reads a row-major (out, in) weight at half the
speed of the same weight stored (in, out): measured on an AMD EPYC Zen 5
(2 threads, torch 2.13), the 29 matvecs of a Llama-style decode step (hidden
512, vocab 32000) take 7.3 ms as ``linear`` and 3.9 ms as ``x @ W_in_out``.
Numerics: the same products summed in another order (fp32: ~1e-7 relative).

Not in the default pipeline unless ``weight_layout_policy`` is given;
generation turns it on for its decode graph, where every linear is a
matrix-vector product. Applied only where it is faster on the target: each (rows, in, out, dtype)
shape is timed both ways on ``ctx.device`` in alternating rounds (timings kept
on ``ctx.target.timings``), and the rewrite is kept when it measures at least
``LAYOUT_MIN_SPEEDUP`` (1.05x) faster. Runs before ``precision``, which reads
``matmul(x, W_in_out)`` as the same linear site.

Option ``weight_layout_policy``: ``measure`` (default), ``always`` (every
linear with a stored 2-D weight, any row count, without measuring: the random
model differential test uses it) or ``off``.

Declines (with the reason in the report):
    * more than ``MAX_MATVEC_ROWS`` activation rows: a matrix product, where
      the layout does not matter (not measured, to keep optimize fast);
    * the (in, out) layout measured slower, or faster by less than the margin;
    * a weight that is not a stored 2-D constant, or an input of unknown shape.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.fx as fx

from graphopt import ir
from graphopt.opsets import erase_dead
from graphopt.pass_infra import OptimizeContext, Option, Pass, PassResult
from graphopt.report import Declined
from graphopt.target.timing import TimingCache, time_alternating

log = logging.getLogger(__name__)
aten = torch.ops.aten

#: activation rows above which a linear is a matrix product and is left alone
MAX_MATVEC_ROWS = 64
#: the least measured speedup at which the layout changes (smaller gains are timing noise)
LAYOUT_MIN_SPEEDUP = 1.05


def measure_layout(rows: int, in_features: int, out_features: int, dtype: torch.dtype, device: str,
                   timings: TimingCache | None = None) -> tuple[float, float]:
    """Seconds per call of ``linear(x, W)`` and of ``x @ W_in_out`` at this shape (kept in ``timings``)."""
    timings = timings if timings is not None else TimingCache()
    key = ("weight_layout", rows, in_features, out_features, dtype, device, torch.get_num_threads())
    return timings.get_or_measure(key, lambda: _time_layout(rows, in_features, out_features, dtype, device))


def _time_layout(rows: int, in_features: int, out_features: int, dtype: torch.dtype,
                 device: str) -> tuple[float, float]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, in_features, generator=g).to(device, dtype)
    w = torch.randn(out_features, in_features, generator=g).to(device, dtype)
    w_in_out = w.t().contiguous()
    with torch.no_grad():
        linear_s, in_out_s = time_alternating([lambda: torch.nn.functional.linear(x, w),
                                               lambda: torch.matmul(x, w_in_out)])
    log.info("weight_layout: %dx%d @ %dx%d %s on %s: linear %.1f us, (in, out) %.1f us", rows, in_features,
             out_features, in_features, dtype, device, linear_s * 1e6, in_out_s * 1e6)
    return linear_s, in_out_s


def _candidate(gm: fx.GraphModule, node: fx.Node, any_rows: bool) -> tuple[int, torch.Tensor] | str:
    """(rows, weight) of a linear this pass may rewrite, or why not."""
    weight = node.args[1]
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
        return "the weight is not a stored constant"
    value = ir.get_attr_value(gm, weight)
    if not isinstance(value, torch.Tensor) or value.ndim != 2 or not value.dtype.is_floating_point:
        return "the weight is not a 2-D floating-point tensor"
    shape = ir.shape_of(node.args[0])
    if shape is None or not shape:
        return "the input's shape is unknown"
    rows = math.prod(shape[:-1])
    if rows > MAX_MATVEC_ROWS and not any_rows:
        return f"{rows} activation rows > {MAX_MATVEC_ROWS}: a matrix product, where the layout does not matter"
    return rows, value


def _rewrite(gm: fx.GraphModule, node: fx.Node, weight: torch.Tensor) -> fx.Node:
    graph = gm.graph
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    with graph.inserting_before(node):
        w_node = graph.get_attr(ir.register_constant(gm, ir.module_path(node) + ".weight_in_out",
                                                     weight.detach().t().contiguous()))
        out = graph.call_function(aten.matmul.default, (node.args[0], w_node))
        if bias is not None:
            out = graph.call_function(aten.add.Tensor, (out, bias))
    for new in {w_node, out, out.args[0] if bias is not None else out}:
        new.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")})
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    return out


class MatvecWeightLayout(Pass):
    name = "weight_layout"
    summary = "store a matrix-vector linear's weight as (in, out) where the device multiplies faster that way"
    options = {
        "weight_layout_policy": Option("'measure' (default: where a micro-benchmark on the device is faster), "
                                       "'always' or 'off'", str, "measure", ("measure", "always", "off")),
    }

    def call(self, gm: fx.GraphModule, ctx: OptimizeContext) -> PassResult:
        policy = self.option(ctx, "weight_layout_policy")
        if policy == "off":
            return PassResult(gm, False, ["weight_layout_policy='off'"])
        notes: list[str] = []
        declined: list[Declined] = []
        involved: list[str] = []
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target != aten.linear.default:
                continue
            label = ir.module_path(node) or node.name
            found = _candidate(gm, node, policy == "always")
            if isinstance(found, str):
                declined.append(Declined(label, found))
                continue
            rows, weight = found
            if policy == "always":
                involved.append(_rewrite(gm, node, weight).name)
                continue
            linear_s, in_out_s = measure_layout(rows, weight.shape[1], weight.shape[0], weight.dtype,
                                                str(ctx.device), ctx.target.timings)
            ratio = linear_s / in_out_s if in_out_s > 0 else math.inf
            timing = f"(in, out) {in_out_s * 1e6:.1f} us vs linear {linear_s * 1e6:.1f} us on {ctx.device}"
            if ratio < LAYOUT_MIN_SPEEDUP:
                declined.append(Declined(label, f"{timing}: {ratio:.2f}x < {LAYOUT_MIN_SPEEDUP:.2f}x"))
                continue
            involved.append(_rewrite(gm, node, weight).name)
            notes.append(f"{label}: {timing}: {ratio:.2f}x")
        if involved:
            erase_dead(gm)
        summary = [f"stored {len(involved)} weights (in, out) for matrix-vector products"] if involved else []
        return PassResult(gm, bool(involved), summary + notes, declined, involved)
