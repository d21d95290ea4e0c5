"""Export to ONNX, checked in onnxruntime.

:func:`export_onnx` takes an :class:`~graphopt.optimize.OptimizeResult` (or
any ``nn.Module`` / ``ExportedProgram`` with example inputs) and, step by step,

1. exports it with ``torch.export`` (dynamic ``batch`` / ``seq`` axes when
   asked, :mod:`graphopt.onnx.dynamic`) and translates it with torch.onnx's
   exporter (the dynamo path), handing it ``graphopt.ops.onnx_translations()``
   so graphopt's custom operators export too, then runs onnxscript's optimizer
   (see :func:`_translate` for why not torch.onnx's own ``optimize=True``);
2. for ``target="onnxruntime"`` (the default), applies graphopt's ONNX-side
   rewrites for onnxruntime (:mod:`graphopt.onnx.rewrites`);
3. saves it in a temporary directory next to ``path`` and runs ``onnx.checker``
   and ONNX shape inference on the file (:func:`graphopt.onnx.check.validate`);
4. runs it in onnxruntime against torch (:func:`graphopt.onnx.check.check_onnx`).
   A mismatch raises :class:`~graphopt.onnx.check.OnnxMismatchError`; nothing is written;
5. moves the file into place only when all of that passed.

With ``compare_speed=True`` it also times, in onnxruntime with the same
session options and in one process, the plain ``torch.onnx.export`` of the
original model against graphopt's export (:mod:`graphopt.onnx.speed`).

It returns an :class:`~graphopt.onnx.result.OnnxExport` and writes into no
report: the caller records it (:func:`~graphopt.onnx.result.record_onnx_export`).

Exporting a statically captured result with ``dynamic=`` raises
:class:`OnnxExportError` saying how to capture it with dynamic shapes.

>>> import torch, graphopt
>>> result = graphopt.optimize(torch.nn.Linear(8, 4), (torch.randn(2, 8),))
>>> info = graphopt.export_onnx(result, "linear.onnx")      # doctest: +SKIP
>>> info.numerics.ok                                       # doctest: +SKIP
True
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx._pytree import tree_flatten_spec

from graphopt import ir, ops
from graphopt.onnx.check import OnnxMismatchError, check_onnx, check_reference, compute_precision, validate
from graphopt.onnx.complex_values import complex_origin, describe_complex_origin
from graphopt.onnx.dynamic import (
    STATIC_CAPTURE_HINT,
    dynamic_shapes_for,
    name_dynamic_axes,
    parse_dynamic,
    widen_for_dynamic,
)
from graphopt.onnx.files import move_into_place, save_model, scratch_directory_for
from graphopt.onnx.moe import grouped_mm_translations
from graphopt.onnx.result import TARGETS, NoOnnxForm, OnnxExport, OnnxExportError
from graphopt.onnx.speed import compare_with_plain_export
from graphopt.onnx.torch_run import as_tuple, inference
from graphopt.optimize import OptimizeResult
from graphopt.precision.quantize import weights_not_pair_safe
from graphopt.user_state import preserves_user_state

log = logging.getLogger(__name__)

#: opset picked when the graph holds scaled_dot_product_attention (exported as the Attention op)
ATTENTION_OPSET = 23


@dataclass
class _Source:
    """What is exported: the module, its example inputs, and what it is checked against."""

    module: torch.nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    baseline: Any  # the original program or module (the plain export's input; a precision result's reference)
    from_result: bool  # an OptimizeResult: captured with the shapes it was given
    budget: Any  # the error budget an OptimizeResult's passes were held to (None for a plain module)


@preserves_user_state
def export_onnx(
    result_or_module: Any,
    path: str | os.PathLike[str],
    example_inputs: Any = None,
    example_kwargs: dict[str, Any] | None = None,
    *,
    dynamic: str | Sequence[str] | None = None,
    opset: int | None = None,
    check: bool = True,
    target: str = "onnxruntime",
    n_random_inputs: int = 2,
    compare_speed: bool = False,
    speed_runs: int = 10,
    session_threads: int | None = None,
) -> OnnxExport:
    """Export ``result_or_module`` to ONNX at ``path``, check it in onnxruntime, return what was done.

    ``result_or_module``: an :class:`~graphopt.optimize.OptimizeResult` (its
    module and example inputs), or an ``nn.Module`` / ``ExportedProgram`` with
    ``example_inputs`` (and ``example_kwargs``).
    ``dynamic``: ``"batch"``, ``"seq"`` or ``"batch,seq"`` (see :func:`~graphopt.onnx.dynamic.axes_of_input`).
    ``opset``: the ai.onnx opset; default: 23 when the graph holds
    ``scaled_dot_product_attention`` (exported as the fused ``Attention`` op),
    otherwise torch.onnx's default.
    ``target``: ``"onnxruntime"`` applies :mod:`graphopt.onnx.rewrites` (may use
    onnxruntime contrib ops); ``"standard"`` keeps to ai.onnx ops.
    ``check``: run onnxruntime against torch; :class:`OnnxMismatchError` on a mismatch.
    ``compare_speed``: time the plain ``torch.onnx.export`` of the original model
    against this export (``OnnxExport.speed``).

    The result is returned, not written into ``result_or_module``'s report:
    record it with :func:`~graphopt.onnx.result.record_onnx_export`.
    Raises :class:`OnnxExportError` when the model cannot be exported (the
    message names an operator without translation), :class:`OnnxMismatchError`
    when onnxruntime disagrees with torch. Either way nothing is left at ``path``.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    axes = parse_dynamic(dynamic)
    source = _resolve(result_or_module, example_inputs, example_kwargs)
    info = OnnxExport(path=os.fspath(path), target=target)
    ep, model = _export(source, axes, opset, info)
    tensors = _tensor_inputs(source, ep)
    info.dynamic_axes = name_dynamic_axes(model, tensors, axes, source.from_result)
    if target == "onnxruntime":
        _rewrite_for_onnxruntime(model, info)
    info.op_counts = dict(Counter((f"{n.domain}." if n.domain else "") + n.op_type for n in model.graph))
    info.inputs = [_value_info(v) for v in model.graph.inputs]
    info.outputs = [_value_info(v) for v in model.graph.outputs]
    with scratch_directory_for(info.path) as scratch:
        staged = os.path.join(scratch, os.path.basename(info.path))
        save_model(model, staged)
        with _timed(info, "validate"):
            validate(staged)
        if check:
            with _timed(info, "check"):
                _check(staged, ep, source, axes, n_random_inputs, info)
        if compare_speed:
            with _timed(info, "speed"):
                info.speed = compare_with_plain_export(source.baseline, source.args, source.kwargs, staged,
                                                       tensors, scratch, speed_runs, session_threads)
        info.files = move_into_place(scratch, os.path.dirname(os.path.abspath(info.path)))
    log.info("exported %s", info.summary())
    return info


@contextlib.contextmanager
def _timed(info: OnnxExport, step: str) -> Iterator[None]:
    """Time a step into ``info.seconds[step]`` (only when it completes)."""
    start = time.perf_counter()
    yield
    info.seconds[step] = time.perf_counter() - start


def _resolve(target: Any, example_inputs: Any, example_kwargs: dict[str, Any] | None) -> _Source:
    """The module to export, its inputs and its references, for what was given."""
    budget = getattr(getattr(target, "context", None), "error_budget", None)
    if isinstance(target, OptimizeResult):
        args = target.example_args if example_inputs is None else example_inputs
        kwargs = target.example_kwargs if example_inputs is None and example_kwargs is None else example_kwargs
        return _Source(target.module, as_tuple(args), dict(kwargs or {}), target.captured.exported_program,
                       from_result=True, budget=budget)
    if isinstance(target, torch.export.ExportedProgram):
        if example_inputs is None and target.example_inputs:
            example_inputs, example_kwargs = target.example_inputs
        target = target.module()
    if not isinstance(target, torch.nn.Module):
        raise TypeError(f"export_onnx expects an OptimizeResult, an nn.Module or an ExportedProgram, "
                        f"got {type(target).__name__}")
    if example_inputs is None:
        raise ValueError("export_onnx needs example_inputs for an nn.Module (the inputs it is called with)")
    return _Source(target, as_tuple(example_inputs), dict(example_kwargs or {}), target,
                   from_result=False, budget=budget)


def _export(source: _Source, axes: tuple[str, ...], opset: int | None,
            info: OnnxExport) -> tuple[torch.export.ExportedProgram, Any]:
    """torch.export with the asked dynamic axes, then the ONNX translation: (program, onnx_ir model).

    Widens ``source``'s inputs first where a dynamic axis has size 1 (:func:`widen_for_dynamic`).
    """
    with _timed(info, "export"):
        if axes:
            source.args, source.kwargs = widen_for_dynamic(source.args, source.kwargs, axes)
        try:
            shapes = dynamic_shapes_for(source.module, source.args, source.kwargs, axes)
        except ValueError as exc:
            raise OnnxExportError(str(exc)) from exc
        ep = _torch_export(source.module, source.args, source.kwargs, shapes, source.from_result)
        _note_unportable_int8(source.module, info)
        if opset is None and _contains_sdpa(ep):
            opset = ATTENTION_OPSET
            info.notes.append(f"opset {opset}: scaled_dot_product_attention exports as the Attention op")
        model = _translate(ep, opset, {**ops.onnx_translations(), **grouped_mm_translations()}).model
        info.opset = int(model.opset_imports.get("", 0))
    return ep, model


def _tensor_inputs(source: _Source, ep: torch.export.ExportedProgram) -> list[torch.Tensor]:
    """The flattened tensor inputs, in the ONNX graph's input order."""
    leaves = list(tree_flatten_spec((source.args, source.kwargs), ep.call_spec.in_spec))
    return [x for x in leaves if isinstance(x, torch.Tensor)]


def _torch_export(module: torch.nn.Module, args: tuple, kwargs: dict, dynamic_shapes: Any,
                  from_result: bool) -> torch.export.ExportedProgram:
    try:
        with inference(module), torch.no_grad():
            return torch.export.export(module, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if dynamic_shapes is not None and ("specialized" in str(exc) or "Constraints violated" in str(exc)):
            hint = (STATIC_CAPTURE_HINT if from_result
                    else "the model fixes that size in its code; export without it in dynamic")
            raise OnnxExportError(f"cannot make the asked axes dynamic: {first}; {hint}") from exc
        raise OnnxExportError(f"torch.export failed before ONNX translation: {type(exc).__name__}: {first}") from exc


_NO_FUNCTION = re.compile(r"No ONNX function found for <OpOverload\(op='([^']+)', overload='([^']+)'\)>")


def _untranslatable_ops(exc: BaseException) -> list[str]:
    found: list[str] = []
    e: BaseException | None = exc
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        for op, overload in _NO_FUNCTION.findall(str(e)):
            name = f"{op}.{overload}"
            if name not in found:
                found.append(name)
        e = e.__cause__ or e.__context__
    return found


def _where_used(ep: torch.export.ExportedProgram, op: str) -> str:
    for node in ep.graph.nodes:
        if node.op == "call_function" and str(node.target) == op:
            line = ir.source_line(node)
            return f" (node {node.name}{', from ' + line if line else ''})"
    return ""


def _translate(ep: torch.export.ExportedProgram, opset: int | None, table: dict[Any, Any]) -> Any:
    """torch.onnx's dynamo export, then onnxscript's optimizer -- without the opset-23 ONNX fusions.

    ``torch.onnx.export(optimize=True)`` also runs ``onnxscript.rewriter.onnx_fusions`` at opset
    23 (RMSNormalization, RotaryEmbedding, GQA); its RotaryEmbedding fusion gave a Llama a
    ``cos_cache`` of batch 1 for an input of batch 2, which onnxruntime 1.32 rejects. So the
    export runs with ``optimize=False`` and the optimizer (constant folding, clean-up) is run here.
    """
    import onnxscript.optimizer  # lazy: keeps `import graphopt` (and the CLI's start-up) free of onnxscript

    try:
        with contextlib.redirect_stdout(None):
            program = torch.onnx.export(ep, (), dynamo=True, opset_version=opset,
                                        custom_translation_table=table or None, optimize=False, verbose=False)
        onnxscript.optimizer.optimize(program.model)
        return program
    except Exception as exc:
        ops_missing = _untranslatable_ops(exc)
        _refuse_complex_values(ep, exc, ops_missing)
        if ops_missing:
            where = "; ".join(f"{op}{_where_used(ep, op)}" for op in ops_missing)
            raise OnnxExportError(
                f"cannot convert to ONNX: no ONNX translation for operator {where}. Add one to the "
                f"operator's DECLARATIONS (onnx=..., graphopt/ops/; see docs/convert.md) or leave out the pass "
                f"that introduced it (--passes)", ops_missing) from exc
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise OnnxExportError(f"torch.onnx could not translate the program: {first}") from exc


def _refuse_complex_values(ep: torch.export.ExportedProgram, exc: BaseException, ops_missing: list[str]) -> None:
    """A failed translation of a graph with complex tensors: :class:`NoOnnxForm` naming where they start."""
    origin = complex_origin(ep.graph)
    if origin is None:
        return
    failed = ("; torch.onnx failed at " + "; ".join(f"{op}{_where_used(ep, op)}" for op in ops_missing)
              if ops_missing else f"; torch.onnx: {next(iter(str(exc).strip().splitlines()), type(exc).__name__)}")
    raise NoOnnxForm(
        f"cannot convert to ONNX: {describe_complex_origin(origin)} makes a complex tensor, which ONNX's operators "
        f"do not compute on{failed}. It is the model's own code, so the original model does not export to ONNX "
        f"either: compute it with real tensors (e.g. rotary embeddings as cos/sin products)",
        origin.name, ops_missing) from exc


def _rewrite_for_onnxruntime(model: Any, info: OnnxExport) -> None:
    """The onnxruntime rewrites (:mod:`graphopt.onnx.rewrites`), their counts, declines and notes in ``info``."""
    from graphopt.onnx.rewrites import rewrite_for_onnxruntime  # lazy: it imports onnxscript (start-up time)

    with _timed(info, "rewrite"):
        outcome = rewrite_for_onnxruntime(model)
    info.rewrites, info.declined = outcome.counts, outcome.declined
    widened = outcome.counts.get("bf16_in_float32", 0)
    if widened:
        info.notes.append(f"{widened} bf16 nodes computed in float32 and rounded to bf16 after (onnxruntime's "
                          "CPU provider has no bf16 arithmetic kernels; the bf16 weights stay bf16 in the file)")


def _check(staged: str, ep: torch.export.ExportedProgram, source: _Source, axes: tuple[str, ...],
           n_random_inputs: int, info: OnnxExport) -> None:
    """onnxruntime against torch (or the original model, for a precision result); raise on a mismatch."""
    precision = compute_precision(ep)
    reference, against, floor = check_reference(precision, source.module, source.baseline, source.budget)
    info.checked_against = against
    if precision:
        info.notes.append(f"the graph computes in {precision}: float outputs checked against {against} "
                          f"at relative L2 {floor:.0e}" + (" (the error budget the precision pass held)"
                                                           if reference is not source.module else ""))
    numerics, shapes_checked, tolerance = check_onnx(
        staged, reference, source.args, source.kwargs, dynamic=axes, n_random_inputs=n_random_inputs,
        in_spec=ep.call_spec.in_spec, spec_module=ep.module(), tolerance_floor=floor)
    info.numerics, info.checked_shapes, info.tolerance = numerics, shapes_checked, tolerance
    if not numerics.ok:
        raise OnnxMismatchError(f"onnxruntime's outputs differ from {against}: {numerics.reason} "
                                f"({numerics.summary()}); nothing was written", numerics, info)


def _note_unportable_int8(module: Any, info: OnnxExport) -> None:
    """Warn when int8 weights are plain (VNNI CPUs): MatMulInteger on AVX2 CPUs would saturate them."""
    plain = weights_not_pair_safe(module)
    if plain:
        note = (f"{len(plain)} int8 linears have plain (not pair-safe) weights: exact in onnxruntime on CPUs "
                "with VNNI, but MatMulInteger on AVX2 CPUs without VNNI saturates them; optimize with "
                "precision_int8_pair_safe=True for a file that is exact everywhere (graphopt convert does)")
        info.notes.append(note)
        log.warning(note)


def _contains_sdpa(ep: torch.export.ExportedProgram) -> bool:
    targets = {torch.ops.aten.scaled_dot_product_attention.default}
    return any(n.op == "call_function" and n.target in targets for n in ep.graph.nodes)


def _value_info(value: Any) -> dict[str, Any]:
    shape = [d if isinstance(d, int) else str(d.value if hasattr(d, "value") else d) for d in (value.shape or [])]
    return {"name": value.name, "dtype": str(value.dtype).rsplit(".", 1)[-1] if value.dtype else "?", "shape": shape}
