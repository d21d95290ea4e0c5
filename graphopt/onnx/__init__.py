"""ONNX: export checked in onnxruntime, read an ``.onnx`` file, time onnxruntime, the onnxruntime rewrites.

- :mod:`~graphopt.onnx.export`: :func:`export_onnx` -> :class:`OnnxExport` (the caller records it in a
  report: :func:`record_onnx_export`);
- :mod:`~graphopt.onnx.dynamic`: dynamic ``batch`` / ``seq`` axes;
- :mod:`~graphopt.onnx.check`: onnx.checker and onnxruntime against torch (:class:`OnnxMismatchError`);
- :mod:`~graphopt.onnx.reader`: :func:`load_onnx` -> :class:`OnnxGraph`;
- :mod:`~graphopt.onnx.speed`: onnxruntime latency side by side, the plain export to compare with;
- :mod:`~graphopt.onnx.kv_cache`: a causal LM with its KV cache (:func:`export_kv_onnx`, past/present
  inputs and outputs in optimum's naming) and greedy generation in onnxruntime (:class:`OrtKVGenerator`);
- :mod:`~graphopt.onnx.rewrites`: the onnxruntime target's onnx_ir passes (:mod:`~graphopt.onnx.bf16`,
  :mod:`~graphopt.onnx.gqa`, :mod:`~graphopt.onnx.int8`), imported when an export needs them
  (they load onnxscript).
"""

from __future__ import annotations

from graphopt.onnx.check import (
    ONNX_REL_L2_TOLERANCE,
    REDUCED_PRECISION_TOLERANCE,
    OnnxMismatchError,
    check_onnx,
    compute_precision,
)
from graphopt.onnx.dynamic import DYNAMIC_AXES, axes_of_input, dynamic_shapes_for, parse_dynamic, widen_for_dynamic
from graphopt.onnx.export import ATTENTION_OPSET, export_onnx
from graphopt.onnx.kv_cache import OrtGeneration, OrtKVGenerator, export_kv_onnx
from graphopt.onnx.reader import OnnxGraph, load_onnx
from graphopt.onnx.result import TARGETS, NoOnnxForm, OnnxExport, OnnxExportError, record_onnx_export
from graphopt.onnx.speed import compare_latency, export_plain

__all__ = [
    "ATTENTION_OPSET",
    "DYNAMIC_AXES",
    "ONNX_REL_L2_TOLERANCE",
    "REDUCED_PRECISION_TOLERANCE",
    "TARGETS",
    "NoOnnxForm",
    "OnnxExport",
    "OnnxExportError",
    "OnnxGraph",
    "OnnxMismatchError",
    "OrtGeneration",
    "OrtKVGenerator",
    "axes_of_input",
    "check_onnx",
    "compare_latency",
    "compute_precision",
    "dynamic_shapes_for",
    "export_kv_onnx",
    "export_onnx",
    "export_plain",
    "load_onnx",
    "parse_dynamic",
    "record_onnx_export",
    "widen_for_dynamic",
]
