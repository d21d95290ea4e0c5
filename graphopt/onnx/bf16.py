"""bfloat16 arithmetic that onnxruntime's CPU provider can run: computed in float32, rounded to bf16.

A graph the precision pass put (partly) in bf16 exports with bf16 ``MatMul``,
``Gemm``, ``Add``, ``Attention``, ``Gelu`` ... onnxruntime's CPU provider has no
bf16 kernels for any of them (probed with onnxruntime 1.32: only type-generic
data movement -- ``Reshape``, ``Transpose``, ``Concat``, ``Gather``,
``Slice``, ``Split`` ... -- and ``Cast`` load), so such a file cannot even be
loaded to be checked, let alone run. For the onnxruntime target each of those
nodes is rewritten into the same computation in float32 between casts::

    y = Op(a_bf16, b_bf16, ...)                                      # y: bf16
      -> y = Cast(Op(Cast(a_bf16, FLOAT), Cast(b_bf16, FLOAT), ...), BFLOAT16)

bf16 values are exact in float32, so the inputs are unchanged; the output is
rounded to bf16 where the original rounded it. This is the numbers of a bf16
kernel that accumulates in float32 (what torch's CPU bf16 GEMMs do), kept at
the same rounding points, the float counterpart of the QDQ form the int8 and
fp8 ops export to. Weights stay bf16 in the file (half the size of float32).
One ``Cast`` to float32 per bf16 value, shared by its consumers.

Left as they are: ops onnxruntime runs in bf16 (:data:`BF16_NATIVE`). Declined,
with the reason recorded: nodes with a graph attribute (``If``/``Loop``/``Scan``:
their bodies are not rewritten) and nodes whose attributes fix an output type
(``to``, ``dtype``).

Written by hand over onnx_ir (:class:`ComputeBf16InFloat32`, an onnx_ir
``InPlacePass``) rather than as onnxscript rewrite rules: the rule is "every
node of any op type with a bf16 operand", which a pattern (one op type per
rule) does not express.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import onnx_ir as ir

from graphopt.pattern import Declined

log = logging.getLogger(__name__)

#: ops onnxruntime's CPU provider loads with bf16 operands (type-generic; probed with onnxruntime 1.32)
BF16_NATIVE = frozenset({"Cast", "CastLike", "Constant", "Identity", "Reshape", "Transpose", "Squeeze", "Unsqueeze",
                         "Flatten", "Concat", "Gather", "GatherElements", "Slice", "Split", "Shape", "Size"})
_TYPE_ATTRIBUTES = ("to", "dtype", "output_dtype")
BF16 = ir.DataType.BFLOAT16
FLOAT = ir.DataType.FLOAT


def _is_bf16(value: ir.Value | None) -> bool:
    return value is not None and value.dtype == BF16


def _has_bf16(node: ir.Node) -> bool:
    return any(_is_bf16(v) for v in node.inputs) or any(_is_bf16(v) for v in node.outputs)


def _decline_reason(node: ir.Node) -> str | None:
    """Why a non-native node with a bf16 operand stays in bf16, or None when it is computed in float32."""
    if any(name in node.attributes for name in _TYPE_ATTRIBUTES):
        return "an attribute fixes its output type: left in bf16"
    if any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for attr in node.attributes.values()):
        return "has a subgraph (its body is not rewritten): left in bf16"
    return None


def _cast(value: ir.Value, to: ir.DataType, name: str) -> ir.Node:
    out = ir.Value(name=name, shape=value.shape, type=ir.TensorType(to))
    return ir.node("Cast", [value], {"to": to}, outputs=[out], name=f"{name}_cast")  # node names need not be unique


class _Names:
    """Fresh value names: the graph must stay in SSA form (every name assigned once)."""

    def __init__(self, model: ir.Model) -> None:
        self.taken = {v.name for v in model.graph.inputs} | set(model.graph.initializers)
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            self.taken.update(v.name for v in node.outputs if v.name)

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self.taken:
            name, i = f"{base}_{i}", i + 1
        self.taken.add(name)
        return name


class ComputeBf16InFloat32(ir.passes.InPlacePass):
    """Each non-native bf16 node computed in float32 between casts (see the module docstring)."""

    #: the report's name for this rewrite (a key of ``OnnxExport.rewrites``)
    name: ClassVar[str] = "bf16_in_float32"

    def __init__(self) -> None:
        super().__init__()
        self.rewritten = 0
        self.declined: list[Declined] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        widened: dict[int, ir.Value] = {}  # id(bf16 value) -> its float32 copy, shared by every consumer
        fresh = _Names(model)
        self.rewritten, self.declined = 0, []
        for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
            native = node.domain in ("", "ai.onnx") and node.op_type in BF16_NATIVE
            if native or not _has_bf16(node):
                continue
            reason = _decline_reason(node)
            if reason is not None:
                self.declined.append(Declined(node.name or node.op_type, reason))
                continue
            _widen_inputs(node, widened, fresh)
            _round_outputs(node, fresh)
            self.rewritten += 1
        if self.rewritten:
            log.info("bf16: %d nodes computed in float32 for onnxruntime's CPU provider (rounded to bf16 after)",
                     self.rewritten)
        return ir.passes.PassResult(model, modified=self.rewritten > 0)


def _widen_inputs(node: ir.Node, widened: dict[int, ir.Value], fresh: _Names) -> None:
    """Feed ``node`` a float32 copy of each bf16 input (one ``Cast`` per value and graph)."""
    graph = node.graph
    for index, value in enumerate(node.inputs):
        if not _is_bf16(value):
            continue
        copy = widened.get(id(value))
        if copy is None or copy.graph is not graph:
            cast = _cast(value, FLOAT, fresh(f"{value.name}_float32"))
            graph.insert_before(node, cast)
            copy = widened[id(value)] = cast.outputs[0]
        node.replace_input_with(index, copy)


def _round_outputs(node: ir.Node, fresh: _Names) -> None:
    """Make each bf16 output float32 and round it to bf16 after the node, under its old name."""
    graph = node.graph
    for value in node.outputs:
        if not _is_bf16(value):
            continue
        name = value.name
        value.name, value.type = fresh(f"{name}_float32"), ir.TensorType(FLOAT)
        cast = _cast(value, BF16, name)  # the rounded value keeps the name (graph outputs keep theirs)
        graph.insert_after(node, cast)
        rounded = cast.outputs[0]
        for user, index in list(value.uses()):
            if user is not cast:
                user.replace_input_with(index, rounded)
        for i, out in enumerate(graph.outputs):
            if out is value:
                graph.outputs[i] = rounded


def compute_bf16_in_float32(model: ir.Model) -> int:
    """Rewrite ``model`` in place (see the module docstring); return the number of nodes rewritten."""
    bf16_pass = ComputeBf16InFloat32()
    bf16_pass(model)
    return bf16_pass.rewritten
