"""ONNX translations for the mixture-of-experts grouped matmul.

transformers' MoE layers (Mixtral, DeepSeek-V3, Qwen-MoE, ...) sort the routed
tokens by expert and multiply them with one call,
``grouped_mm(input (M, K), weight (G, K, N), offs (G,))``: rows
``offs[g-1]:offs[g]`` go through expert ``g``. On CPU at float32 that call is
the custom operator ``transformers::grouped_mm_fallback`` (a loop of
``torch.mm``); elsewhere it is ``aten::_grouped_mm``. torch.onnx has a
translation for neither, so the export failed with "no ONNX translation for
operator transformers.grouped_mm_fallback.default".

:func:`grouped_mm_translations` gives both a translation to standard ONNX ops
(:func:`grouped_mm_onnx`), for the ones registered in the process (it never
imports transformers). graphopt's export, the KV-cache export and the plain
export that ``compare_speed`` times against all take it: without it an MoE
model does not export at all.

Why graphopt's own function and not transformers': recent transformers ship
one (``transformers.exporters.exporter_onnx._aten_grouped_mm``), but it is a
private name, the ``exporters`` package is absent from transformers 4.x and
5.0 (which graphopt supports, ``transformers>=4.45``, and 5.0 already has the
MoE ``grouped_mm`` path), and importing it costs seconds. Ours follows the same
construction (one ``MatMul`` per expert, the expert count being static) and
differs in one point: rows past ``offs[-1]`` (tokens routed to no expert)
come out as zeros, as ``grouped_mm_fallback`` writes them, so the output
keeps ``M`` rows.
"""

from __future__ import annotations

from typing import Any

import torch

#: the grouped-matmul operators translated here, by qualified name
GROUPED_MM_OPS = ("aten::_grouped_mm", "transformers::grouped_mm_fallback")

_INT64 = 7  # onnx TensorProto.INT64


def grouped_mm_translations() -> dict[Any, Any]:
    """``{op overload: translation}`` for the grouped-matmul operators registered in this process.

    ``transformers::grouped_mm_fallback`` is registered only once transformers' MoE code was
    imported (as any model using it has); nothing here imports transformers. A translation of an
    operator the program does not call is never used.
    """
    table: dict[Any, Any] = {}
    for name in GROUPED_MM_OPS:
        namespace, op_name = name.split("::")
        packet = getattr(getattr(torch.ops, namespace), op_name, None)  # None: not registered
        if packet is not None:
            table[packet.default] = grouped_mm_onnx
    return table


def grouped_mm_onnx(mat_a: Any, mat_b: Any, offs: Any = None, bias: Any = None, out_dtype: Any = None) -> Any:
    """``out[r] = mat_a[r] @ mat_b[g]`` for the rows ``r`` in group ``g`` (``offs``: cumulative row ends).

    ``mat_a`` (M, K) sorted by group, ``mat_b`` (G, K, N) with G static, ``offs`` (G,) int32/int64;
    ``bias`` (G, N) optional. Rows past ``offs[-1]`` are zeros. Unrolled into one ``Gather`` +
    ``MatMul`` per group and a ``Concat``: no (M, K, N) gather of per-row weights.
    """
    from onnxscript import opset18 as op  # lazy: only an ONNX export loads onnxscript (start-up speed)

    groups = mat_b.shape[0] if mat_b.shape is not None and len(mat_b.shape) == 3 else None
    if offs is None or not isinstance(groups, int) or mat_a.shape is None or len(mat_a.shape) != 2:
        raise ValueError("grouped_mm: only the MoE form (M, K) x (G, K, N) with offs and a static G exports")
    if out_dtype is not None:
        raise ValueError("grouped_mm: out_dtype has no ONNX translation here; export the model without it")

    def per_group(x: Any) -> list[Any]:
        return list(op.Split(x, axis=0, num_outputs=groups)) if groups > 1 else [x]

    axes_0 = op.Constant(value_ints=[0])
    ends, weights = per_group(op.Cast(offs, to=_INT64)), per_group(mat_b)
    biases = per_group(bias) if bias is not None else None
    start, one = op.Constant(value_ints=[0]), op.Constant(value_int=1)
    outputs = []
    for g in range(groups):
        rows = op.Range(op.Squeeze(start, axes_0), op.Squeeze(ends[g], axes_0), one)
        out = op.MatMul(op.Gather(mat_a, rows, axis=0), op.Squeeze(weights[g], axes_0))
        if biases is not None:
            out = op.Add(out, op.Squeeze(biases[g], axes_0))
        outputs.append(out)
        start = ends[g]
    rest = op.Sub(op.Shape(mat_a, start=0, end=1), start)  # rows routed to no group
    zeros = op.Expand(op.CastLike(op.Constant(value_float=0.0), mat_a),
                      op.Concat(rest, op.Shape(mat_b, start=2, end=3), axis=0))
    return op.Concat(*outputs, zeros, axis=0)
