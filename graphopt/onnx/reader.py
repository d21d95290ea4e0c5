"""Read an ``.onnx`` file into a lightweight, read-only graph description.

For ``graphopt analyze model.onnx`` and ``graphopt viz model.onnx``: the
nodes with their ops and attributes, every tensor's dtype and shape (ONNX
shape inference fills in the intermediate ones), the initializers and their
sizes (read from the file's metadata: external weights are never loaded),
FLOPs for the ops that dominate (MatMul, Gemm, Conv, Attention and
onnxruntime's MultiHeadAttention / GroupQueryAttention), and a networkx view.

>>> g = load_onnx("out/model.onnx")                    # doctest: +SKIP
>>> g.op_counts().most_common(3), g.total_flops()      # doctest: +SKIP
>>> nx_graph = g.to_networkx()                         # doctest: +SKIP

FLOPs count a multiply-add as 2 and are ``None`` where a shape the formula
needs is unknown or symbolic (a dynamic ``batch`` / ``seq`` axis): evaluate
them at concrete sizes with ``load_onnx(path, dims={"batch": 1, "seq": 128})``.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

log = logging.getLogger(__name__)

Dim = int | str | None


@dataclass(frozen=True)
class TensorInfo:
    """A tensor of the graph: name, dtype ('float32', ...), shape (ints, axis names, None when unknown)."""

    name: str
    dtype: str
    shape: tuple[Dim, ...] | None
    nbytes: int | None = None  # initializers only

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape) if self.shape is not None else None,
                **({"nbytes": self.nbytes} if self.nbytes is not None else {})}


@dataclass
class OnnxNode:
    """One node: ``op`` is ``op_type`` prefixed by its domain when not ai.onnx (``com.microsoft.GroupQueryAttention``)."""

    name: str
    op_type: str
    domain: str
    inputs: list[str]
    outputs: list[str]
    attributes: dict[str, Any] = field(default_factory=dict)
    flops: int | None = None

    @property
    def op(self) -> str:
        return f"{self.domain}.{self.op_type}" if self.domain not in ("", "ai.onnx") else self.op_type

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "op": self.op, "inputs": self.inputs, "outputs": self.outputs,
                "attributes": {k: v if isinstance(v, (int, float, str, list)) else str(v)
                               for k, v in self.attributes.items()},
                "flops": self.flops}


@dataclass
class OnnxGraph:
    """The main graph of an ONNX model (subgraphs of If/Loop are not expanded)."""

    path: str
    opsets: dict[str, int]
    producer: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    nodes: list[OnnxNode]
    tensors: dict[str, TensorInfo]  # every value with a known type: inputs, outputs, intermediates
    initializers: dict[str, TensorInfo]

    def op_counts(self) -> Counter[str]:
        return Counter(n.op for n in self.nodes)

    def total_flops(self) -> int:
        """Sum of the FLOPs that could be computed (nodes with ``flops=None`` count 0)."""
        return sum(n.flops or 0 for n in self.nodes)

    def weight_bytes(self) -> int:
        return sum(t.nbytes or 0 for t in self.initializers.values())

    def producers(self) -> dict[str, OnnxNode]:
        return {out: n for n in self.nodes for out in n.outputs if out}

    def to_networkx(self) -> nx.DiGraph:
        """A ``networkx.DiGraph``: one vertex per node (``node``, ``op`` attributes) and per graph input/output
        (``op`` = ``"input"`` / ``"output"``); edges producer -> consumer with the tensor name as ``tensor``.
        Initializers are not vertices (see :attr:`initializers`)."""
        g = nx.DiGraph()
        source: dict[str, str] = {}
        for t in self.inputs:
            vertex = f"input:{t.name}"
            g.add_node(vertex, op="input", tensor=t)
            source[t.name] = vertex
        for n in self.nodes:
            g.add_node(n.name, op=n.op, node=n)
            for out in n.outputs:
                if out:
                    source[out] = n.name
        for n in self.nodes:
            for inp in n.inputs:
                if inp in source:
                    g.add_edge(source[inp], n.name, tensor=inp)
        for t in self.outputs:
            vertex = f"output:{t.name}"
            g.add_node(vertex, op="output", tensor=t)
            if t.name in source:
                g.add_edge(source[t.name], vertex, tensor=t.name)
        return g

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path, "opsets": self.opsets, "producer": self.producer,
            "inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs],
            "nodes": [n.to_dict() for n in self.nodes],
            "initializers": {k: v.to_dict() for k, v in self.initializers.items()},
            "op_counts": dict(self.op_counts()), "total_flops": self.total_flops(),
            "weight_bytes": self.weight_bytes(),
        }


def load_onnx(path: str | os.PathLike[str], *, infer_shapes: bool = True,
              dims: Mapping[str, int] | None = None) -> OnnxGraph:
    """Read ``path`` (never modified; external weights are not loaded) into an :class:`OnnxGraph`.

    ``infer_shapes``: run ONNX shape inference (on a temporary copy) for the
    intermediate shapes. ``dims``: sizes for symbolic axes (``{"batch": 1}``)
    used for shapes and FLOPs.
    """
    import onnx  # lazy: keeps `import graphopt` (and the CLI's start-up) free of onnx

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such ONNX file: {path}")
    model = onnx.load(path, load_external_data=False)
    if infer_shapes:
        model = _with_inferred_shapes(path, model)
    dims = dict(dims or {})
    graph = model.graph
    tensors: dict[str, TensorInfo] = {}
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        tensors[vi.name] = _tensor_info(vi, dims)
    initializers = {init.name: _initializer_info(init) for init in graph.initializer}
    for name, info in initializers.items():
        tensors.setdefault(name, info)
    init_names = set(initializers)
    nodes = []
    for i, n in enumerate(graph.node):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute
                 if a.type != onnx.AttributeProto.GRAPH and a.type != onnx.AttributeProto.GRAPHS}
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()
                 if not isinstance(v, onnx.TensorProto)}
        node = OnnxNode(n.name or f"{n.op_type}_{i}", n.op_type, n.domain, list(n.input), list(n.output), attrs)
        node.flops = node_flops(node, tensors)
        nodes.append(node)
    return OnnxGraph(
        path=path,
        opsets={o.domain or "ai.onnx": o.version for o in model.opset_import},
        producer=f"{model.producer_name} {model.producer_version}".strip(),
        inputs=[tensors[i.name] for i in graph.input if i.name not in init_names],
        outputs=[tensors[o.name] for o in graph.output],
        nodes=nodes,
        tensors=tensors,
        initializers=initializers,
    )


def _with_inferred_shapes(path: str, model: Any) -> Any:
    import onnx  # lazy: keeps `import graphopt` (and the CLI's start-up) free of onnx

    fd, scratch = tempfile.mkstemp(suffix=".onnx")
    os.close(fd)
    try:
        onnx.shape_inference.infer_shapes_path(path, scratch)
        return onnx.load(scratch, load_external_data=False)
    except Exception as exc:  # a model ONNX cannot infer still reads, with fewer shapes
        log.info("ONNX shape inference failed on %s (%s); intermediate shapes unknown", path, exc)
        return model
    finally:
        os.remove(scratch)


def _dtype_name(elem_type: int) -> str:
    import onnx  # lazy: keeps `import graphopt` (and the CLI's start-up) free of onnx

    try:
        return str(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except Exception:
        return onnx.TensorProto.DataType.Name(elem_type).lower()


def _tensor_info(vi: Any, dims: Mapping[str, int]) -> TensorInfo:
    t = vi.type.tensor_type
    shape: tuple[Dim, ...] | None = None
    if t.HasField("shape"):
        shape = tuple(
            (d.dim_value if d.dim_value >= 0 else None)  # a negative size (-1: "any") is not a size
            if d.HasField("dim_value") else dims.get(d.dim_param, d.dim_param or None)
            for d in t.shape.dim
        )
    return TensorInfo(vi.name, _dtype_name(t.elem_type) if t.elem_type else "?", shape)


def _initializer_info(init: Any) -> TensorInfo:
    import onnx  # lazy: keeps `import graphopt` (and the CLI's start-up) free of onnx

    shape = tuple(int(d) for d in init.dims)
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
    except Exception:
        itemsize = 0
    return TensorInfo(init.name, _dtype_name(init.data_type), shape, math.prod(shape) * itemsize)


# --------------------------------------------------------------------------- FLOPs

def _shape(tensors: Mapping[str, TensorInfo], name: str) -> tuple[int, ...] | None:
    info = tensors.get(name) if name else None
    if info is None or info.shape is None or not all(isinstance(d, int) and d >= 0 for d in info.shape):
        return None
    return tuple(int(d) for d in info.shape)  # type: ignore[arg-type]


def node_flops(node: OnnxNode, tensors: Mapping[str, TensorInfo]) -> int | None:
    """FLOPs of one node (multiply-add = 2), or None when the op is not counted or a shape is unknown."""
    fn = _FLOPS.get((node.domain if node.domain != "ai.onnx" else "", node.op_type))
    if fn is None:
        return None
    try:
        return fn(node, tensors)
    except (IndexError, KeyError, TypeError, ValueError, ZeroDivisionError):
        return None


def _matmul(node: OnnxNode, t: Mapping[str, TensorInfo]) -> int | None:
    a, out = _shape(t, node.inputs[0]), _shape(t, node.outputs[0])
    if a is None or out is None:
        return None
    return 2 * math.prod(out) * a[-1]


def _gemm(node: OnnxNode, t: Mapping[str, TensorInfo]) -> int | None:
    a, b = _shape(t, node.inputs[0]), _shape(t, node.inputs[1])
    if a is None or b is None:
        return None
    m, k = (a[1], a[0]) if node.attributes.get("transA", 0) else a
    n = b[0] if node.attributes.get("transB", 0) else b[1]
    bias = m * n if len(node.inputs) > 2 and node.inputs[2] else 0
    return 2 * m * n * k + bias


def _conv(node: OnnxNode, t: Mapping[str, TensorInfo]) -> int | None:
    w, out = _shape(t, node.inputs[1]), _shape(t, node.outputs[0])
    if w is None or out is None:
        return None
    # w: (C_out, C_in / group, *kernel); every output element is one dot product of that size
    return 2 * math.prod(out) * math.prod(w[1:])


def _attention(node: OnnxNode, t: Mapping[str, TensorInfo]) -> int | None:
    """ai.onnx Attention (opset 23): 4-D (B, H, S, D) or 3-D (B, S, H*D) inputs."""
    q, k, v = (_shape(t, node.inputs[i]) for i in range(3))
    if q is None or k is None or v is None:
        return None
    if len(q) == 4:
        b, h, s, d = q
        kv_len, dv = k[2], v[3]
        return 2 * b * h * s * kv_len * d + 2 * b * h * s * kv_len * dv
    heads = int(node.attributes.get("q_num_heads", 1))
    kv_heads = int(node.attributes.get("kv_num_heads", heads))
    b, s, hidden = q
    kv_len, hidden_v = k[1], v[2]
    return 2 * b * s * kv_len * hidden + 2 * b * s * kv_len * (hidden_v // kv_heads) * heads


def _contrib_attention(node: OnnxNode, t: Mapping[str, TensorInfo]) -> int | None:
    """com.microsoft MultiHeadAttention / GroupQueryAttention with (B, S, hidden) query, key, value."""
    q, k = _shape(t, node.inputs[0]), _shape(t, node.inputs[1]) if len(node.inputs) > 1 else None
    if q is None or k is None or len(q) != 3:
        return None
    heads = int(node.attributes["num_heads"])
    b, s, hidden = q
    if node.op_type == "GroupQueryAttention":
        kv_heads = int(node.attributes.get("kv_num_heads", heads))
        kv_len, head = k[1], k[2] // kv_heads
        return 4 * b * heads * s * kv_len * head  # QK^T and PV, each 2 * B * heads * S * T * head
    kv_len = k[1] if len(k) == 3 else k[2]
    return 4 * b * s * kv_len * hidden


_FLOPS = {
    ("", "MatMul"): _matmul,
    ("com.microsoft", "FusedMatMul"): _matmul,
    ("", "Gemm"): _gemm,
    ("", "Conv"): _conv,
    ("", "Attention"): _attention,
    ("com.microsoft", "MultiHeadAttention"): _contrib_attention,
    ("com.microsoft", "GroupQueryAttention"): _contrib_attention,
}
