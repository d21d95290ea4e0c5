"""The op sets and op predicates every pass shares, each defined once.

Where passes need a narrower or a wider set of one family, both are here,
named for what they contain (``CASTS`` vs ``CASTS_INCLUDING_DEVICE``), the
wider built from the narrower. Library layer: imports nothing from
``graphopt.passes``.

    >>> from graphopt.opsets import is_inactive_dropout, SOFTMAX_FORMS
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from graphopt.ir import VIEW_OPS

aten = torch.ops.aten

__all__ = [
    "DTYPE_CASTS", "CASTS", "CASTS_INCLUDING_DEVICE", "IDENTITY_OPS", "IDENTITY_LIKE", "RESHAPES",
    "RESHAPES_AND_EXPAND", "TRANSPOSES", "SPLITS", "SPLITS_AND_UNBINDS", "SOFTMAX", "LOG_SOFTMAX",
    "SOFTMAX_FORMS", "SOFTMAX_FORMS_INCLUDING_SAFE", "ACTIVATION_MATMULS", "MATMUL_OPS",
    "is_inactive_dropout", "is_float_cast", "is_passthrough", "is_parameter_view", "is_dead_private_write",
]

# ---------------------------------------------------------------- casts

#: the two forms a dtype cast takes in a captured graph (what the precision lowering inserts and folds)
DTYPE_CASTS = frozenset({aten._to_copy.default, aten.to.dtype})
#: casts that may change the dtype (``to`` with a layout too), not the device
CASTS = DTYPE_CASTS | {aten.to.dtype_layout}
#: :data:`CASTS` and ``to(device)``: every op that is an identity when dtype and device do not change
CASTS_INCLUDING_DEVICE = CASTS | {aten.to.device}

# ---------------------------------------------------------------- identities and views

#: ops that return their input's value unchanged (a copy or an alias)
IDENTITY_OPS = frozenset({aten.alias.default, aten.detach.default, aten.clone.default})
#: :data:`IDENTITY_OPS` and ``contiguous`` (same values, maybe other strides)
IDENTITY_LIKE = IDENTITY_OPS | {aten.contiguous.default}
#: ops that reshape to an explicit shape argument
RESHAPES = frozenset({aten.view.default, aten.reshape.default, aten._unsafe_view.default})
#: :data:`RESHAPES` and ``expand``: shape-only ops, identities when the shape does not change
RESHAPES_AND_EXPAND = RESHAPES | {aten.expand.default}
#: ops that transpose a matrix (``t``, ``transpose``, ``permute``, ``.T``)
TRANSPOSES = frozenset({aten.t.default, aten.transpose.int, aten.permute.default, aten.numpy_T.default})
#: ops that split a tensor into sized pieces along one dim (read through ``getitem``)
SPLITS = frozenset({aten.split_with_sizes.default, aten.split.Tensor})
#: :data:`SPLITS` with ``chunk`` and ``unbind``: every op whose outputs are pieces of its input
SPLITS_AND_UNBINDS = SPLITS | {aten.chunk.default, aten.unbind.int}

# ---------------------------------------------------------------- softmax

#: softmax (the public op and its ATen decomposition)
SOFTMAX = frozenset({aten.softmax.int, aten._softmax.default})
#: log-softmax (the public op and its ATen decomposition)
LOG_SOFTMAX = frozenset({aten.log_softmax.int, aten._log_softmax.default})
#: softmax and log-softmax
SOFTMAX_FORMS = SOFTMAX | LOG_SOFTMAX
#: :data:`SOFTMAX_FORMS` and ``_safe_softmax`` (SDPA's decomposition: rows of -inf give 0, not NaN)
SOFTMAX_FORMS_INCLUDING_SAFE = SOFTMAX_FORMS | {aten._safe_softmax.default}
#: softmax (not log_softmax) in every form torch.export writes, ``_safe_softmax`` included: what attention anchors on
SOFTMAX_INCLUDING_SAFE = SOFTMAX | {aten._safe_softmax.default}

# ---------------------------------------------------------------- matmuls

#: matmuls of two activations with batch dims (attention's ``q @ k^T`` and ``p @ v``)
ACTIVATION_MATMULS = frozenset({aten.matmul.default, aten.bmm.default})
#: every matrix-multiply op of a captured graph (a weight or an activation on the right)
MATMUL_OPS = frozenset({aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,
                        aten.matmul.default, aten.linear.default})


# ---------------------------------------------------------------- predicates

#: the dtype/device asserts torch.export inserts: they check a value, they do not use it
METADATA_ASSERTS = frozenset({aten._assert_tensor_metadata.default})


def value_users(node: fx.Node) -> list[fx.Node]:
    """The users of ``node`` that read its value (not the :data:`METADATA_ASSERTS` that only check it)."""
    return [u for u in node.users if not (u.op == "call_function" and u.target in METADATA_ASSERTS)]


def erase_dead(gm: fx.GraphModule) -> int:
    """Remove what nothing uses; returns how many nodes went.

    ``Graph.eliminate_dead_code`` keeps impure nodes, which includes two kinds
    that only look impure once their value is dead: an inactive dropout (it
    counts as random) and a :data:`METADATA_ASSERTS` check of a value nothing
    else reads. Keeping them keeps alive what they read: after attention
    fusion, the T x T causal mask transformers builds, folded into a stored
    constant, stayed in the module only to be asserted (16 MiB at 4096
    tokens). Both are removed here, repeatedly, until nothing changes.
    """
    before = len(gm.graph.nodes)

    def removable(n: fx.Node) -> bool:
        if n.op != "call_function" or n.users:
            return False
        if n.target in METADATA_ASSERTS:
            checked = n.args[0] if n.args else None
            return isinstance(checked, fx.Node) and not value_users(checked)
        return is_inactive_dropout(n)

    while True:
        gm.graph.eliminate_dead_code()
        stale = [n for n in gm.graph.nodes if removable(n)]
        if not stale:
            return before - len(gm.graph.nodes)
        for n in stale:
            gm.graph.erase_node(n)


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def is_inactive_dropout(node: Any) -> bool:
    """``node`` is ``dropout(x, p, train)`` that returns ``x``: eval mode (``train`` false) or ``p == 0``."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.target is not aten.dropout.default:
        return False
    return not _arg(node, 2, "train", True) or _arg(node, 1, "p", 0.5) == 0


def is_float_cast(node: fx.Node) -> bool:
    """``node`` is a :data:`CASTS` op to a floating dtype (or one that keeps the dtype)."""
    if node.op != "call_function" or node.target not in CASTS:
        return False
    dtype = node.kwargs.get("dtype", node.args[1] if node.target is aten.to.dtype and len(node.args) > 1 else None)
    return dtype is None or (isinstance(dtype, torch.dtype) and dtype.is_floating_point)


def is_passthrough(node: fx.Node) -> bool:
    """``node`` passes its input's values on: a float cast, an inactive dropout or an :data:`IDENTITY_LIKE` op."""
    return node.op == "call_function" and (
        is_float_cast(node) or is_inactive_dropout(node) or node.target in IDENTITY_LIKE)


def is_parameter_view(node: fx.Node) -> bool:
    """``node`` is a parameter or buffer (``get_attr``), or views of one: a value no input changes."""
    while node.op == "call_function" and node.target in VIEW_OPS and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node.op == "get_attr"



def is_inplace_op(target: Any) -> bool:
    """An ATen op that writes its first argument in place (``aten.add_.Tensor``, ``aten.copy_.default``).

    ``torch.Tag.inplace`` says so where torch has that tag (2.11 has none);
    elsewhere the schema does (:func:`writes_first_argument`).
    """
    if not isinstance(target, torch._ops.OpOverload):
        return False
    tag = getattr(torch.Tag, "inplace", None)
    return tag in target.tags if tag is not None else writes_first_argument(target)


def is_dead_private_write(node: fx.Node) -> bool:
    """An in-place op nobody reads that writes a tensor nothing else reads: removing it changes nothing.

    ``scores += bias`` (MPNet) once the scores are dead: the written tensor was
    allocated by its producer (not a view of an input, a parameter or another
    value) and this write is its only reader, so neither the write nor its
    result is ever seen. ``Graph.eliminate_dead_code`` keeps every in-place op.
    """
    if node.op != "call_function" or node.users or not is_inplace_op(node.target) or not node.args:
        return False
    written = node.args[0]
    if not isinstance(written, fx.Node) or written.op != "call_function" \
            or not isinstance(written.target, torch._ops.OpOverload) or _is_view(written) \
            or written.target in VIEW_OPS or is_inplace_op(written.target):
        return False  # ``getitem`` of a split, a view, another write: the storage may be seen elsewhere
    return all(u is node for u in value_users(written))


def writes_first_argument(target: torch._ops.OpOverload) -> bool:
    """The schema's word for an in-place op: a mutable ``name_`` op whose ``self`` is written (``Tensor(a!)``)."""
    schema = target._schema
    first = schema.arguments[0] if schema.arguments else None
    return bool(schema.is_mutable and schema.name.endswith("_") and first is not None
                and first.alias_info is not None and first.alias_info.is_write)


def _is_view(node: fx.Node) -> bool:
    """The op returns a view of its first argument (the schema's return aliases it, not as a write)."""
    schema = getattr(node.target, "_schema", None)
    if node.op != "call_function" or schema is None or not schema.returns:
        return False
    alias = schema.returns[0].alias_info
    return alias is not None and not alias.is_write


def _written_arguments(node: fx.Node) -> list[fx.Node]:
    schema = getattr(node.target, "_schema", None)
    if node.op != "call_function" or schema is None or not schema.is_mutable:
        return []
    written = []
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
        if isinstance(value, fx.Node):
            written.append(value)
    return written


def mutated_storage(graph: fx.Graph) -> set[fx.Node]:
    """Every node whose tensor shares storage with something an op writes in place.

    The written argument, the bases it is a view of, and every view of those:
    their values change during a run, so two reads of them are not the same
    value (CSE), nor free to move.
    """
    roots: set[fx.Node] = set()
    for node in graph.nodes:
        for arg in _written_arguments(node):
            while True:
                roots.add(arg)
                if not (_is_view(arg) and arg.args and isinstance(arg.args[0], fx.Node)):
                    break
                arg = arg.args[0]
    shared, frontier = set(roots), list(roots)
    while frontier:
        for user in frontier.pop().users:
            if user not in shared and _is_view(user):
                shared.add(user)
                frontier.append(user)
    return shared
