"""Causal ``Attention`` -> onnxruntime's ``GroupQueryAttention``: an onnx_ir pass for the onnxruntime target.

graphopt's attention fusion turns attention into
``aten.scaled_dot_product_attention``; torch.onnx exports that as the standard
``Attention`` op from opset 23 (as a MatMul/Softmax decomposition below 23).
onnxruntime 1.32's CPU kernel for a *causal* ``Attention`` is slower than its
contrib ``GroupQueryAttention`` kernel, which applies the causal mask while it
computes instead of materialising it (measured in ``benchmarks/onnx_speed.py``;
figures in ``benchmarks/RESULTS.md``). So, for onnxruntime only
(:mod:`graphopt.onnx.rewrites` runs it between the bf16 and int8 passes):

    Attention(q, k, v, is_causal=1)            # q, k, v: (B, H, S, D), self-attention
      -> Transpose(GroupQueryAttention(
             Reshape(Transpose(q)), Reshape(Transpose(k)), Reshape(Transpose(v)),
             seqlens_k=S-1, total_sequence_length=S))   # com.microsoft, (B, S, H*D)

The transposes it adds cancel against the model's own ``view -> transpose``
when the ONNX optimizer runs afterwards (:class:`GroupQueryAttentionPass`
runs it).

Declined, with the reason recorded:

* non-causal ``Attention`` (with or without a mask): onnxruntime's contrib
  ``MultiHeadAttention`` measured no faster than ``Attention`` on CPU, so the
  standard op stays;
* an explicit mask, past key/value inputs, softcap, or the extra outputs used;
* query and key sequence lengths that are not the same (cross-attention, or
  a prefix): GroupQueryAttention's causal mask is aligned to the end of the
  keys;
* head counts or head size not static, a head size that is not a multiple
  of 8 (GroupQueryAttention's requirement), 3-D inputs, or a dtype other
  than float32/float16.

Written with onnxscript's rewriter (``pattern / check / rewrite``) rather
than by hand, so matching, node replacement and clean-up are the library's;
:mod:`graphopt.onnx.rules` turns the check's reasons into ``Declined`` records.
"""

from __future__ import annotations

from typing import Any, ClassVar

import onnx_ir as ir
import onnxscript.optimizer

from graphopt.onnx.rules import CheckedRule, RulesPass

_GQA_DTYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16)


class CausalAttentionToGroupQueryAttention(CheckedRule):
    """``Attention(q, k, v, is_causal=1)`` -> ``com.microsoft.GroupQueryAttention``."""

    def __init__(self) -> None:
        super().__init__(name="causal_attention_to_gqa")

    def pattern(self, op: Any, query: ir.Value, key: ir.Value, value: ir.Value) -> Any:
        return op.Attention(query, key, value, _allow_other_inputs=True, _allow_other_attributes=True,
                            _outputs=["attention_out"])

    def decline_reason(self, context: Any, query: ir.Value, key: ir.Value, value: ir.Value,
                       attention_out: ir.Value, **_: Any) -> str | None:
        node = attention_out.producer()
        attrs = node.attributes
        if len(node.inputs) > 3 and any(v is not None for v in node.inputs[3:]):
            return ("has an explicit mask or past key/value input (GroupQueryAttention "
                    "applies only its own causal mask): kept as the standard Attention op")
        if attrs.get_int("is_causal", 0) != 1:
            return ("not causal: onnxruntime's contrib MultiHeadAttention measured no "
                    "faster than Attention for it, kept as the standard op")
        if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
            return "uses Attention's extra outputs (present key/value, qk)"
        if attrs.get_float("softcap", 0.0) != 0.0 or attrs.get_int("qk_matmul_output_mode", 0) != 0:
            return "softcap or qk_matmul_output_mode is set"
        if query.dtype not in _GQA_DTYPES:
            return f"dtype {query.dtype} (GroupQueryAttention takes float32/float16)"
        return _layout_reason([v.shape for v in (query, key, value)])

    def rewrite(self, op: Any, query: ir.Value, key: ir.Value, value: ir.Value,
                attention_out: ir.Value, **_: Any) -> Any:
        node = attention_out.producer()
        heads, kv_heads = query.shape[1], key.shape[1]
        scale = node.attributes.get_float("scale", None)
        to_3d = op.Constant(value_ints=[0, 0, -1])

        def bsd(x: ir.Value) -> Any:  # (B, H, S, D) -> (B, S, H*D)
            return op.Reshape(op.Transpose(x, perm=[0, 2, 1, 3]), to_3d)

        q3, k3, v3 = bsd(query), bsd(key), bsd(value)
        # sizes read from the 3-D tensors, so the 4-D transposes keep no other user and cancel
        batch = op.Shape(q3, start=0, end=1)
        seq = op.Cast(op.Shape(k3, start=1, end=2), to=ir.DataType.INT32)
        one = op.Constant(value=ir.tensor([1], dtype=ir.DataType.INT32))
        seqlens_k = op.Expand(op.Sub(seq, one), batch)  # index of the last key, per batch row
        total_length = op.Squeeze(seq)
        extra = {} if scale is None else {"scale": scale}
        out, _present_k, _present_v = op.GroupQueryAttention(
            q3, k3, v3, None, None, seqlens_k, total_length,
            num_heads=heads, kv_num_heads=kv_heads, _domain="com.microsoft", _outputs=3, **extra)
        out_4d = op.Reshape(out, op.Constant(value_ints=[0, 0, heads, -1]))
        return op.Transpose(out_4d, perm=[0, 2, 1, 3])


def _layout_reason(shapes: list[Any]) -> str | None:
    """Why (B, H, S, D) query/key/value shapes do not fit GroupQueryAttention, or None when they do."""
    if any(s is None or len(s) != 4 for s in shapes):
        return "query/key/value are not 4-D (batch, heads, seq, head_dim)"
    (_, heads, q_seq, head_dim), (_, kv_heads, k_seq, k_dim), (_, v_heads, _, v_dim) = shapes
    if not all(isinstance(d, int) for d in (heads, kv_heads, v_heads, head_dim, k_dim, v_dim)):
        return "head counts or head size are not static"
    if kv_heads != v_heads or heads % kv_heads or head_dim != k_dim or head_dim != v_dim:
        return (f"head layout q={heads}x{head_dim} k={kv_heads}x{k_dim} "
                f"v={v_heads}x{v_dim} does not fit GroupQueryAttention")
    if head_dim % 8:
        return (f"head size {head_dim} is not a multiple of 8 (onnxruntime's "
                "GroupQueryAttention requires it)")
    if not _same_dim(q_seq, k_seq):
        return (f"query length {q_seq} and key length {k_seq} differ "
                "(GroupQueryAttention aligns the causal mask to the last key)")
    return None


def _same_dim(a: Any, b: Any) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    if isinstance(a, ir.SymbolicDim) and isinstance(b, ir.SymbolicDim):
        return a.value is not None and a.value == b.value
    return False


class GroupQueryAttentionPass(RulesPass):
    """Causal self-attention -> GroupQueryAttention, then onnxscript's optimizer so the layout changes cancel."""

    name: ClassVar[str] = "causal_attention_to_gqa"
    counted_op: ClassVar[tuple[str, str]] = ("com.microsoft", "GroupQueryAttention")

    def rules(self) -> list[CausalAttentionToGroupQueryAttention]:
        return [CausalAttentionToGroupQueryAttention()]

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = super().call(model)
        if result.modified:
            onnxscript.optimizer.optimize(model)
        return result
