"""Fresh verification inputs that respect the structure the graph gives them.

Verification runs the model on its example inputs and on fresh random input
sets of the same spec (:class:`InputSpec`: same shapes and dtypes). A random
integer where the model expects an index would crash it or test nothing, so
the rule for each integer input is read from how the captured graph uses it,
never from its name:

* an input that reaches the indices of an ``embedding`` or ``embedding_bag``
  (through view-like ops) is drawn in ``[0, rows)`` of the table it indexes;
  the indices of ``index_select``, ``gather`` and ``index.Tensor`` in
  ``[0, size)`` of the dimension they index (the least bound over all uses);
* an input that reaches an ``embedding_bag``'s ``offsets`` is drawn as offsets
  of the indices input it partitions: sorted, starting at 0, bounded by that
  input's length (and ending at it with ``include_last_offset``), bags
  non-empty when there are at least as many indices as bags;
* other integer inputs: 0/1 masks stay 0/1 masks, anything else is drawn in the
  example's own range; bools at random; floats with the example's mean and spread.

Where no rule fits, the caller gives the sets (``verify_inputs=`` of
:func:`graphopt.optimize`, read by :func:`user_input_sets`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from graphopt.errors import VerifyInputsError

aten = torch.ops.aten

#: ops an index flows through unchanged in meaning (a view, a copy, a cast)
PASS_THROUGH = {
    aten.view.default, aten.reshape.default, aten.unsqueeze.default, aten.squeeze.dim, aten.flatten.using_ints,
    aten.slice.Tensor, aten.to.dtype, aten._to_copy.default, aten.expand.default, aten.clone.default,
    aten.contiguous.default, aten.alias.default,
}

#: embedding_bag overloads: (weight, indices, offsets, scale_grad_by_freq, mode, sparse, per_sample_weights,
#: include_last_offset, ...)
EMBEDDING_BAGS = {aten.embedding_bag.default, aten.embedding_bag.padding_idx, aten._embedding_bag.default,
                  aten._embedding_bag_forward_only.default}

#: an input set: ``(args, kwargs)``
InputSet = tuple[tuple[Any, ...], dict[str, Any]]


class InputChain(list):
    """Input sets that are consecutive steps over shared state, given as ``verify_inputs=``.

    A decode step's sets all hold the same KV cache, which each step writes in
    place and the next reads. Verification runs a chain in order and puts the
    state back only after its last set, so a candidate reads what it wrote
    itself: the keys and values its own projections computed. Checked on
    independent snapshots of an exact cache instead, the error a linear leaves
    in the cache never shows (an int4 key/value projection measured 1.8e-2 there
    and 4.4e-2 over 128 real decode steps, docs/generation.md).
    """


@dataclass(frozen=True)
class InputSpec:
    """How to draw fresh values for one flattened input.

    ``kind``: "float", "index" (in ``[low, high)``), "offsets" (of the flat
    input ``of``; ``last``: include_last_offset), "mask", "bool", "constant".
    ``rule``: why, in words, for the report (empty: from the example alone).
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    kind: str
    low: float = 0.0
    high: float = 1.0  # exclusive for index
    mean: float = 0.0
    std: float = 1.0
    of: int = -1
    last: bool = False
    rule: str = ""

    def sample(self, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
        """A fresh tensor (an "offsets" spec is drawn by :func:`random_inputs`, which knows the indices)."""
        if self.kind == "float":
            t = torch.randn(self.shape, generator=generator, dtype=torch.float32)
            return (t * self.std + self.mean).to(self.dtype).to(like.device)
        if self.kind == "index":
            t = torch.randint(int(self.low), int(self.high), self.shape, generator=generator)
            return t.to(self.dtype).to(like.device)
        if self.kind == "mask":
            t = (torch.rand(self.shape, generator=generator) < 0.8).to(self.dtype)
            if t.ndim >= 1:  # keep the first position attended so no row is empty
                t[..., 0] = 1
            return t.to(like.device)
        if self.kind == "bool":
            return (torch.rand(self.shape, generator=generator) < 0.5).to(like.device)
        return like.clone()

    def sample_offsets(self, generator: torch.Generator, like: torch.Tensor, n_indices: int) -> torch.Tensor:
        """Offsets of ``n_indices`` indices into ``shape[0]`` bags (``- 1`` with include_last_offset)."""
        bags = self.shape[0] - 1 if self.last else self.shape[0]
        if bags <= 0:
            starts = torch.zeros(0, dtype=torch.long)
        elif n_indices >= bags:  # distinct cut points: no bag empty
            cuts = torch.randperm(max(n_indices - 1, 0), generator=generator)[: bags - 1] + 1
            starts = torch.cat([torch.zeros(1, dtype=torch.long), cuts.sort().values])
        else:
            cuts = torch.randint(0, n_indices + 1, (bags - 1,), generator=generator)
            starts = torch.cat([torch.zeros(1, dtype=torch.long), cuts.sort().values])
        if self.last:
            starts = torch.cat([starts, torch.tensor([n_indices])])
        return starts.to(self.dtype).to(like.device)


def _view_source(node: Any) -> Any:
    """The node an index argument comes from, through view-like ops (a placeholder, or whatever it is)."""
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in PASS_THROUGH:
        node = node.args[0]
    return node


def _static(size: Any) -> int | None:
    return size if isinstance(size, int) else None


def _rows(node: Any) -> int | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return _static(val.shape[0]) if isinstance(val, torch.Tensor) and val.ndim else None


def _size(node: Any, dim: Any) -> int | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(val, torch.Tensor) or not isinstance(dim, int) or not -val.ndim <= dim < val.ndim:
        return None
    return _static(val.shape[dim])


def _uses(n: fx.Node, user: fx.Node) -> list[tuple[str, Any, str]]:
    """How ``user`` reads ``n``: ("bound", rows, what) and ("offsets", (indices node, last), what) entries."""
    t, a = user.target, user.args
    if t is aten.embedding.default and len(a) > 1 and a[1] is n:
        return [("bound", _rows(a[0]), f"rows of {user.name}'s table")]
    if t in EMBEDDING_BAGS:
        found = []
        if len(a) > 1 and a[1] is n:
            found.append(("bound", _rows(a[0]), f"rows of {user.name}'s table"))
        if len(a) > 2 and a[2] is n:
            last = bool(a[7]) if len(a) > 7 else bool(user.kwargs.get("include_last_offset", False))
            found.append(("offsets", (_view_source(a[1]), last), f"offsets of {user.name}"))
        return found
    if t in (aten.index_select.default, aten.gather.default) and len(a) > 2 and a[2] is n:
        return [("bound", _size(a[0], a[1]), f"size of dim {a[1]} {user.name} indexes")]
    if t is aten.index.Tensor and len(a) > 1:
        return [("bound", _size(a[0], k), f"size of dim {k} {user.name} indexes")
                for k, i in enumerate(a[1]) if i is n]
    return []


def index_rules(placeholder: fx.Node) -> list[tuple[str, Any, str]]:
    """Every way the graph reads ``placeholder`` as an index: its uses, followed through view-like ops."""
    frontier, seen, found = [placeholder], set(), []
    while frontier:
        n = frontier.pop()
        if n in seen:
            continue
        seen.add(n)
        for user in n.users:
            if user.op != "call_function":
                continue
            found += [u for u in _uses(n, user) if u[1] is not None]
            if user.target in PASS_THROUGH and user.args and user.args[0] is n:
                frontier.append(user)
    return found


def _integer_spec(x: torch.Tensor, rules: list[tuple[str, Any, str]], phs: list[fx.Node]) -> InputSpec:
    shape, dtype = tuple(x.shape), x.dtype
    offsets = [(v, what) for kind, v, what in rules if kind == "offsets"]
    if offsets and x.ndim == 1 and offsets[0][0][0] in phs:
        (source, last), what = offsets[0]
        of = phs.index(source)
        return InputSpec(shape, dtype, "offsets", of=of, last=last, rule=f"{what} over input {source.name}")
    bounds = [(v, what) for kind, v, what in rules if kind == "bound"]
    if bounds:
        high, what = min(bounds, key=lambda b: b[0])
        return InputSpec(shape, dtype, "index", 0, high, rule=f"index in [0, {high}): {what}")
    lo, hi = (int(x.min()), int(x.max())) if x.numel() else (0, 0)
    if x.numel() and lo >= 0 and hi <= 1:
        return InputSpec(shape, dtype, "mask")
    if x.numel():
        return InputSpec(shape, dtype, "index", lo, hi + 1)
    return InputSpec(shape, dtype, "constant")


def input_specs(gm: fx.GraphModule | None, flat_inputs: Sequence[Any]) -> list[InputSpec | None]:
    """Infer an :class:`InputSpec` for each flattened input (None: not a tensor); ``gm``'s placeholders
    follow the flattened inputs, one per leaf."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"] if gm is not None else []
    specs: list[InputSpec | None] = []
    for i, x in enumerate(flat_inputs):
        if not isinstance(x, torch.Tensor):
            specs.append(None)
        elif x.dtype.is_floating_point or x.dtype.is_complex:
            xf = x.detach().float()
            std = float(xf.std()) if xf.numel() > 1 else 1.0
            specs.append(InputSpec(tuple(x.shape), x.dtype, "float", mean=float(xf.mean()) if xf.numel() else 0.0,
                                   std=std if math.isfinite(std) and std > 0 else 1.0))
        elif x.dtype == torch.bool:
            specs.append(InputSpec(tuple(x.shape), x.dtype, "bool"))
        else:
            specs.append(_integer_spec(x, index_rules(phs[i]) if i < len(phs) else [], phs))
    return specs


def random_inputs(specs: Sequence[InputSpec | None], like: Sequence[Any], seed: int) -> list[Any]:
    """One fresh flat input set: each spec drawn (offsets after the indices they partition)."""
    g = torch.Generator().manual_seed(seed)
    drawn = [s.sample(g, x) if s is not None and s.kind != "offsets" else x for s, x in zip(specs, like)]
    for i, (s, x) in enumerate(zip(specs, like)):
        if s is not None and s.kind == "offsets":
            indices = drawn[s.of] if 0 <= s.of < len(drawn) else None
            n = indices.numel() if isinstance(indices, torch.Tensor) else 0
            drawn[i] = s.sample_offsets(g, x, n)
    return drawn


def describe_rules(gm: fx.GraphModule | None, specs: Sequence[InputSpec | None]) -> dict[str, str]:
    """``{input name: rule}`` for the inputs drawn by a structural rule (what the report shows)."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"] if gm is not None else []
    return {(phs[i].name if i < len(phs) else f"input {i}"): s.rule
            for i, s in enumerate(specs) if s is not None and s.rule}


def _shape_of(pair: InputSet) -> str:
    """An input set's structure in a few words (a TreeSpec prints on many lines)."""
    return (f"{len(pair[0])} positional, {len(pair[1])} keyword "
            f"({', '.join(sorted(pair[1])) or 'none'}), {len(pytree.tree_leaves(pair))} leaves")


def _one_set(value: Any, where: str, example: InputSet) -> InputSet:
    """``value`` as an ``(args, kwargs)`` pair with the example's structure, or a one-line error."""
    if not (isinstance(value, (tuple, list)) and len(value) == 2 and isinstance(value[0], (tuple, list))
            and isinstance(value[1], (dict, type(None)))):
        raise VerifyInputsError(f"{where} is a {type(value).__name__}, not an (args, kwargs) pair; pass "
                                "e.g. verify_inputs=[((x,), {})] with the model's positional and keyword inputs")
    pair = (tuple(value[0]), dict(value[1] or {}))
    got, want = pytree.tree_structure(pair), pytree.tree_structure(example)
    if got != want:
        raise VerifyInputsError(f"{where} is not structured like the example inputs (got {_shape_of(pair)}, "
                                f"expected {_shape_of(example)}); give every input the model takes, in the same "
                                "containers")
    for k, (a, b) in enumerate(zip(pytree.tree_leaves(pair), pytree.tree_leaves(example))):
        if isinstance(b, torch.Tensor) and (not isinstance(a, torch.Tensor) or a.dtype != b.dtype):
            kind = a.dtype if isinstance(a, torch.Tensor) else type(a).__name__
            raise VerifyInputsError(f"{where}: input leaf {k} is {kind} where the example has a {b.dtype} "
                                    "tensor; give tensors of the example's dtypes")
    return pair


def _check_shapes(pair: InputSet, where: str, gm: fx.GraphModule) -> None:
    """Each tensor's static sizes as the captured graph fixed them (symbolic sizes are free)."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for ph, x in zip(phs, pytree.tree_leaves(pair)):
        val = ph.meta.get("val")
        if not isinstance(x, torch.Tensor) or not isinstance(val, torch.Tensor):
            continue
        fixed = [s if isinstance(s, int) else None for s in val.shape]
        if len(fixed) != x.ndim or any(f is not None and f != s for f, s in zip(fixed, x.shape)):
            raise VerifyInputsError(f"{where}: input {ph.name} has shape {tuple(x.shape)} where the model was "
                                    f"captured with {tuple(val.shape)}; use the example's sizes, or capture "
                                    "with dynamic shapes (dynamic=...) for the sizes that vary")


def check_form(verify_inputs: Any) -> None:
    """Refuse a ``verify_inputs`` that is neither None, a list of input sets nor a callable (before any work)."""
    if not (verify_inputs is None or callable(verify_inputs) or isinstance(verify_inputs, (list, tuple))):
        raise VerifyInputsError(f"verify_inputs is a {type(verify_inputs).__name__}; pass a list of (args, kwargs) "
                                "pairs or a callable f(seed) returning one")


def user_input_sets(verify_inputs: Sequence[Any] | Callable[[int], Any], n_sets: int,
                    example: InputSet, gm: fx.GraphModule | None = None) -> list[InputSet]:
    """The caller's verification inputs, checked against the example's structure and dtypes (and the
    sizes ``gm``, the captured graph, fixed).

    ``verify_inputs`` is a list of ``(args, kwargs)`` pairs, or a callable
    ``f(seed)`` returning one such pair, called with seeds ``1..n_sets``; an
    :class:`InputChain` stays one.
    Raises :class:`~graphopt.errors.VerifyInputsError` (one line) for anything else.
    """
    check_form(verify_inputs)
    if callable(verify_inputs):
        values, where = [], "verify_inputs({})"
        for seed in range(1, n_sets + 1):
            try:
                values.append(verify_inputs(seed))
            except Exception as exc:  # noqa: BLE001 - the user's code: reported as such, in one line
                first = (str(exc).splitlines() or [""])[0]
                raise VerifyInputsError(f"your verify_inputs callable raised {type(exc).__name__}: {first} "
                                        f"(called with seed {seed}); make it return an (args, kwargs) pair") from exc
    else:
        values, where = list(verify_inputs), "verify_inputs[{}]"
    sets = []
    for i, value in enumerate(values):
        name = where.format(i + 1 if callable(verify_inputs) else i)
        sets.append(_one_set(value, name, example))
        if gm is not None:
            _check_shapes(sets[-1], name, gm)
    return InputChain(sets) if isinstance(verify_inputs, InputChain) else sets
