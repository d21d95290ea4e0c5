"""Checking an exported ONNX file: onnx.checker, shape inference, and onnxruntime against torch.

:func:`validate` runs ``onnx.checker`` and strict ONNX shape inference on the
saved file. :func:`check_onnx` runs it in onnxruntime on the example inputs,
on fresh random inputs of the same spec and -- with dynamic axes -- on inputs
of another batch size / sequence length, and compares every output with
torch's (relative L2 per output, tolerance by dtype:
:data:`ONNX_REL_L2_TOLERANCE`; a graph computing in reduced precision is held
to :data:`REDUCED_PRECISION_TOLERANCE`, see :func:`check_reference`). A
mismatch is an :class:`OnnxMismatchError` for :func:`~graphopt.onnx.export_onnx`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch.fx._pytree import tree_flatten_spec
from torch.utils import _pytree as pytree

from graphopt.onnx.dynamic import axes_of_input, parse_dynamic
from graphopt.onnx.result import OnnxExport, OnnxExportError
from graphopt.onnx.speed import make_session, session_options
from graphopt.onnx.torch_run import as_tuple, inference, to_numpy
from graphopt.user_state import TensorSnapshot
from graphopt.fresh_inputs import InputSpec, input_specs, random_inputs
from graphopt.verify import ErrorBudget, Numerics, compare_outputs, summarize

#: relative L2 allowed between onnxruntime's and torch's outputs, by output dtype
ONNX_REL_L2_TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-6,
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 2e-2,
}
#: relative L2 floor when the graph computes below float32 (its outputs may still be float32)
REDUCED_PRECISION_TOLERANCE = {"bfloat16": 2e-2, "float16": 1e-2, "int8": 1e-2, "float8": 2e-2}


class OnnxMismatchError(RuntimeError):
    """onnxruntime's outputs differ from torch's beyond the tolerance (never a warning)."""

    def __init__(self, message: str, numerics: Numerics, export: OnnxExport) -> None:
        super().__init__(message)
        self.numerics = numerics
        self.export = export


def validate(path: str) -> None:
    """onnx.checker and strict ONNX shape inference on the saved file (path-based: works for >2 GB)."""
    import onnx  # lazy: keeps `import graphopt` (and the CLI's start-up) free of onnx

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
        if target.startswith("graphopt.") and "weight_only" in target:
            found.add("bfloat16")  # weight-only ops compute in bf16 (graphopt.ops.weight_only_linear)
        elif target.startswith("graphopt."):
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


def check_reference(precision: str | None, module: Any, baseline: Any, budget: Any) -> tuple[Any, str, float | None]:
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
    args, kwargs = as_tuple(args), dict(kwargs or {})
    axes = parse_dynamic(dynamic)
    session = _session(onnx_path, providers)
    names = [i.name for i in session.get_inputs()]
    per_input, shapes, tolerance = [], [], {}
    for a, kw in onnx_input_sets(args, kwargs, spec_module, axes, n_random_inputs):
        leaves = list(tree_flatten_spec((a, kw), in_spec)) if in_spec is not None else pytree.tree_leaves((a, kw))
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        shapes.append([list(x.shape) for x in tensors])
        feed = dict(zip(names, [to_numpy(x).copy() for x in tensors]))  # before a forward can mutate them
        state = TensorSnapshot(reference, (a, kw))  # each set starts from the user's buffers and inputs
        with inference(reference), torch.no_grad():
            expected = [x for x in pytree.tree_leaves(reference(*a, **kw)) if isinstance(x, torch.Tensor)]
        state.restore()
        try:
            got = session.run(None, feed)
        except Exception as exc:
            raise OnnxExportError(f"onnxruntime could not run the exported model on inputs of shapes "
                                  f"{shapes[-1]}: {str(exc).splitlines()[0]}") from exc
        got_t = [torch.from_numpy(g) if hasattr(g, "dtype") else torch.tensor(g) for g in got]
        per_input.append(_compare(expected, got_t, tolerance_floor, tolerance))
    return summarize(per_input), shapes, tolerance


def _session(onnx_path: str | os.PathLike[str], providers: Sequence[str]) -> Any:
    try:
        return make_session(onnx_path, session_options(), providers)
    except Exception as exc:
        raise OnnxExportError(
            f"the ONNX file is valid but onnxruntime ({', '.join(providers)}) cannot load it to check it: "
            f"{str(exc).splitlines()[0]}. onnxruntime's CPU provider has few bfloat16 kernels: export a bf16 "
            f"graph with target='onnxruntime' (which computes bf16 nodes in float32), or choose another "
            f"precision") from exc


def _compare(expected: list[torch.Tensor], got: list[torch.Tensor], tolerance_floor: float | None,
             tolerance: dict[str, float]) -> list[Any]:
    """Each output's error at its dtype's tolerance (noted in ``tolerance``); a structure change as one error."""
    if len(got) != len(expected):
        return compare_outputs(expected, got)  # reports the structure change
    errors = []
    for i, (r, c) in enumerate(zip(expected, got)):
        tol = _tolerance(r.dtype)
        if tolerance_floor is not None and r.dtype.is_floating_point:
            tol = max(tol, tolerance_floor)
        tolerance[str(r.dtype).replace("torch.", "")] = tol
        err = compare_outputs([r], [c], ErrorBudget(rel_l2=tol))[0]
        errors.append(dataclasses.replace(err, index=i, reason=err.reason.replace("output 0", f"output {i}")))
    return errors
