"""The canonical IR and small helpers every pass uses.

graphopt's IR is the unlifted ``torch.fx.GraphModule`` that ``torch.export``
produces (``ExportedProgram.module()``): ATen-level ops, parameters and buffers
as ``get_attr`` nodes, every node carrying ``meta["val"]`` (a fake tensor),
``nn_module_stack`` and ``stack_trace``, and pytree in/out specs so the module
is called exactly like the user's model.

Helpers here:

* :func:`copy_graph_module` -- a new GraphModule over a copied Graph that shares
  the parameters (cheap; used for rollback snapshots).
* :func:`refresh_meta` -- recompute ``meta["val"]`` after a rewrite with fake
  tensors (``torch.fx.passes.fake_tensor_prop.FakeTensorProp``).
* :func:`to_networkx` -- a ``networkx.DiGraph`` view for graph algorithms.
* small predicates and accessors (:func:`tensor_meta`, :func:`module_path`, ...).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

log = logging.getLogger(__name__)

aten = torch.ops.aten

#: ops that only reinterpret memory: they cost nothing and move no bytes.
VIEW_OPS = frozenset(
    {
        aten.view.default,
        aten._unsafe_view.default,
        aten.reshape.default,
        aten.expand.default,
        aten.permute.default,
        aten.transpose.int,
        aten.t.default,
        aten.unsqueeze.default,
        aten.squeeze.dim,
        aten.squeeze.dims,
        aten.squeeze.default,
        aten.slice.Tensor,
        aten.select.int,
        aten.alias.default,
        aten.detach.default,
        aten.split.Tensor,
        aten.split_with_sizes.default,
        aten.unbind.int,
        aten.chunk.default,
        aten.narrow.default,
        aten.flatten.using_ints,
        aten.unflatten.int,
        aten.view_as.default,
        aten.expand_as.default,
    }
)


@contextlib.contextmanager
def quiet_leafspec_deprecation() -> Iterator[None]:
    """Silence torch's own ``LeafSpec`` deprecation inside the block.

    torch 2.13 deprecates its ``torch.utils._pytree.LeafSpec`` and warns each time one is built, which every
    copy of an exported graph (its code generator holds pytree specs) does, in every pass and inside torch's own
    compilers: a warning about torch's internals that the user cannot act on, repeated dozens of times per build.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*deprecated", category=FutureWarning)
        yield


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """Return a new GraphModule with a copy of ``gm``'s graph.

    Parameters, buffers and submodules are shared with ``gm`` (no tensor is
    copied), so a pass may mutate the copy's graph freely and ``gm`` stays as
    it was. Passes must never change a tensor in place.
    """
    with quiet_leafspec_deprecation():
        graph = copy.deepcopy(gm.graph)
    new = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    # attributes that fx does not carry over but export's modules rely on
    for attr in ("meta",):
        if hasattr(gm, attr):
            setattr(new, attr, copy.copy(getattr(gm, attr)))
    return new


def fake_inputs_for(example_inputs: Sequence[Any], mode: Any) -> list[Any]:
    return [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example_inputs]


def refresh_meta(gm: fx.GraphModule, flat_inputs: Sequence[Any]) -> None:
    """Recompute ``meta["val"]`` of every node by fake-tensor propagation.

    ``flat_inputs`` are the flattened example inputs (one per placeholder).
    Parameters are real tensors; they are converted to fake ones on access.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        fakes = fake_inputs_for(flat_inputs, mode)
    FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fakes)
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            node.meta["tensor_meta"] = fx.passes.shape_prop._extract_tensor_metadata(val)


def writer_of(node: fx.Node) -> fx.Node | None:
    """A user that writes into ``node``'s storage in place (directly or through views), or None.

    Looks at the schema of each user: an argument marked written (``Tensor(a!)``)
    that is ``node``, or a view of it (:data:`VIEW_OPS`), is a write.
    """
    stack, seen = [node], set()
    while stack:
        cur = stack.pop()
        if cur in seen:
            continue
        seen.add(cur)
        for user in cur.users:
            schema = getattr(user.target, "_schema", None)
            if schema is not None and schema.is_mutable:
                for i, arg in enumerate(schema.arguments):
                    value = user.args[i] if i < len(user.args) else user.kwargs.get(arg.name)
                    if value is cur and arg.alias_info is not None and arg.alias_info.is_write:
                        return user
            if user.op == "call_function" and user.target in VIEW_OPS and user.args and user.args[0] is cur:
                stack.append(user)
    return None


def tensor_meta(node: Any) -> torch.Tensor | None:
    """The fake tensor describing ``node``'s value, or None for non-tensors."""
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("val")
    return val if isinstance(val, torch.Tensor) else None


def shape_of(node: Any) -> tuple[int, ...] | None:
    val = tensor_meta(node)
    if val is None:
        return None
    try:
        return tuple(int(s) for s in val.shape)
    except Exception:  # symbolic sizes
        return None


def get_attr_value(gm: fx.GraphModule, node: fx.Node) -> Any:
    """The real tensor (or module) a ``get_attr`` node refers to."""
    assert node.op == "get_attr", node
    obj: Any = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part)
    return obj


def is_constant(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr"


def register_constant(gm: fx.GraphModule, name_hint: str, value: torch.Tensor) -> str:
    """Register ``value`` as a non-persistent buffer with a fresh name; return it."""
    base = "_graphopt_" + "".join(c if c.isalnum() else "_" for c in name_hint)
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    gm.register_buffer(name, value, persistent=False)
    return name


def module_path(node: fx.Node) -> str:
    """Dotted path of the innermost nn.Module that produced ``node`` ('' at top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, _cls = list(stack.values())[-1]
    return _clean_path(path)


def module_stack(node: fx.Node) -> list[tuple[str, str]]:
    """[(path, class name)] from outermost to innermost module."""
    out = []
    for path, cls in (node.meta.get("nn_module_stack") or {}).values():
        name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
        out.append((_clean_path(path), name.rsplit(".", 1)[-1]))
    return out


def _clean_path(path: str) -> str:
    # export writes paths like "L['self'].transformer.h[0]" or "transformer.h.0"
    p = path.replace("L['self'].", "").replace("L['self']", "")
    p = p.replace("[", ".").replace("]", "").replace("'", "")
    return p.strip(".")


def source_line(node: fx.Node) -> str:
    """The user source line that produced ``node`` ('file:line: code'), if known."""
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip()]
    # the last 'File ..., line N' entry and the code after it
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("File "):
            code = lines[i + 1] if i + 1 < len(lines) and not lines[i + 1].startswith("File ") else ""
            loc = lines[i][5:].split(",")
            fname = loc[0].strip('"').rsplit("/", 1)[-1]
            lineno = loc[1].replace("line", "").strip() if len(loc) > 1 else "?"
            return f"{fname}:{lineno}: {code}".rstrip(": ")
    return ""


def op_name(node: fx.Node) -> str:
    """Short readable op name: 'aten.mm', 'graphopt.blocked_attention', 'placeholder', ..."""
    if node.op == "call_function":
        t = node.target
        if isinstance(t, torch._ops.OpOverload):
            return f"{t.namespace}.{t._opname}"
        return getattr(t, "__name__", str(t))
    if node.op == "call_module":
        return f"module:{node.target}"
    return node.op


def is_returned(node: fx.Node) -> bool:
    """Whether ``node``'s value, or a view of it, is one of the module's outputs.

    Rewrites that would make an output share memory with another output or
    with a constant check this (a caller may write into what it gets back).
    """
    stack, seen = [node], {node}
    while stack:
        for user in stack.pop().users:
            if user.op == "output":
                return True
            if user.op == "call_function" and user.target in VIEW_OPS and user not in seen:
                seen.add(user)
                stack.append(user)
    return False


def to_networkx(gm: fx.GraphModule) -> nx.DiGraph:
    """A ``networkx.DiGraph`` over node names, edges producer -> consumer.

    Each graph node carries ``node`` (the fx.Node), ``op`` and ``target``.
    """
    g = nx.DiGraph()
    for node in gm.graph.nodes:
        g.add_node(node.name, node=node, op=node.op, target=op_name(node))
    for node in gm.graph.nodes:
        for inp in node.all_input_nodes:
            g.add_edge(inp.name, node.name)
    return g


def flat_inputs(args: Sequence[Any], kwargs: dict[str, Any] | None, gm: fx.GraphModule | None = None) -> list[Any]:
    """Flatten ``(args, kwargs)`` the way the module's in_spec does."""
    kwargs = kwargs or {}
    spec = getattr(gm, "_in_spec", None) if gm is not None else None
    if spec is not None:
        from torch.fx._pytree import tree_flatten_spec

        return list(tree_flatten_spec((tuple(args), kwargs), spec))
    leaves, _ = pytree.tree_flatten((tuple(args), kwargs))
    return leaves


# --- constants: values fixed for every call (constant folding, mask evaluation, weight reads) ---

#: ops whose result depends only on the input's shape, dtype and device
SHAPE_ONLY_OPS = {
    aten.new_ones.default, aten.new_zeros.default, aten.new_full.default,
    aten.ones_like.default, aten.zeros_like.default, aten.full_like.default,
}


def _static_shape(node: fx.Node) -> bool:
    return shape_of(node) is not None


def foldable_op(node: fx.Node) -> bool:
    if node.op != "call_function" or node.is_impure():
        return False
    if not isinstance(node.target, torch._ops.OpOverload):
        return node.target.__name__ == "getitem" if hasattr(node.target, "__name__") else False
    if torch.Tag.nondeterministic_seeded in node.target.tags:
        return False
    return not node.target._schema.is_mutable


def constant_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose value is fixed for every call (given static input shapes)."""
    const: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            const.add(node)
        elif node.op == "call_function" and foldable_op(node):
            if node.target in SHAPE_ONLY_OPS and _static_shape(node):
                const.add(node)
            elif all(inp in const for inp in node.all_input_nodes):
                const.add(node)
    return const


def evaluate(gm: fx.GraphModule, nodes: list[fx.Node], const: set[fx.Node]) -> dict[fx.Node, Any]:
    """Evaluate ``nodes`` (constants) by running their constant upstream eagerly."""
    env: dict[fx.Node, Any] = {}

    def value(n: fx.Node) -> Any:
        if n in env:
            return env[n]
        stack = [n]
        while stack:
            cur = stack[-1]
            if cur in env:
                stack.pop()
                continue
            if cur.op == "get_attr":
                env[cur] = get_attr_value(gm, cur)
                stack.pop()
                continue
            if cur.target in SHAPE_ONLY_OPS:
                proto = cur.args[0]
                val = tensor_meta(proto)
                real = torch.empty(val.shape, dtype=val.dtype, device=val.device)
                args = (real,) + tuple(cur.args[1:])
                env[cur] = cur.target(*args, **cur.kwargs)
                stack.pop()
                continue
            missing = [i for i in cur.all_input_nodes if i not in env]
            if missing:
                stack.extend(missing)
                continue
            args = fx.node.map_arg(cur.args, lambda a: env[a])
            kwargs = fx.node.map_arg(cur.kwargs, lambda a: env[a])
            env[cur] = cur.target(*args, **kwargs)
            stack.pop()
        return env[n]

    with torch.no_grad():
        return {n: value(n) for n in nodes}
