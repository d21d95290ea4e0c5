"""Dynamic ``batch`` / ``seq`` axes: which input axes they are, the ``dynamic_shapes`` that make them, their names.

An :class:`~graphopt.optimize.OptimizeResult` was captured with the shapes it
was given, and its passes may rely on them, so graphopt does *not* re-export
the original model (that would drop the optimizations): optimize with
``dynamic_shapes=dynamic_shapes_for(model, args, kwargs, "batch,seq")`` (what
``graphopt convert --dynamic`` does) and export the result with the same
``dynamic=``. The axis helpers (``parse_dynamic``, ``axes_of_input``,
``widen_for_dynamic``) live in :mod:`graphopt.model_inputs`, which
:func:`graphopt.optimize` uses for ``dynamic=``; they are re-exported here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

from graphopt.model_inputs import DYNAMIC_AXES, axes_of_input, parse_dynamic, widen_for_dynamic
from graphopt.onnx.result import OnnxExportError

__all__ = ["DYNAMIC_AXES", "axes_of_input", "dynamic_shapes_for", "name_dynamic_axes", "parse_dynamic",
           "static_size", "widen_for_dynamic"]

#: what to do when a captured result cannot take the asked dynamic axes
STATIC_CAPTURE_HINT = ("the graph was captured with static shapes; optimize it with dynamic_shapes="
                       "graphopt.onnx.dynamic_shapes_for(model, args, kwargs, dynamic) (graphopt convert "
                       "--dynamic does this)")


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


def static_size(dim: Any) -> int | None:
    """A dimension's size when it is known: an int, or a symbolic dim the exporter named ``'2'``.

    (torch.onnx names a size that ``Dim.AUTO`` specialised by its value, as a symbol.)
    """
    if isinstance(dim, int):
        return dim
    value = getattr(dim, "value", None)
    return int(value) if isinstance(value, str) and value.isdigit() else None


def name_dynamic_axes(model: Any, tensors: Sequence[torch.Tensor], axes: Sequence[str],
                      from_result: bool) -> dict[str, dict[int, str]]:
    """Name the exported model's dynamic input axes ``batch`` / ``seq`` throughout its shapes.

    ``tensors``: the example's tensor inputs in the ONNX graph's input order.
    Returns ``{input name: {axis: axis name}}``; raises :class:`OnnxExportError`
    when an asked axis came out static (``from_result``: the hint for a
    statically captured :class:`~graphopt.optimize.OptimizeResult`).
    """
    graph_inputs = list(model.graph.inputs)
    if len(graph_inputs) != len(tensors):
        raise OnnxExportError(f"the ONNX model has {len(graph_inputs)} inputs but the example has "
                              f"{len(tensors)} tensors; pass tensors only, or report this as a bug")
    rename: dict[str, str] = {}
    named: dict[str, dict[int, str]] = {}
    for value, x in zip(graph_inputs, tensors):
        for axis, name in axes_of_input(x, axes).items():
            dim = value.shape[axis] if value.shape is not None else None
            if dim is None or static_size(dim) is not None or getattr(dim, "value", None) is None:
                hint = STATIC_CAPTURE_HINT if from_result else "the model's code fixes that size"
                raise OnnxExportError(f"asked for a dynamic {name!r} axis but the export fixed input "
                                      f"{value.name!r} axis {axis} to {static_size(dim)} -- {hint}")
            rename[dim.value] = name
            named.setdefault(value.name, {})[axis] = name
    _rename_dims(model, rename)
    return named


def _rename_dims(model: Any, mapping: dict[str, str]) -> None:
    """In every value's shape: symbolic dims (torch's ``s0``...) -> the axis names; ``'2'`` -> 2."""
    import onnx_ir as ir  # lazy: keeps `import graphopt` (and the CLI's start-up) free of onnx_ir

    def fix(value: Any) -> None:
        shape = value.shape
        if shape is None:
            return
        dims = []
        for d in shape:
            size = static_size(d)
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
