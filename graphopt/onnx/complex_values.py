"""Complex-valued tensors: a construct torch.onnx cannot translate, found and named where it starts.

DeepSeek-V2's rotary embedding multiplies ``view_as_complex`` queries by
``torch.polar`` frequencies. ai.onnx's arithmetic operators take no complex
types, so torch.onnx fails on the first such node it meets, typically an
``unsqueeze`` whose error ("no ONNX translation for aten.unsqueeze") points
away from the cause. :func:`complex_origin` finds the first node whose value
is complex (``polar``, ``view_as_complex``, ...), so the export's error can
name it, with its source line. The construct is the model's own code, not a
graphopt rewrite (no pass makes complex values), so a plain
``torch.onnx.export`` of the original model fails the same way.
"""

from __future__ import annotations

import torch

from graphopt import ir


def is_complex_node(node: torch.fx.Node) -> bool:
    """Whether ``node``'s value (``meta["val"]``) is a complex tensor."""
    value = node.meta.get("val")
    return isinstance(value, torch.Tensor) and value.dtype.is_complex


def complex_origin(graph: torch.fx.Graph) -> torch.fx.Node | None:
    """The first operation making a complex tensor from a real one (the construct's start), or None.

    An operation (``view_as_complex``, ``polar``) is named before a complex constant or input: after
    constant folding the frequencies are a stored constant with no source line, the operation that
    turns the queries complex still has one.
    """
    starts = [n for n in graph.nodes if is_complex_node(n)
              and not all(is_complex_node(x) for x in n.all_input_nodes or [n])]
    others = [n for n in graph.nodes if is_complex_node(n) and n.op in ("get_attr", "placeholder")]
    return next(iter(starts + others), None)


def describe_complex_origin(node: torch.fx.Node) -> str:
    """``node polar (aten.polar.default -> complex64, from file.py:215: code)``."""
    line = ir.source_line(node)
    dtype = str(node.meta["val"].dtype).rsplit(".", 1)[-1]
    return f"node {node.name} ({node.target} -> {dtype}{', from ' + line if line else ''})"
