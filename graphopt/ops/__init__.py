"""graphopt's custom operators (``torch.ops.graphopt.*``).

Each operator is a ``torch.library.custom_op`` in a module of its own with a
reference implementation, a fake kernel (so graphs stay exportable and
``.pt2`` files reload) and, at the end of the module, its ``DECLARATIONS``
(:class:`graphopt.ops.declare.OpDeclaration`: cost, working memory, ONNX
translation). The modules are listed here explicitly (:data:`OP_MODULES`);
:func:`declaration_for`, :func:`workspace_bytes` and :func:`onnx_translations`
read their declarations. Nothing registers itself at import time besides
torch.library's own operator registration.

Importing :mod:`graphopt` imports this package, so a saved ``.pt2`` that uses
graphopt operators loads after ``import graphopt``.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch.fx as fx

from graphopt.ops import (
    blocked_attention, blocked_matmul, chunked_ffn, chunked_lm_head, fp8_linear, int8_linear, weight_only_linear,
)
from graphopt.ops.declare import OpCall, OpDeclaration

__all__ = ["OP_MODULES", "declaration_for", "declarations", "onnx_translations", "workspace_bytes"]

#: operator modules, each with its ``DECLARATIONS`` (add new ones here)
OP_MODULES: list[ModuleType] = [int8_linear, fp8_linear, weight_only_linear, blocked_matmul, blocked_attention,
                                chunked_ffn, chunked_lm_head]


def declarations() -> dict[Any, OpDeclaration]:
    """{op overload: its declaration} for every graphopt operator."""
    return {d.op: d for module in OP_MODULES for d in getattr(module, "DECLARATIONS", ())}


def declaration_for(op: Any) -> OpDeclaration | None:
    """The declaration of operator overload ``op``, or None when graphopt does not declare it."""
    if getattr(op, "namespace", "aten") == "aten":  # the common case, without building the table
        return None
    return declarations().get(op)


def workspace_bytes(node: fx.Node) -> int:
    """Transient bytes ``node`` allocates while it runs beyond its inputs and output (0 for undeclared ops)."""
    declaration = declaration_for(node.target) if node.op == "call_function" else None
    if declaration is None or declaration.workspace is None:
        return 0
    return int(declaration.workspace(OpCall(node)))


def onnx_translations() -> dict[Any, Any]:
    """{op overload: onnxscript translation} for every graphopt operator."""
    return {op: d.onnx for op, d in declarations().items() if d.onnx is not None}
