"""The FFN chain: ``linear -> activation -> linear`` and its gated variant, one type found by one walk.

    linear(x, W1) -> act -> linear(., W2)                       plain FFN (GPT-2, BERT, nanoGPT)
    act(linear(x, Wg)) * linear(x, Wu) -> linear(., Wd)         gated FFN (Llama's SwiGLU, GeGLU)

:func:`find_ffn_chains` returns one :class:`FFNChain` per closing linear that
either view below recognises (the union; each consumer takes what it reads):

* the *reach* view (``up``, ``gate``, ``down``, ``activation`` nodes,
  ``nodes``, ``d_model``, ``d_hidden``; ``reported`` is True; read by the
  ``ffn_chains`` analysis pass, analyze's JSON and the viewer): from each
  *weight matmul* (a matmul-family node whose right-hand operand is a
  constant, through views), BFS forward over the networkx view
  (:func:`graphopt.ir.to_networkx`) through pointwise ops and views only; a
  weight matmul reached that way closes a chain when an activation lies on a
  path between the two (DFS backward from the second matmul inside the
  reached set). A ``mul`` on that path whose other operand is a weight matmul
  of the same input makes the chain gated (that matmul is ``up``). Not
  chains: the output width differs from the input width (a classifier head
  such as the CNN's 2048 -> 64 -> 10: an FFN maps d -> hidden -> d); no
  activation between the two matmuls (e.g. o_proj -> residual add -> norm ->
  q_proj); matmuls of two activations (attention's Q @ K^T, P @ V) -- they
  stop the search.
* the *rewrite* view (``x``, ``lin_in``, ``lin_gate``, ``lin_out``
  (:class:`~graphopt.passes.analysis.sites.linear.LinearSite` operands),
  ``activation_name`` and ``removed``, the nodes a rewrite of the whole chain
  removes; read by the blocked planner through
  :mod:`graphopt.passes.analysis.blockable_ffn`): anchored at a linear site
  whose input is an activation of another linear of the same tokens, or a
  gated product ``act(linear_g(x)) * linear_u(x)``; every intermediate has no
  user outside the chain. The activation may be one op or a chain of pointwise
  ops (GPT-2's tanh GELU written out); it is identified by evaluating the
  chain on probe values against :data:`graphopt.ops._blocking.ACTIVATIONS`.

``declined``: why no rewrite can take the chain (its activation is not one
graphopt has a kernel for); the analysis reports such a chain all the same.
The two views accept different graphs (the CNN's 2048 -> 64 -> 10 head is
a rewrite-view chain, not a reach-view one), so the walk keeps both.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, ClassVar

import networkx as nx
import torch
import torch.fx as fx

from graphopt.opsets import value_users
from graphopt import ir
from graphopt.cost import alias_root, alias_source, shape, val_of
from graphopt.opsets import is_inplace_op, is_passthrough
from graphopt.ops._blocking import ACTIVATIONS as BLOCKED_ACTIVATIONS
from graphopt.passes.analysis.hot_matmuls import weight_operand
from graphopt.passes.analysis.sites.linear import LINEAR_OPS, LinearSite, linear_site
from graphopt.passes.analysis.sites.walk import dtype_of, keeps_last_dim

aten = torch.ops.aten

__all__ = ["FFNChain", "find_ffn_chains", "is_weight_matmul", "activation_operand"]

_SINGLE_OP_ACTIVATIONS = {aten.relu.default: "relu", aten.silu.default: "silu", aten.sigmoid.default: "sigmoid",
                          aten.tanh.default: "tanh"}

#: pointwise ops that make a chain non-linear
ACTIVATION_OP_NAMES = frozenset({
    "gelu", "relu", "silu", "tanh", "sigmoid", "erf", "mish", "hardswish", "hardsigmoid", "elu", "selu",
    "celu", "leaky_relu", "softplus", "relu6", "hardtanh", "gelu_", "relu_", "silu_",
})

#: how far (in nodes) the forward search goes from a matmul before giving up
MAX_SEARCH_NODES = 200


@dataclass
class FFNChain:
    """One feed-forward block, ending at the linear ``output`` (see the module docstring for the two views).

    Reach view (``reported``): ``up``: first matmul (for gated FFNs the gate
    projection is ``gate`` and the plain one ``up``); ``down``: the closing
    matmul (``output``); ``activation``: the activation ops on the path;
    ``nodes``: every node of the chain. Rewrite view (``x`` is not None):
    ``lin_in`` (the plain input projection), ``lin_gate``, ``lin_out``;
    ``activation_name`` (None: unknown, see ``declined``); ``removed``: the
    nodes a rewrite of the whole chain removes.
    """

    kind: ClassVar[str] = "ffn"
    output: fx.Node
    up: fx.Node | None = None
    activation: list[fx.Node] = field(default_factory=list)
    gate: fx.Node | None = None
    nodes: list[fx.Node] = field(default_factory=list)
    d_model: int | None = None
    d_hidden: int | None = None
    x: fx.Node | None = None
    lin_in: LinearSite | None = None
    lin_gate: LinearSite | None = None
    lin_out: LinearSite | None = None
    activation_name: str | None = None
    removed: list[fx.Node] = field(default_factory=list)
    declined: str | None = None

    @property
    def down(self) -> fx.Node:
        return self.output

    @property
    def reported(self) -> bool:
        """Found by the reach view (what the analysis reports)."""
        return self.up is not None

    @property
    def gated(self) -> bool:
        return self.gate is not None

    @property
    def name(self) -> str:
        return self.output.name

    @property
    def rows(self) -> int:
        return math.prod(ir.shape_of(self.x)[:-1])

    @property
    def hidden(self) -> int:
        return self.lin_in.out_features

    def describe(self) -> str:
        gate = "gated " if self.lin_gate is not None else ""
        return f"{gate}FFN at {self.output.name} ({self.rows} rows x {self.hidden} hidden, {self.activation_name})"

    @property
    def module(self) -> str:
        """The innermost module path shared by the chain's matmuls."""
        paths = [ir.module_path(n).split(".") for n in (self.up, self.down, self.gate) if n is not None]
        common = []
        for parts in zip(*paths):
            if len(set(parts)) != 1:
                break
            common.append(parts[0])
        return ".".join(common)

    def to_dict(self) -> dict[str, Any]:
        return {
            "up": self.up.name if self.up is not None else None,
            "gate": self.gate.name if self.gate is not None else None,
            "down": self.down.name, "activation": [n.name for n in self.activation],
            "gated": self.gated, "module": self.module, "d_model": self.d_model, "d_hidden": self.d_hidden,
            "nodes": [n.name for n in self.nodes],
        }


def find_ffn_chains(gm: fx.GraphModule, graph: nx.DiGraph | None = None) -> list[FFNChain]:
    """Every FFN chain in ``gm`` that either view finds, in graph order of the closing linear.

    The analysis reads those with ``reported``; the blocked planner those with
    ``x`` (:func:`graphopt.passes.analysis.blockable_ffn.check_blockable_ffn`).
    """
    reach = _reach_chains(gm, graph)
    chains: list[FFNChain] = []
    for node in gm.graph.nodes:
        lin = linear_site(node)
        rewrite = _rewrite_view(gm, lin) if lin is not None else None
        if node in reach or rewrite is not None:
            chains.append(FFNChain(node, **reach.get(node, {}), **(rewrite or {})))
    return chains


def is_weight_matmul(node: fx.Node) -> bool:
    """A linear-family node whose right-hand operand is a constant (through views)."""
    return node.op == "call_function" and node.target in LINEAR_OPS and weight_operand(node) is not None


def activation_operand(node: fx.Node) -> fx.Node | None:
    """The non-constant operand of a weight matmul."""
    idx = 1 if getattr(node.target, "_opname", "") == "addmm" else 0
    arg = node.args[idx] if len(node.args) > idx else None
    return arg if isinstance(arg, fx.Node) else None


def _passes_through(node: fx.Node) -> bool:
    """Ops the search walks through: pointwise ops and views."""
    if node.op != "call_function":
        return False
    if alias_source(node) is not None or node.target in ir.VIEW_OPS:
        return True
    t = node.target
    return isinstance(t, torch._ops.OpOverload) and torch.Tag.pointwise in t.tags


def _is_activation(node: fx.Node) -> bool:
    name = getattr(node.target, "_opname", "")
    return node.op == "call_function" and name in ACTIVATION_OP_NAMES


def _last_dim(node: fx.Node | None) -> int | None:
    v = val_of(node) if node is not None else None
    return shape(v)[-1] if isinstance(v, torch.Tensor) and v.dim() else None


def _same_source(a: fx.Node | None, b: fx.Node | None) -> bool:
    return a is not None and b is not None and alias_root(a) is alias_root(b)


def _reach_chains(gm: fx.GraphModule, graph: nx.DiGraph | None) -> dict[fx.Node, dict[str, Any]]:
    """The reach view: {closing matmul: its FFNChain fields}."""
    g = graph if graph is not None else ir.to_networkx(gm)
    node_of = {name: data["node"] for name, data in g.nodes(data=True)}
    chains: dict[fx.Node, dict[str, Any]] = {}
    for start in gm.graph.nodes:
        if not is_weight_matmul(start):
            continue
        # BFS forward through pointwise ops and views
        reached: set[str] = set()
        ends: list[fx.Node] = []
        queue = deque([start.name])
        while queue and len(reached) < MAX_SEARCH_NODES:
            for succ in g.successors(queue.popleft()):
                if succ in reached:
                    continue
                node = node_of[succ]
                if is_weight_matmul(node):
                    ends.append(node)
                elif _passes_through(node):
                    reached.add(succ)
                    queue.append(succ)
        for end in ends:
            chain = _chain(start, end, reached, g, node_of)
            if chain is not None and end not in chains:
                chains[end] = chain
    return chains


def _chain(start: fx.Node, end: fx.Node, reached: set[str], g: nx.DiGraph,
           node_of: dict[str, fx.Node]) -> dict[str, Any] | None:
    operand = activation_operand(end)
    if operand is None or (operand.name not in reached and operand is not start):
        return None
    # DFS backward from the closing matmul's operand, inside the reached set: the path nodes
    path: set[str] = set()
    stack = [operand.name]
    while stack:
        name = stack.pop()
        if name in path or name not in reached:
            continue
        path.add(name)
        stack.extend(g.predecessors(name))
    acts = [node_of[n] for n in path if _is_activation(node_of[n])]
    if not acts:
        return None
    d_in, d_out = _last_dim(activation_operand(start)), _last_dim(end)
    if d_in is None or d_in != d_out:
        return None
    up, gate = start, None
    extra: list[fx.Node] = []
    for name in path:
        node = node_of[name]
        if getattr(node.target, "_opname", "") != "mul":
            continue
        for other in node.all_input_nodes:
            root = other
            while root.name not in path and alias_source(root) is not None:
                extra.append(root)
                root = alias_source(root)
            if root.name in path or root is start or not is_weight_matmul(root):
                continue
            if _same_source(activation_operand(root), activation_operand(start)):
                up, gate = root, start
    order = {n: i for i, n in enumerate(start.graph.nodes)}
    members = {start, end, *(node_of[n] for n in path), *([up] if gate is not None else [])}
    if gate is not None:
        members |= {n for n in extra if order[n] < order[end]}
    nodes = sorted(members, key=lambda n: order[n])
    acts.sort(key=lambda n: order[n])
    return {"up": up, "activation": acts, "gate": gate, "nodes": nodes, "d_model": d_in, "d_hidden": _last_dim(start)}


# ---------------------------------------------------------------- the rewrite view

def _same_dtype_passthrough(node: fx.Node) -> bool:
    return is_passthrough(node) and dtype_of(node) == dtype_of(node.args[0])


def _strip_row_views(node: fx.Node, chain: list[fx.Node]) -> fx.Node:
    """Step over row-keeping views, eval dropouts and dtype-keeping casts (single-user only)."""
    while isinstance(node, fx.Node) and (keeps_last_dim(node) or _same_dtype_passthrough(node)) \
            and len(value_users(node)) == 1:
        chain.append(node)
        node = node.args[0]
    return node


def _activation_region(top: fx.Node) -> tuple[LinearSite, list[fx.Node]] | None:
    """The pointwise region from a linear's output up to ``top`` (a unary function of it)."""
    region: list[fx.Node] = []
    base: LinearSite | None = None
    stack = [top]
    while stack:
        n = stack.pop()
        if n in region:
            continue
        lin = linear_site(n, allow_split=True)
        if lin is not None:
            if base is not None and base.node is not n:
                return None
            base = lin
            continue
        if n.op != "call_function":
            return None
        pointwise = isinstance(n.target, torch._ops.OpOverload) and torch.Tag.pointwise in n.target.tags
        if not (pointwise or is_passthrough(n) or keeps_last_dim(n)) or is_inplace_op(n.target):
            return None
        region.append(n)
        for inp in n.all_input_nodes:
            val = ir.tensor_meta(inp)
            if inp.op == "get_attr" and val is not None and val.numel() == 1:
                continue
            stack.append(inp)
    if base is None:
        return None
    inside = set(region)
    for n in region:
        if n is not top and any(u not in inside for u in value_users(n)):
            return None
    if any(u not in inside for u in value_users(base.node)) and (region or len(value_users(base.node)) != 1):
        return None
    return base, region


def _identify_activation(gm: fx.GraphModule, base: fx.Node, region: list[fx.Node]) -> str | None:
    """Name the unary function ``region`` computes of ``base``, by probing it."""
    compute = [n for n in region if not (keeps_last_dim(n) or is_passthrough(n))]
    if not compute:
        return "identity"
    if len(compute) == 1:
        n = compute[0]
        if n.target in _SINGLE_OP_ACTIVATIONS:
            return _SINGLE_OP_ACTIVATIONS[n.target]
        if n.target is aten.gelu.default:
            return "gelu_tanh" if n.kwargs.get("approximate", "none") == "tanh" else "gelu"
    dtype = dtype_of(base) or torch.float32
    probe = torch.cat([torch.linspace(-8, 8, 1601), torch.randn(512, generator=torch.Generator().manual_seed(0))])
    probe = probe.to(dtype if dtype.is_floating_point else torch.float32)
    values: dict[fx.Node, Any] = {base: probe}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    with torch.no_grad():
        for n in sorted(region, key=order.__getitem__):
            if keeps_last_dim(n):
                values[n] = values[n.args[0]]
                continue
            args = fx.node.map_arg(n.args, lambda a: values[a] if a in values else ir.get_attr_value(gm, a))
            kwargs = fx.node.map_arg(n.kwargs, lambda a: values[a] if a in values else ir.get_attr_value(gm, a))
            try:
                values[n] = n.target(*args, **kwargs)
            except Exception:
                return None
    out = values[region[0]].float()  # region[0] is the top node
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for name, act in BLOCKED_ACTIVATIONS.items():
        ref = act.torch_fn(probe.float())
        if torch.allclose(out, ref, rtol=tol, atol=tol * 0.1):
            return name
    return None


def _rewrite_view(gm: fx.GraphModule, out: LinearSite) -> dict[str, Any] | None:
    """The rewrite view of the chain that ends at the linear ``out``: its FFNChain fields, or None.

    An activation graphopt's chunked FFN does not compute leaves
    ``activation_name`` None and says so in ``declined``.
    """
    nodes: list[fx.Node] = []
    top = _strip_row_views(out.input, nodes)
    if not isinstance(top, fx.Node) or top.op != "call_function":
        return None
    if top.target is aten.mul.Tensor and all(isinstance(a, fx.Node) for a in top.args[:2]) \
            and len(value_users(top)) == 1:
        a, b = top.args[0], top.args[1]
        for act_side, up_side in ((a, b), (b, a)):
            up_chain: list[fx.Node] = []
            up = linear_site(_strip_row_views(up_side, up_chain), allow_split=True)
            found = _activation_region(act_side)
            if up is None or found is None or len(value_users(up.node)) != 1:
                continue
            gate, region = found
            if gate.node is up.node or _canonical_input(gate.input) is not _canonical_input(up.input):
                continue
            name = _identify_activation(gm, gate.node, region)
            declined = None if name is not None else \
                f"gated FFN at {out.node.name}: the activation is not one graphopt knows"
            removed = nodes + [top] + up_chain + region + [up.node, gate.node]
            return {"x": up.input, "lin_in": up, "lin_gate": gate, "lin_out": out, "activation_name": name,
                    "removed": removed, "declined": declined}
    found = _activation_region(top)
    if found is None:
        return None
    lin_in, region = found
    if lin_in.node is out.node or ir.shape_of(lin_in.input) is None:
        return None
    name = _identify_activation(gm, lin_in.node, region)
    declined = None if name is not None else \
        f"FFN at {out.node.name}: the activation between the linears is not one graphopt knows"
    return {"x": lin_in.input, "lin_in": lin_in, "lin_gate": None, "lin_out": out, "activation_name": name,
            "removed": nodes + region + [lin_in.node], "declined": declined}


def _canonical_input(node: fx.Node) -> fx.Node:
    while isinstance(node, fx.Node) and keeps_last_dim(node):
        node = node.args[0]
    return node

