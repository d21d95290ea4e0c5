"""graphopt's custom operators (``torch.ops.graphopt.*``).

Each operator is a ``torch.library.custom_op`` in a module of its own with a
reference implementation, a fake kernel (so graphs stay exportable and
``.pt2`` files reload) and an ONNX translation. Each module defines
``ONNX_TRANSLATIONS: dict[OpOverload, onnxscript function]``; they are listed
here explicitly and gathered by :func:`onnx_translations`, which
:func:`graphopt.onnx.export_onnx` hands to ``torch.onnx.export(custom_translation_table=...)``.

Importing :mod:`graphopt` imports this package, so a saved ``.pt2`` that uses
graphopt operators loads after ``import graphopt``.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from graphopt.ops import blocked_attention, blocked_matmul, chunked_ffn, chunked_lm_head, fp8_linear, int8_linear

#: operator modules, imported for their registrations (add new ones here)
OP_MODULES: list[ModuleType] = [int8_linear, fp8_linear, blocked_matmul, blocked_attention, chunked_ffn,
                                chunked_lm_head]

from graphopt.ops import workspace  # noqa: E402,F401  (blocked operators' working memory and costs)


def onnx_translations() -> dict[Any, Any]:
    """{op overload: onnxscript translation} for every graphopt operator."""
    table: dict[Any, Any] = {}
    for module in OP_MODULES:
        table.update(getattr(module, "ONNX_TRANSLATIONS", {}))
    return table
