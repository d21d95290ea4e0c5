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

Option ``weight_layout_long_scale`` (None by default): a graph whose rows grow
with a dynamic axis (generation's prefill: a prompt of any length) is also
timed at this many times its example's rows, and the layout is kept only where
it is no slower there than ``LONG_ROWS_TOLERANCE`` allows. Generation sets it
for its prefill graph, whose 16-row example (2 prompts of 8 tokens) stands for
prompts of tens to hundreds of tokens: measured on an Intel Xeon with AMX (2
threads, torch 2.13) on the 4-layer Llama of benchmarks/generate.py, the
(in, out) layout makes a 32-token prefill 13% faster, a 128-token one 5%, and
8 prompts of 128 tokens (1,024 rows) 1.6% slower, which the long check catches
shape by shape.

A weight transposed once is shared: graphs captured from the same model
(generation's prefill and decode) hold one (in, out) copy of each weight, not
one per graph (``_transposed``).

Declines (with the reason in the report):
    * more than ``MAX_MATVEC_ROWS`` activation rows: a matrix product, where
      the layout does not matter (not measured, to keep optimize fast);
    * the (in, out) layout measured slower, or faster by less than the margin;
    * (with ``weight_layout_long_scale``) slower at the long rows by more than
      the tolerance;
    * a weight that is not a stored 2-D constant, or an input of unknown shape.
"""

from __future__ import annotations

import logging
import math
import weakref

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
#: at the long rows (``weight_layout_long_scale``) the (in, out) layout may be at most this much slower (noise)
LONG_ROWS_TOLERANCE = 1.02
#: (in, out) copies made so far, by the source weight's storage; a copy lives while a graph holds it
_TRANSPOSES: weakref.WeakValueDictionary[tuple, torch.Tensor] = weakref.WeakValueDictionary()
#: the source weight of each copy in ``_TRANSPOSES`` (a freed source's storage can be reused by another tensor)
_SOURCES: dict[tuple, weakref.ref] = {}


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


def _transposed(weight: torch.Tensor) -> torch.Tensor:
    """``weight.T`` contiguous, made once per stored weight while some graph holds the copy.

    Keyed by the weight's storage, shape, dtype and in-place version, and
    checked against the source tensor (alive, on the same storage), so a
    changed or freed weight never gets a stale copy.
    """
    key = (weight.untyped_storage().data_ptr(), weight.storage_offset(), tuple(weight.shape), tuple(weight.stride()),
           weight.dtype, str(weight.device), weight._version)
    ref = _SOURCES.get(key)
    source, copy = (ref() if ref is not None else None), _TRANSPOSES.get(key)
    if copy is not None and source is not None and source.untyped_storage().data_ptr() == key[0]:
        return copy
    copy = weight.detach().t().contiguous()
    _TRANSPOSES[key], _SOURCES[key] = copy, weakref.ref(weight)
    for stale in [k for k, ref in _SOURCES.items() if ref() is None or k not in _TRANSPOSES]:
        del _SOURCES[stale]
    return copy


def _rewrite(gm: fx.GraphModule, node: fx.Node, weight: torch.Tensor) -> fx.Node:
    graph = gm.graph
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    with graph.inserting_before(node):
        w_node = graph.get_attr(ir.register_constant(gm, ir.module_path(node) + ".weight_in_out",
                                                     _transposed(weight)))
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
        "weight_layout_long_scale": Option("also time each linear at this many times its example's rows (a graph "
                                           "whose rows grow with a dynamic axis) and keep the (in, out) layout only "
                                           "where it is no slower there (None: the example's rows only)", int, None,
                                           check=lambda v: None if v >= 1 else "give a whole number >= 1"),
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
            long_check = self._long_rows(ctx, rows, weight)
            if long_check is not None and long_check[1]:
                declined.append(Declined(label, f"{timing}: {ratio:.2f}x, but {long_check[0]}"))
                continue
            involved.append(_rewrite(gm, node, weight).name)
            notes.append(f"{label}: {timing}: {ratio:.2f}x" + (f"; {long_check[0]}" if long_check else ""))
        if involved:
            erase_dead(gm)
        summary = [f"stored {len(involved)} weights (in, out) for matrix-vector products"] if involved else []
        return PassResult(gm, bool(involved), summary + notes, declined, involved)

    def _long_rows(self, ctx: OptimizeContext, rows: int, weight: torch.Tensor) -> tuple[str, bool] | None:
        """(what the long-rows timing found, whether it rules the layout out); None without the option."""
        scale = self.option(ctx, "weight_layout_long_scale")
        if not scale or scale == 1:
            return None
        long_rows = rows * scale
        linear_s, in_out_s = measure_layout(long_rows, weight.shape[1], weight.shape[0], weight.dtype,
                                            str(ctx.device), ctx.target.timings)
        slower = in_out_s > linear_s * LONG_ROWS_TOLERANCE
        return (f"at {long_rows} rows (in, out) {in_out_s * 1e6:.1f} us vs linear {linear_s * 1e6:.1f} us"
                + (f": slower by more than {LONG_ROWS_TOLERANCE:.2f}x" if slower else ""), slower)
