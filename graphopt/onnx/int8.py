"""int8 linears for onnxruntime: the int32 product dequantized inside onnxruntime's integer GEMM.

``graphopt::int8_linear`` exports (:func:`graphopt.ops.int8_linear.int8_linear_onnx`)
as standard ops: per-token quantization, ``MatMulInteger``, then the int32
product cast to float and scaled by the per-channel weight scales, by the
per-token activation scales, plus the bias. For onnxruntime the first two
steps of that epilogue fold into its contrib ``MatMulIntegerToFloat``, which
dequantizes while it writes the GEMM's output::

    Mul(Cast(MatMulInteger(q, W, zp), to=FLOAT), w_scale)        # w_scale: [N] constant
      -> com.microsoft.MatMulIntegerToFloat(q, W, 1.0, w_scale, zp)
    Mul(Cast(MatMulInteger(q, W), to=FLOAT), w_scale)            # per_token_s8: no zero point
      -> com.microsoft.MatMulIntegerToFloat(q, W, 1.0, w_scale)

The same numbers (an int32 product times a per-column scale, in float32;
tests/test_onnx_int8.py checks them equal), one pass over the output
instead of three. Measured on BERT-base in int8 (batch 8 x seq 128, 49
linears, onnxruntime 1.32, 2 threads, interleaved): 265-269 -> 251-260 ms
median, 3-5 %. The per-token scale and the bias stay separate ops (they vary
per row, which ``MatMulIntegerToFloat``'s ``a_scale`` -- a scalar or one per
column of A -- cannot express).

Not this pattern (nothing to report): the fbgemm schemes (``per_token_u8`` /
``u7``), whose float scale is the product of a per-tensor run-time scale and
the weight scales -- a run-time value, not a constant. Declined, with the
reason recorded: a constant weight scale that is not a float32 vector, a ``B``
that is not 2-D.

Written with onnxscript's rewriter (``pattern / check / rewrite``), as
:mod:`graphopt.onnx.gqa` is; :class:`MatMulIntegerToFloatPass` runs it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir

from graphopt.onnx.rules import CheckedRule, RulesPass


class DequantizeInIntegerMatMul(CheckedRule):
    """``Mul(Cast(MatMulInteger(q, W, zp)), w_scale)`` -> ``com.microsoft.MatMulIntegerToFloat``.

    ``with_zero_point=False`` matches the two-input ``MatMulInteger(q, W)`` of the
    symmetric int8 scheme (``per_token_s8``)."""

    def __init__(self, with_zero_point: bool = True) -> None:
        super().__init__(name="int8_matmul_to_float" + ("" if with_zero_point else "_no_zero_point"))
        self.with_zero_point = with_zero_point

    def pattern(self, op: Any, q: ir.Value, weight: ir.Value, scale: ir.Value, zero_point: Any = None) -> Any:
        product = op.MatMulInteger(q, weight, zero_point) if self.with_zero_point else op.MatMulInteger(q, weight)
        return op.Mul(op.Cast(product, to=ir.DataType.FLOAT), scale)

    def matches(self, context: Any, scale: ir.Value, **_: Any) -> bool:
        return scale.const_value is not None  # a run-time scale: an fbgemm scheme, another epilogue

    def decline_reason(self, context: Any, q: ir.Value, weight: ir.Value, scale: ir.Value,
                       zero_point: Any = None, **_: Any) -> str | None:
        if scale.shape is None or len(scale.shape) != 1:
            return "the weight scale is not a vector"
        if scale.dtype != ir.DataType.FLOAT:
            return "the weight scale is not float32"
        if weight.shape is None or len(weight.shape) != 2:
            return "B is not 2-D"
        return None

    def rewrite(self, op: Any, q: ir.Value, weight: ir.Value, scale: ir.Value, zero_point: Any = None) -> Any:
        one = op.Constant(value=ir.tensor(np.array(1.0, dtype=np.float32)))
        inputs = (q, weight, one, scale) + ((zero_point,) if self.with_zero_point else ())
        return op.MatMulIntegerToFloat(*inputs, _domain="com.microsoft")


class MatMulIntegerToFloatPass(RulesPass):
    """Fold an int8 linear's int32-to-float dequantization into ``com.microsoft.MatMulIntegerToFloat``."""

    name: ClassVar[str] = "int8_matmul_to_float"
    counted_op: ClassVar[tuple[str, str]] = ("com.microsoft", "MatMulIntegerToFloat")

    def rules(self) -> list[DequantizeInIntegerMatMul]:
        return [DequantizeInIntegerMatMul(with_zero_point=True), DequantizeInIntegerMatMul(with_zero_point=False)]
