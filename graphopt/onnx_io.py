"""Export to ONNX, checked in onnxruntime.

:func:`export_onnx` takes an :class:`~graphopt.optimize.OptimizeResult` (or
any ``nn.Module`` / ``ExportedProgram`` with example inputs) and

1. exports it with ``torch.export`` (dynamic ``batch`` / ``seq`` axes when
   asked) and translates it with torch.onnx's exporter (the dynamo path),
   handing it ``graphopt.ops.onnx_translations()`` so graphopt's custom
   operators export too, then runs onnxscript's optimizer (see
   :func:`_translate` for why not torch.onnx's own ``optimize=True``);
2. for ``target="onnxruntime"`` (the default), applies graphopt's ONNX-side
   rewrites for onnxruntime (:mod:`graphopt.onnx_rewrites`);
3. runs ``onnx.checker`` and ONNX shape inference on the file;
4. runs it in onnxruntime on the example inputs, on fresh random inputs of
   the same spec and -- with dynamic axes -- on inputs of another batch size /
   sequence length, and compares every output with torch's (relative L2 per
   output, tolerance by dtype: :data:`ONNX_REL_L2_TOLERANCE`). A mismatch
   raises :class:`OnnxMismatchError`; nothing is written;
5. writes the file only when all of that passed (built in a temporary
   directory next to ``path`` and renamed into place).

With ``compare_speed=True`` it also times, in onnxruntime with the same
session options and in one process, the plain ``torch.onnx.export`` of the
original model against graphopt's export (:mod:`graphopt.onnx_speed`).

Dynamic axes: an :class:`OptimizeResult` was captured with the shapes it was
given, and its passes may rely on them, so graphopt does *not* re-export the
original model (that would drop the optimizations): optimize with
``dynamic_shapes=dynamic_shapes_for(model, args, kwargs, "batch,seq")`` (what
``graphopt convert --dynamic`` does) and export the result with the same
``dynamic=``. Exporting a statically captured result with ``dynamic=`` raises
:class:`OnnxExportError` saying so.

>>> import torch, graphopt
>>> result = graphopt.optimize(torch.nn.Linear(8, 4), (torch.randn(2, 8),))
>>> info = graphopt.export_onnx(result, "linear.onnx")      # doctest: +SKIP
>>> info.numerics.ok                                       # doctest: +SKIP
True
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils import _pytree as pytree

from graphopt.report import Declined
from graphopt.verify import ErrorBudget, InputSpec, Numerics, compare_outputs, input_specs, summarize

log = logging.getLogger(__name__)

#: relative L2 allowed between onnxruntime's and torch's outputs, by output dtype
ONNX_REL_L2_TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-6,
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 2e-2,
}
#: axis names ``dynamic=`` understands
DYNAMIC_AXES = ("batch", "seq")
#: what ``target=`` may be
TARGETS = ("onnxruntime", "standard")
#: opset picked when the graph holds scaled_dot_product_attention (exported as the Attention op)
ATTENTION_OPSET = 23
#: above this many bytes of weights, they go to an external data file next to the model
EXTERNAL_DATA_THRESHOLD = 1 << 30


class OnnxExportError(RuntimeError):
    """The model could not be exported to a valid ONNX file.

    ``ops`` names the operators that have no ONNX translation, when that was the cause.
    """

    def __init__(self, message: str, ops: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.ops = list(ops)


class OnnxMismatchError(RuntimeError):
    """onnxruntime's outputs differ from torch's beyond the tolerance (never a warning)."""

    def __init__(self, message: str, numerics: Numerics, export: OnnxExport) -> None:
        super().__init__(message)
        self.numerics = numerics
        self.export = export


@dataclass
class OnnxExport:
    """What :func:`export_onnx` wrote and how it was checked."""

    path: str
    files: list[str] = field(default_factory=list)
    opset: int = 0
    target: str = "onnxruntime"
    inputs: list[dict[str, Any]] = field(default_factory=list)  # name, dtype, shape ('batch'/'seq' when dynamic)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)
    op_counts: dict[str, int] = field(default_factory=dict)
    rewrites: dict[str, int] = field(default_factory=dict)
    declined: list[Declined] = field(default_factory=list)
    numerics: Numerics | None = None
    checked_shapes: list[list[list[int]]] = field(default_factory=list)
    tolerance: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    speed: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    #: what onnxruntime was compared with: "torch's graph", or "the original model" (a precision result)
    checked_against: str = "torch's graph"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["declined"] = [x.to_dict() for x in self.declined]
        d["numerics"] = self.numerics.to_dict() if self.numerics else None
        d["seconds"] = {k: round(v, 3) for k, v in self.seconds.items()}
        return d

    def summary(self) -> str:
        parts = [f"{os.path.basename(self.path)} (opset {self.opset}, {sum(self.op_counts.values())} nodes)"]
        if self.numerics is not None:
            status = "ok" if self.numerics.ok else "MISMATCH"
            against = "torch" if self.checked_against == "torch's graph" else self.checked_against
            parts.append(f"onnxruntime vs {against} {status}: {self.numerics.summary()} over "
                         f"{self.numerics.inputs_checked} input sets")
        if self.speed:
            parts.append(f"onnxruntime median {self.speed['graphopt']['median_ms']:.1f} ms vs plain export "
                         f"{self.speed['plain']['median_ms']:.1f} ms (x{self.speed['speedup']:.2f})")
        return "; ".join(parts)


# --------------------------------------------------------------------------- dynamic axes

def parse_dynamic(dynamic: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"batch,seq"`` -> ``("batch", "seq")``; None or "" -> ``()``."""
    if not dynamic:
        return ()
    names = [n.strip() for n in dynamic.split(",")] if isinstance(dynamic, str) else [str(n) for n in dynamic]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in DYNAMIC_AXES]
    if unknown:
        raise ValueError(f"unknown dynamic axis {unknown[0]!r}; name batch and/or seq, e.g. 'batch,seq'")
    return tuple(dict.fromkeys(names))


def axes_of_input(x: Any, axes: Sequence[str]) -> dict[int, str]:
    """Which axes of one input tensor are dynamic.

    ``batch``: axis 0 of every tensor input. ``seq``: axis 1 of integer/bool
    inputs of rank >= 2 (token ids, attention masks, position ids) and of float
    inputs of rank 3 ((batch, seq, hidden) embeddings); never of images or
    (batch, features) inputs.
    """
    if not isinstance(x, torch.Tensor):
        return {}
    out: dict[int, str] = {}
    if "batch" in axes and x.ndim >= 1:
        out[0] = "batch"
    if "seq" in axes and x.ndim >= 2 and (not x.dtype.is_floating_point or x.ndim == 3):
        out[1] = "seq"
    return out


def widen_for_dynamic(args: Sequence[Any], kwargs: dict[str, Any] | None,
                      dynamic: str | Sequence[str] | None) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Repeat inputs whose dynamic axis has size 1 to size 2.

    ``torch.export`` specialises a size-1 dimension to the constant 1, so a
    batch-1 example cannot give a dynamic batch axis.
    """
    axes = parse_dynamic(dynamic)

    def widen(x: Any) -> Any:
        for axis in axes_of_input(x, axes):
            if x.shape[axis] == 1:
                reps = [1] * x.ndim
                reps[axis] = 2
                x = x.repeat(*reps)
        return x

    args2, kwargs2 = pytree.tree_map(widen, (tuple(args), dict(kwargs or {})))
    return tuple(args2), dict(kwargs2)


def dynamic_shapes_for(module: torch.nn.Module, args: Sequence[Any], kwargs: dict[str, Any] | None,
                       dynamic: str | Sequence[str] | None) -> Any:
    """The ``dynamic_shapes`` for ``torch.export`` / :func:`graphopt.optimize` that ``dynamic`` names.

    Widen size-1 axes first (:func:`widen_for_dynamic`). Raises ``ValueError``
    when an asked axis fits no input.
    """
    axes = parse_dynamic(dynamic)
    if not axes:
        return None
    # Dim.AUTO: export infers each axis' range (a model with a position table of
    # 1024 gets seq <= 1024) instead of failing on it; that an axis stayed
    # dynamic at all is checked on the exported ONNX inputs.
    dims = {name: torch.export.Dim.AUTO for name in axes}
    collection = torch.export.ShapesCollection()
    used: set[str] = set()
    for leaf in pytree.tree_leaves((tuple(args), dict(kwargs or {}))):
        spec = axes_of_input(leaf, axes)
        if spec:
            collection[leaf] = {axis: dims[name] for axis, name in spec.items()}
            used.update(spec.values())
    missing = [a for a in axes if a not in used]
    if missing:
        raise ValueError(f"no input has a {missing[0]!r} axis (seq: axis 1 of integer inputs or of "
                         f"(batch, seq, hidden) float inputs); drop it from dynamic")
    return collection.dynamic_shapes(module, tuple(args), dict(kwargs or {}))


# --------------------------------------------------------------------------- export

def _resolve(target: Any, example_inputs: Any, example_kwargs: dict[str, Any] | None):
    """(module, args, kwargs, baseline program or module, report or None) for what was given."""
    from graphopt.optimize import OptimizeResult

    if isinstance(target, OptimizeResult):
        args = target.example_args if example_inputs is None else example_inputs
        kwargs = target.example_kwargs if example_inputs is None and example_kwargs is None else example_kwargs
        baseline = target.captured.exported_program
        return target.module, args, kwargs, baseline, target.report
    if isinstance(target, torch.export.ExportedProgram):
        if example_inputs is None and target.example_inputs:
            example_inputs, example_kwargs = target.example_inputs
        target = target.module()
    if not isinstance(target, torch.nn.Module):
        raise TypeError(f"export_onnx expects an OptimizeResult, an nn.Module or an ExportedProgram, "
                        f"got {type(target).__name__}")
    if example_inputs is None:
        raise ValueError("export_onnx needs example_inputs for an nn.Module (the inputs it is called with)")
    return target, example_inputs, example_kwargs, target, None


def _as_tuple(x: Any) -> tuple[Any, ...]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _inference(module: Any) -> Any:
    """Eval mode for a user's module; exported GraphModules have no train/eval switch."""
    from graphopt.capture import eval_mode

    if isinstance(module, torch.nn.Module) and not isinstance(module, torch.fx.GraphModule):
        return eval_mode(module)
    return contextlib.nullcontext()


def _torch_export(module: torch.nn.Module, args: tuple, kwargs: dict, dynamic_shapes: Any,
                  from_result: bool) -> torch.export.ExportedProgram:
    try:
        with _inference(module), torch.no_grad():
            return torch.export.export(module, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if dynamic_shapes is not None and ("specialized" in str(exc) or "Constraints violated" in str(exc)):
            hint = ("the graph was captured with static shapes; optimize it with "
                    "dynamic_shapes=graphopt.onnx_io.dynamic_shapes_for(model, args, kwargs, dynamic) "
                    "(graphopt convert --dynamic does this)" if from_result else
                    "the model fixes that size in its code; export without it in dynamic")
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
    from graphopt import ir

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
    import onnxscript.optimizer

    try:
        with contextlib.redirect_stdout(None):
            program = torch.onnx.export(ep, (), dynamo=True, opset_version=opset,
                                        custom_translation_table=table or None, optimize=False, verbose=False)
        onnxscript.optimizer.optimize(program.model)
        return program
    except Exception as exc:
        ops = _untranslatable_ops(exc)
        if ops:
            where = "; ".join(f"{op}{_where_used(ep, op)}" for op in ops)
            raise OnnxExportError(
                f"cannot convert to ONNX: no ONNX translation for operator {where}. Add one to the "
                f"operator's ONNX_TRANSLATIONS (graphopt/ops/, see docs/convert.md) or leave out the pass "
                f"that introduced it (--passes)", ops) from exc
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise OnnxExportError(f"torch.onnx could not translate the program: {first}") from exc


def _static_size(dim: Any) -> int | None:
    """A dimension's size when it is known: an int, or a symbolic dim the exporter named ``'2'``.

    (torch.onnx names a size that ``Dim.AUTO`` specialised by its value, as a symbol.)
    """
    if isinstance(dim, int):
        return dim
    value = getattr(dim, "value", None)
    return int(value) if isinstance(value, str) and value.isdigit() else None


def _rename_dims(model: Any, mapping: dict[str, str]) -> None:
    """In every value's shape: symbolic dims (torch's ``s0``...) -> the axis names; ``'2'`` -> 2."""
    import onnx_ir as ir

    def fix(value: Any) -> None:
        shape = value.shape
        if shape is None:
            return
        dims = []
        for d in shape:
            size = _static_size(d)
            if size is not None and not isinstance(d, int):
                d = size
            elif isinstance(d, ir.SymbolicDim) and d.value in mapping:
                d = ir.SymbolicDim(mapping[d.value])
            dims.append(d)
        if any(a is not b for a, b in zip(dims, shape)):
            value.shape = ir.Shape(dims)

    for v in list(model.graph.inputs) + list(model.graph.outputs):
        fix(v)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for v in node.outputs:
            fix(v)


#: relative L2 floor when the graph computes below float32 (its outputs may still be float32)
REDUCED_PRECISION_TOLERANCE = {"bfloat16": 2e-2, "float16": 1e-2, "int8": 1e-2, "float8": 2e-2}


def compute_precision(ep: torch.export.ExportedProgram) -> str | None:
    """The lowest precision the graph computes in (``"float16"``, ``"int8"``, ...), None for float32 and up.

    torch and onnxruntime round reduced-precision arithmetic differently, so
    the check compares such a graph's float outputs with the tolerance of its
    compute precision (:data:`REDUCED_PRECISION_TOLERANCE`), not of the output dtype.
    """
    found: set[str] = set()
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        target = str(node.target)
        if target.startswith("graphopt."):
            found.update(p for p in ("int8", "float8") if p in target or p.replace("float", "fp") in target)
        val = node.meta.get("val")
        for v in val if isinstance(val, (tuple, list)) else (val,):
            if isinstance(v, torch.Tensor):
                if v.dtype in (torch.float16, torch.bfloat16):
                    found.add(str(v.dtype).replace("torch.", ""))
                elif v.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                    found.add("float8")
    if not found:
        return None
    return max(found, key=lambda p: REDUCED_PRECISION_TOLERANCE[p])


def _contains_sdpa(ep: torch.export.ExportedProgram) -> bool:
    targets = {torch.ops.aten.scaled_dot_product_attention.default}
    return any(n.op == "call_function" and n.target in targets for n in ep.graph.nodes)


def _weight_bytes(model: Any) -> int:
    return sum(int(v.const_value.nbytes) for v in model.graph.initializers.values() if v.const_value is not None)


def _value_info(value: Any) -> dict[str, Any]:
    shape = [d if isinstance(d, int) else str(d.value if hasattr(d, "value") else d) for d in (value.shape or [])]
    return {"name": value.name, "dtype": str(value.dtype).rsplit(".", 1)[-1] if value.dtype else "?", "shape": shape}


def _validate(path: str) -> None:
    """onnx.checker and strict ONNX shape inference on the saved file (path-based: works for >2 GB)."""
    import onnx

    try:
        onnx.checker.check_model(path)
    except Exception as exc:
        raise OnnxExportError(f"the exported model fails onnx.checker: {str(exc).splitlines()[0]}") from exc
    inferred = path + ".inferred"
    try:
        onnx.shape_inference.infer_shapes_path(path, inferred, check_type=True, strict_mode=True)
    except Exception as exc:
        raise OnnxExportError(f"ONNX shape inference fails on the exported model: {str(exc).splitlines()[0]}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(inferred)


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
    ``dynamic``: ``"batch"``, ``"seq"`` or ``"batch,seq"`` (see :func:`axes_of_input`).
    ``opset``: the ai.onnx opset; default: 23 when the graph holds
    ``scaled_dot_product_attention`` (exported as the fused ``Attention`` op),
    otherwise torch.onnx's default.
    ``target``: ``"onnxruntime"`` applies :mod:`graphopt.onnx_rewrites` (may use
    onnxruntime contrib ops); ``"standard"`` keeps to ai.onnx ops.
    ``check``: run onnxruntime against torch; :class:`OnnxMismatchError` on a mismatch.
    ``compare_speed``: time the plain ``torch.onnx.export`` of the original model
    against this export (for an OptimizeResult also stored in
    ``report.extra["onnx"]["speed"]``).

    Raises :class:`OnnxExportError` when the model cannot be exported (the
    message names an operator without translation), :class:`OnnxMismatchError`
    when onnxruntime disagrees with torch. Either way nothing is left at ``path``.
    """
    from graphopt import ops

    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    axes = parse_dynamic(dynamic)
    path = os.fspath(path)
    module, args, kwargs, baseline, report = _resolve(result_or_module, example_inputs, example_kwargs)
    args, kwargs = _as_tuple(args), dict(kwargs or {})
    info = OnnxExport(path=path, target=target)
    timer = time.perf_counter()
    if axes:
        args, kwargs = widen_for_dynamic(args, kwargs, axes)
    try:
        shapes = dynamic_shapes_for(module, args, kwargs, axes)
    except ValueError as exc:
        raise OnnxExportError(str(exc)) from exc
    ep = _torch_export(module, args, kwargs, shapes, from_result=report is not None)
    _note_unportable_int8(module, info)
    if opset is None and _contains_sdpa(ep):
        opset = ATTENTION_OPSET
        info.notes.append(f"opset {opset}: scaled_dot_product_attention exports as the Attention op")
    program = _translate(ep, opset, ops.onnx_translations())
    model = program.model
    info.opset = int(model.opset_imports.get("", 0))
    info.seconds["export"] = time.perf_counter() - timer

    # the flattened tensor inputs, in the ONNX graph's input order
    from torch.fx._pytree import tree_flatten_spec

    leaves = list(tree_flatten_spec((args, kwargs), ep.call_spec.in_spec))
    tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
    graph_inputs = list(model.graph.inputs)
    if len(graph_inputs) != len(tensors):
        raise OnnxExportError(f"the ONNX model has {len(graph_inputs)} inputs but the example has "
                              f"{len(tensors)} tensors; pass tensors only, or report this as a bug")
    rename: dict[str, str] = {}
    for value, x in zip(graph_inputs, tensors):
        for axis, name in axes_of_input(x, axes).items():
            dim = value.shape[axis] if value.shape is not None else None
            if dim is None or _static_size(dim) is not None or getattr(dim, "value", None) is None:
                hint = (" -- the graph was captured with static shapes; optimize it with dynamic_shapes="
                        "graphopt.onnx_io.dynamic_shapes_for(model, args, kwargs, dynamic) (graphopt convert "
                        "--dynamic does this)" if report is not None else " -- the model's code fixes that size")
                raise OnnxExportError(f"asked for a dynamic {name!r} axis but the export fixed input "
                                      f"{value.name!r} axis {axis} to {_static_size(dim)}{hint}")
            rename[dim.value] = name
            info.dynamic_axes.setdefault(value.name, {})[axis] = name
    _rename_dims(model, rename)

    if target == "onnxruntime":
        timer = time.perf_counter()
        widened = _compute_bf16_in_float32(model)  # first: a float32 Attention can then become GroupQueryAttention
        info.rewrites, info.declined = _apply_rewrites(model)
        if widened:
            info.rewrites["bf16_in_float32"] = widened
            info.notes.append(f"{widened} bf16 nodes computed in float32 and rounded to bf16 after (onnxruntime's "
                              "CPU provider has no bf16 arithmetic kernels; the bf16 weights stay bf16 in the file)")
        info.seconds["rewrite"] = time.perf_counter() - timer
    info.op_counts = dict(Counter((f"{n.domain}." if n.domain else "") + n.op_type for n in model.graph))
    info.inputs = [_value_info(v) for v in model.graph.inputs]
    info.outputs = [_value_info(v) for v in model.graph.outputs]

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.partial-", dir=directory)
    try:
        staged = os.path.join(scratch, os.path.basename(path))
        _save(model, staged)
        timer = time.perf_counter()
        _validate(staged)
        info.seconds["validate"] = time.perf_counter() - timer
        if check:
            timer = time.perf_counter()
            spec_module = ep.module()
            precision = compute_precision(ep)
            reference, against, floor = _check_reference(precision, module, baseline, _budget_of(result_or_module))
            info.checked_against = against
            if precision:
                info.notes.append(f"the graph computes in {precision}: float outputs checked against {against} "
                                  f"at relative L2 {floor:.0e}" + (" (the error budget the precision pass held)"
                                                                   if reference is not module else ""))
            numerics, shapes_checked, tolerance = check_onnx(
                staged, reference, args, kwargs, dynamic=axes, n_random_inputs=n_random_inputs,
                in_spec=ep.call_spec.in_spec, spec_module=spec_module, tolerance_floor=floor)
            info.numerics, info.checked_shapes, info.tolerance = numerics, shapes_checked, tolerance
            info.seconds["check"] = time.perf_counter() - timer
            if not numerics.ok:
                raise OnnxMismatchError(f"onnxruntime's outputs differ from {against}: {numerics.reason} "
                                        f"({numerics.summary()}); nothing was written", numerics, info)
        if compare_speed:
            timer = time.perf_counter()
            info.speed = _compare_speed(baseline, args, kwargs, staged, tensors, scratch, speed_runs,
                                        session_threads)
            info.seconds["speed"] = time.perf_counter() - timer
        info.files = _move_into_place(scratch, directory)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if report is not None:
        report.extra["onnx"] = info.to_dict()
    log.info("exported %s", info.summary())
    return info


def _budget_of(result_or_module: Any) -> Any:
    """The error budget an OptimizeResult's passes were held to (None for a plain module)."""
    context = getattr(result_or_module, "context", None)
    return getattr(context, "error_budget", None)


def _check_reference(precision: str | None, module: Any, baseline: Any, budget: Any) -> tuple[Any, str, float | None]:
    """What onnxruntime is compared with: ``(reference, its name, relative L2 floor)``.

    A float32 graph: torch's graph (``module``), at each dtype's tolerance. A
    graph computing in reduced precision: torch's graph at the precision's
    tolerance (:data:`REDUCED_PRECISION_TOLERANCE`); but when it is the result
    of ``optimize(..., precision=...)`` (an error budget and the captured
    original are known), the original model within that budget -- the promise
    the precision pass made. Two implementations of one int8 graph round
    differently, and through many layers they drift apart by up to the
    quantization error itself (BERT-base, 12 int8 layers: onnxruntime vs torch
    1.4e-2 while each is 1.5e-2 from fp32, 2.7e-4 after one layer), so only the
    comparison with the original has a tolerance that means something.
    """
    if precision is None:
        return module, "torch's graph", None
    floor = REDUCED_PRECISION_TOLERANCE[precision]
    if budget is None or baseline is None:
        return module, "torch's graph", floor
    original = baseline.module() if isinstance(baseline, torch.export.ExportedProgram) else baseline
    return original, "the original model", float(budget.rel_l2)


def _note_unportable_int8(module: Any, info: OnnxExport) -> None:
    """Warn when int8 weights are plain (VNNI CPUs): MatMulInteger on AVX2 CPUs would saturate them."""
    from graphopt.precision.quantize import weights_not_pair_safe

    plain = weights_not_pair_safe(module)
    if plain:
        note = (f"{len(plain)} int8 linears have plain (not pair-safe) weights: exact in onnxruntime on CPUs "
                "with VNNI, but MatMulInteger on AVX2 CPUs without VNNI saturates them; optimize with "
                "precision_int8_pair_safe=True for a file that is exact everywhere (graphopt convert does)")
        info.notes.append(note)
        log.warning(note)


def _compute_bf16_in_float32(model: Any) -> int:
    from graphopt.onnx_bf16 import compute_bf16_in_float32

    return compute_bf16_in_float32(model)


def _apply_rewrites(model: Any) -> tuple[dict[str, int], list[Declined]]:
    from graphopt.onnx_rewrites import apply_onnxruntime_rewrites

    return apply_onnxruntime_rewrites(model)


def _save(model: Any, path: str) -> None:
    import onnx_ir as ir

    if _weight_bytes(model) > EXTERNAL_DATA_THRESHOLD:
        ir.save(model, path, external_data=os.path.basename(path) + ".data")
    else:
        ir.save(model, path)


def _move_into_place(scratch: str, directory: str) -> list[str]:
    moved = []
    for name in sorted(os.listdir(scratch)):
        dest = os.path.join(directory, name)
        os.replace(os.path.join(scratch, name), dest)
        moved.append(dest)
    return moved


# --------------------------------------------------------------------------- check

def _tolerance(dtype: torch.dtype) -> float:
    return ONNX_REL_L2_TOLERANCE.get(dtype, 1e-2)


def _resized(spec: InputSpec | None, axes: dict[int, str]) -> InputSpec | None:
    """The same input at another batch size / sequence length (batch + 1; seq halved, or + 1 when short)."""
    if spec is None or spec.kind == "constant" or not axes:
        return spec
    shape = list(spec.shape)
    for axis, name in axes.items():
        size = shape[axis]
        shape[axis] = size + 1 if name == "batch" or size < 4 else size // 2
    return dataclasses.replace(spec, shape=tuple(shape))


def onnx_input_sets(args: tuple, kwargs: dict, spec_module: Any, dynamic: Sequence[str],
                    n_random_inputs: int, seed: int = 0) -> list[tuple[tuple, dict]]:
    """The example, ``n_random_inputs`` fresh sets like it and, with dynamic axes, one set at other sizes."""
    from graphopt.verify import random_inputs

    leaves, treespec = pytree.tree_flatten((args, kwargs))
    specs = input_specs(spec_module, leaves)
    sets: list[tuple[tuple, dict]] = [(args, kwargs)]
    for k in range(n_random_inputs):
        a, kw = pytree.tree_unflatten(random_inputs(specs, leaves, seed + 101 + k), treespec)
        sets.append((tuple(a), dict(kw)))
    if dynamic:
        resized = [_resized(s, axes_of_input(x, dynamic)) for s, x in zip(specs, leaves)]
        a, kw = pytree.tree_unflatten(random_inputs(resized, leaves, seed + 201), treespec)
        sets.append((tuple(a), dict(kw)))
    return sets


def check_onnx(
    onnx_path: str | os.PathLike[str],
    reference: Any,
    args: Sequence[Any],
    kwargs: dict[str, Any] | None = None,
    *,
    dynamic: str | Sequence[str] | None = None,
    n_random_inputs: int = 2,
    in_spec: Any = None,
    spec_module: Any = None,
    tolerance_floor: float | None = None,
    providers: Sequence[str] = ("CPUExecutionProvider",),
) -> tuple[Numerics, list[list[list[int]]], dict[str, float]]:
    """Run the ONNX file in onnxruntime and compare with ``reference(*args, **kwargs)`` (torch).

    Input sets: the example, ``n_random_inputs`` fresh ones of the same spec
    (token ids inside the vocabulary, masks 0/1; :mod:`graphopt.verify`) and,
    with ``dynamic`` axes, one at another batch size / sequence length.
    ``in_spec``: the exported program's input spec (orders the ONNX inputs);
    ``spec_module``: a GraphModule whose placeholders follow the inputs (finds
    vocabulary sizes). ``tolerance_floor``: the least tolerance for float
    outputs (a graph computing in reduced precision, :func:`compute_precision`).
    Returns (numerics, input shapes of each set, tolerance per dtype).
    """
    from graphopt.onnx_speed import make_session, session_options

    args, kwargs = _as_tuple(args), dict(kwargs or {})
    axes = parse_dynamic(dynamic)
    try:
        session = make_session(onnx_path, session_options(), providers)
    except Exception as exc:
        raise OnnxExportError(
            f"the ONNX file is valid but onnxruntime ({', '.join(providers)}) cannot load it to check it: "
            f"{str(exc).splitlines()[0]}. onnxruntime's CPU provider has few bfloat16 kernels: export a bf16 "
            f"graph with target='onnxruntime' (which computes bf16 nodes in float32), or choose another "
            f"precision") from exc
    names = [i.name for i in session.get_inputs()]
    per_input, shapes, tolerance = [], [], {}
    for a, kw in onnx_input_sets(args, kwargs, spec_module, axes, n_random_inputs):
        if in_spec is not None:
            from torch.fx._pytree import tree_flatten_spec

            leaves = list(tree_flatten_spec((a, kw), in_spec))
        else:
            leaves = pytree.tree_leaves((a, kw))
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        shapes.append([list(x.shape) for x in tensors])
        with _inference(reference), torch.no_grad():
            expected = [x for x in pytree.tree_leaves(reference(*a, **kw)) if isinstance(x, torch.Tensor)]
        try:
            got = session.run(None, dict(zip(names, [_to_numpy(x) for x in tensors])))
        except Exception as exc:
            raise OnnxExportError(f"onnxruntime could not run the exported model on inputs of shapes "
                                  f"{shapes[-1]}: {str(exc).splitlines()[0]}") from exc
        got_t = [torch.from_numpy(g) if hasattr(g, "dtype") else torch.tensor(g) for g in got]
        if len(got_t) != len(expected):
            per_input.append(compare_outputs(expected, got_t))  # reports the structure change
            continue
        errors = []
        for i, (r, c) in enumerate(zip(expected, got_t)):
            tol = _tolerance(r.dtype)
            if tolerance_floor is not None and r.dtype.is_floating_point:
                tol = max(tol, tolerance_floor)
            tolerance[str(r.dtype).replace("torch.", "")] = tol
            err = compare_outputs([r], [c], ErrorBudget(rel_l2=tol))[0]
            errors.append(dataclasses.replace(err, index=i, reason=err.reason.replace("output 0", f"output {i}")))
        per_input.append(errors)
    return summarize(per_input), shapes, tolerance


def _to_numpy(x: torch.Tensor) -> Any:
    if x.dtype == torch.bfloat16:
        raise OnnxExportError("bfloat16 inputs cannot be fed to onnxruntime from numpy; give float32 inputs")
    return x.detach().cpu().contiguous().numpy()


# --------------------------------------------------------------------------- speed

def export_plain(model_or_program: Any, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None,
                 path: str | os.PathLike[str] | None = None, opset: int | None = None) -> Any:
    """The plain ``torch.onnx.export`` (dynamo) of a model, with torch.onnx's defaults; saved when ``path``."""
    is_module = isinstance(model_or_program, torch.nn.Module)
    with _inference(model_or_program), torch.no_grad(), contextlib.redirect_stdout(None):
        program = torch.onnx.export(model_or_program, _as_tuple(args) if is_module else (),
                                    kwargs=dict(kwargs or {}) if is_module else None, dynamo=True,
                                    opset_version=opset, verbose=False)
    if path is not None:
        _save(program.model, os.fspath(path))
    return program


def _compare_speed(baseline: Any, args: tuple, kwargs: dict, graphopt_path: str, tensors: list[torch.Tensor],
                   scratch: str, runs: int, threads: int | None) -> dict[str, Any]:
    from graphopt.onnx_speed import compare_latency, describe_session_options, session_options

    plain_dir = tempfile.mkdtemp(prefix="plain-", dir=scratch)
    plain_path = os.path.join(plain_dir, "plain.onnx")
    export_plain(baseline, args, kwargs, plain_path)
    so = session_options(threads)
    feed = [_to_numpy(x) for x in tensors]
    stats = compare_latency({"plain": plain_path, "graphopt": graphopt_path}, feed, runs=runs, so=so)
    shutil.rmtree(plain_dir, ignore_errors=True)
    plain, ours = stats["plain"], stats["graphopt"]
    return {
        "plain": plain.to_dict(),
        "graphopt": ours.to_dict(),
        "speedup": round(plain.median_ms / ours.median_ms, 3) if ours.median_ms > 0 else None,
        "inputs": [list(x.shape) for x in tensors],
        "session_options": describe_session_options(so),
        "method": "one process, same session options, runs interleaved; plain = torch.onnx.export of the "
                  "original model with its defaults",
    }
