"""The onnxruntime target's rewrites, run in order by onnx_ir's ``PassManager``.

1. :class:`~graphopt.onnx.bf16.ComputeBf16InFloat32` -- bf16 arithmetic in
   float32 between casts (onnxruntime's CPU provider has no bf16 kernels); first,
   so that a float32 ``Attention`` can then become GroupQueryAttention;
2. :class:`~graphopt.onnx.gqa.GroupQueryAttentionPass` -- causal ``Attention``
   -> ``com.microsoft.GroupQueryAttention``;
3. :class:`~graphopt.onnx.int8.MatMulIntegerToFloatPass` -- an int8 linear's
   dequantization folded into ``com.microsoft.MatMulIntegerToFloat`` (on the
   graph the optimizer left after 2).

A new onnxruntime rewrite is one more pass in :func:`onnxruntime_passes`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import onnx_ir as ir

from graphopt.onnx.bf16 import ComputeBf16InFloat32
from graphopt.onnx.gqa import GroupQueryAttentionPass
from graphopt.onnx.int8 import MatMulIntegerToFloatPass
from graphopt.pattern import Declined

log = logging.getLogger(__name__)

#: passes whose count is reported even when zero (bf16's only when it rewrote something)
ALWAYS_COUNTED = ("causal_attention_to_gqa", "int8_matmul_to_float")


@dataclass
class OnnxRewrites:
    """What the onnxruntime rewrites did: rewrites per pass name, declined sites with reasons."""

    counts: dict[str, int] = field(default_factory=dict)
    declined: list[Declined] = field(default_factory=list)


def onnxruntime_passes() -> list[ComputeBf16InFloat32 | GroupQueryAttentionPass | MatMulIntegerToFloatPass]:
    """The onnxruntime target's passes, fresh, in the order they run."""
    return [ComputeBf16InFloat32(), GroupQueryAttentionPass(), MatMulIntegerToFloatPass()]


def rewrite_for_onnxruntime(model: ir.Model) -> OnnxRewrites:
    """Apply :func:`onnxruntime_passes` to ``model`` in place; their counts and declines."""
    passes = onnxruntime_passes()
    ir.passes.PassManager(passes, steps=1)(model)
    counts = {p.name: p.rewritten for p in passes if p.name in ALWAYS_COUNTED or p.rewritten}
    # the report's order: the onnxruntime fusions, then the bf16 rewrite
    order = [*ALWAYS_COUNTED, *(name for name in counts if name not in ALWAYS_COUNTED)]
    outcome = OnnxRewrites({name: counts[name] for name in order if name in counts},
                           [d for p in passes for d in p.declined])
    log.info("onnxruntime rewrites: %s (%d declined)", outcome.counts, len(outcome.declined))
    return outcome

