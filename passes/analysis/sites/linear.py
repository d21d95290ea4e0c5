"""Find linear sites: matmuls of an activation with a constant weight.

A *linear site* is one of

    aten.linear(x, W[, b])        W: (out, in)   -- nn.Linear
    aten.addmm(b, x, W)           W: (in, out)   -- transformers' Conv1D (GPT-2)
    aten.mm(x, W) / aten.matmul(x, W)            -- ``x @ self.weight``
    aten.matmul(x, t(W)) / mm(x, t(W))           -- ``x @ self.weight.T``

where ``W`` (and ``b``) are ``get_attr`` constants and ``x`` is an
activation. The horizontal-fusion pass (``merge_matmuls``) groups sites that
share ``x``; the tensor-parallel pass shards them. Both only need what a site
computes: ``x @ E + b`` with ``E`` the *effective weight* of shape (in, out).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from graphopt import ir

aten = torch.ops.aten

_TRANSPOSES = {aten.t.default, aten.transpose.int, aten.permute.default, aten.numpy_T.default}


@dataclass
class LinearSite:
    """One matmul with a constant weight.

    ``kind``: ``linear``, ``addmm``, ``mm`` or ``matmul``. ``input``: the
    activation. ``weight``: the ``get_attr`` node of the stored weight;
    ``weight_transposed``: the weight reaches the matmul through a transpose
    (``x @ W.T``). ``bias``: the ``get_attr`` bias or None.
    """

    node: fx.Node
    kind: str
    input: fx.Node
    weight: fx.Node
    weight_transposed: bool
    bias: fx.Node | None
    in_features: int
    out_features: int

    def effective_weight(self, gm: fx.GraphModule) -> torch.Tensor:
        """The weight as the site multiplies with it: shape (in_features, out_features)."""
        w = ir.get_attr_value(gm, self.weight)
        stored_is_out_in = self.kind == "linear"
        if stored_is_out_in != self.weight_transposed:
            w = w.t()
        return w

    def bias_value(self, gm: fx.GraphModule) -> torch.Tensor | None:
        return None if self.bias is None else ir.get_attr_value(gm, self.bias)

    @property
    def module_path(self) -> str:
        return ir.module_path(self.node)

    @property
    def label(self) -> str:
        """The module path (``model.layers.0.self_attn.q_proj``), or the group a merged matmul came from."""
        return self.node.meta.get("merged_from") or self.module_path or self.node.name


def _constant_2d(node: object) -> tuple[fx.Node, bool] | None:
    """(get_attr node, transposed) when ``node`` is a 2-D constant or its transpose."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr":
        shape = ir.shape_of(node)
        return (node, False) if shape is not None and len(shape) == 2 else None
    if node.op == "call_function" and node.target in _TRANSPOSES and ir.is_constant(node.args[0]):
        base = node.args[0]
        shape = ir.shape_of(base)
        if shape is None or len(shape) != 2:
            return None
        if node.target == aten.permute.default and list(node.args[1]) not in ([1, 0], [-1, -2], [-1, 0], [1, -2]):
            return None
        return base, True
    return None


def _is_activation(node: object) -> bool:
    return isinstance(node, fx.Node) and node.op != "get_attr" and ir.tensor_meta(node) is not None


def linear_site(node: fx.Node) -> LinearSite | None:
    """The :class:`LinearSite` ``node`` computes, or None."""
    if node.op != "call_function":
        return None
    out_shape = ir.shape_of(node)
    if out_shape is None:
        return None
    t = node.target
    if t == aten.linear.default:
        x, w = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        cw = _constant_2d(w)
        if cw is None or not _is_activation(x) or (b is not None and not ir.is_constant(b)):
            return None
        base, transposed = cw
        if transposed:  # linear(x, W.t()) is rare; keep the model simple
            return None
        n_out, n_in = ir.shape_of(base)  # type: ignore[misc]
        return LinearSite(node, "linear", x, base, False, b, n_in, n_out)
    if t == aten.addmm.default:
        if len(node.args) != 3 or node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            return None
        b, x, w = node.args
        cw = _constant_2d(w)
        if cw is None or not _is_activation(x) or not ir.is_constant(b):
            return None
        base, transposed = cw
        shape = ir.shape_of(base)
        n_in, n_out = shape if not transposed else shape[::-1]  # type: ignore[index]
        if ir.shape_of(b) not in ((n_out,),):
            return None
        return LinearSite(node, "addmm", x, base, transposed, b, n_in, n_out)
    if t in (aten.mm.default, aten.matmul.default):
        x, w = node.args[0], node.args[1]
        cw = _constant_2d(w)
        if cw is None or not _is_activation(x):
            return None
        base, transposed = cw
        shape = ir.shape_of(base)
        n_in, n_out = shape if not transposed else shape[::-1]  # type: ignore[index]
        x_shape = ir.shape_of(x)
        if x_shape is None or len(x_shape) < 2 or x_shape[-1] != n_in:
            return None
        kind = "mm" if t == aten.mm.default else "matmul"
        return LinearSite(node, kind, x, base, transposed, None, n_in, n_out)
    return None


def find_linear_sites(gm: fx.GraphModule) -> list[LinearSite]:
    """Every linear site of ``gm`` in graph order."""
    return [s for n in gm.graph.nodes if (s := linear_site(n)) is not None]
