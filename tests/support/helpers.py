"""Small helpers the tests share: numeric comparison, pass running, state snapshots.

Deliberately independent of :mod:`graphopt.verify` where it matters: the tests
compare outputs with their own relative-L2 so a bug in graphopt's verifier
cannot hide a wrong rewrite.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

import graphopt
from graphopt import ir
from graphopt.pass_infra import OptimizeContext, Pass, PassResult
from graphopt.verify import ABS_FLOOR  # absolute differences below these count as equal, as in verify
from graphopt.verify import FP32_MATCH_MARGIN  # "as accurate as the model": the same margin as verify

FP32_REL_L2 = 1e-5


def rel_l2(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """‖ref - cand‖ / ‖ref‖ in float64 (0 when both are zero)."""
    r, c = reference.detach().double(), candidate.detach().double()
    denom = float(r.norm())
    diff = float((r - c).norm())
    if denom == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / denom


def assert_outputs_close(reference: Any, candidate: Any, tol: float = FP32_REL_L2) -> float:
    """Same pytree structure, same shapes and dtypes, every float leaf within ``tol``.

    Returns the worst relative L2 seen.
    """
    ref_leaves, ref_spec = pytree.tree_flatten(reference)
    cand_leaves, cand_spec = pytree.tree_flatten(candidate)
    assert type(candidate) is type(reference), f"output type {type(candidate).__name__} != {type(reference).__name__}"
    assert len(ref_leaves) == len(cand_leaves), f"{len(cand_leaves)} output leaves, expected {len(ref_leaves)}"
    worst = 0.0
    for i, (r, c) in enumerate(zip(ref_leaves, cand_leaves)):
        if not isinstance(r, torch.Tensor):
            assert r == c, f"leaf {i}: {c!r} != {r!r}"
            continue
        assert isinstance(c, torch.Tensor), f"leaf {i} is {type(c).__name__}, expected a tensor"
        assert c.shape == r.shape, f"leaf {i}: shape {tuple(c.shape)} != {tuple(r.shape)}"
        assert c.dtype == r.dtype, f"leaf {i}: dtype {c.dtype} != {r.dtype}"
        if not r.dtype.is_floating_point:
            assert torch.equal(r, c), f"leaf {i}: integer output differs"
            continue
        assert torch.isfinite(c).all() or not torch.isfinite(r).all(), f"leaf {i}: non-finite values appeared"
        finite = torch.isfinite(r)
        assert torch.equal(finite, torch.isfinite(c)), f"leaf {i}: inf/NaN positions differ"
        r0, c0 = torch.where(finite, r, 0), torch.where(finite, c, 0)
        err = rel_l2(r0, c0)
        # a numerically-zero output (the mean of a normalised tensor) has no meaningful relative error
        max_abs = float((r0.double() - c0.double()).abs().max()) if r0.numel() else 0.0
        assert err <= tol or max_abs <= ABS_FLOOR.get(r.dtype, 0.0), \
            f"leaf {i}: relative L2 {err:.3e} > {tol:.0e} (max abs {max_abs:.1e})"
        worst = max(worst, err)
    return worst


def assert_as_accurate_as_model(model: torch.nn.Module, candidate: Any, args: Sequence[Any],
                                kwargs: dict[str, Any] | None = None, tol: float = FP32_REL_L2) -> None:
    """``candidate`` matches the fp32 ``model`` within ``tol``, or, where the model's own conditioning
    turns fp32 rounding into more than ``tol`` (a LayerNorm over two nearly equal features), is as
    accurate as the model against a float64 run of it (within ``FP32_MATCH_MARGIN`` of the model's own
    error there). The float64 run is a copy: the model is not cast."""
    expected, got = call(model, args, kwargs), call(candidate, args, kwargs)
    try:
        assert_outputs_close(expected, got, tol)
        return
    except AssertionError as exc:
        if "relative L2" not in str(exc):  # structure, shapes, dtypes, integers, inf/NaN: no second opinion
            raise
        first = exc
    wide_args, wide_kwargs = pytree.tree_map(
        lambda x: x.double() if isinstance(x, torch.Tensor) and x.dtype == torch.float32 else x,
        (tuple(args), dict(kwargs or {})))
    exact = call(copy.deepcopy(model).double(), wide_args, wide_kwargs)
    for i, (e, r, c) in enumerate(zip(pytree.tree_leaves(exact), pytree.tree_leaves(expected),
                                      pytree.tree_leaves(got))):
        if isinstance(r, torch.Tensor) and r.dtype == torch.float32:
            own, err = rel_l2(e, r), rel_l2(e, c)
            assert err <= max(1e-7, FP32_MATCH_MARGIN * own), \
                f"{first}; against fp64 leaf {i} is {err:.2e} > {FP32_MATCH_MARGIN:g} x the model's own {own:.2e}"
    try:  # the other leaves (integers, non-tensors, fp64) as before
        assert_outputs_close([x for x in pytree.tree_leaves(expected) if not _fp32(x)],
                             [x for x in pytree.tree_leaves(got) if not _fp32(x)], tol)
    except AssertionError as exc:
        raise AssertionError(f"{first}; {exc}") from None


def _fp32(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype == torch.float32


def call(fn: Any, args: Sequence[Any], kwargs: dict[str, Any] | None = None) -> Any:
    with torch.no_grad():
        return fn(*args, **(kwargs or {}))


def capture_for_pass(model: torch.nn.Module, args: Sequence[Any],
                     kwargs: dict[str, Any] | None = None, **options: Any) -> tuple[fx.GraphModule, OptimizeContext]:
    """Capture ``model`` and build the context a pass is called with (no verifier)."""
    cap = graphopt.capture(model, tuple(args), kwargs)
    ctx = OptimizeContext(args=cap.args, kwargs=cap.kwargs,
                          flat_inputs=ir.flat_inputs(cap.args, cap.kwargs, cap.module), options=options)
    return cap.module, ctx


def run_pass(pass_: Pass, gm: fx.GraphModule, ctx: OptimizeContext) -> PassResult:
    """Run ``pass_`` on a copy of ``gm`` (as the PassManager does); ``gm`` is left as it was."""
    return pass_(ir.copy_graph_module(gm), ctx)


def op_targets(gm: fx.GraphModule) -> list[str]:
    """The graph's call_function op names in order, e.g. ``['aten.linear', 'aten.relu']``."""
    return [ir.op_name(n) for n in gm.graph.nodes if n.op == "call_function"]


def snapshot_state(model: torch.nn.Module) -> dict[str, Any]:
    """Everything optimize() must leave alone: tensor objects, their values, training flags."""
    return {
        "params": {k: (v, v.detach().clone()) for k, v in model.named_parameters(remove_duplicate=False)},
        "buffers": {k: (v, v.detach().clone()) for k, v in model.named_buffers(remove_duplicate=False)},
        "training": {k: m.training for k, m in model.named_modules()},
        "modules": {k: m for k, m in model.named_modules()},
    }


def assert_state_unchanged(model: torch.nn.Module, before: dict[str, Any]) -> None:
    """Same objects, bit-identical values, same training flags as in ``before``."""
    after = snapshot_state(model)
    for kind in ("params", "buffers"):
        assert after[kind].keys() == before[kind].keys(), f"{kind} names changed"
        for name, (obj, saved) in before[kind].items():
            now_obj, _ = after[kind][name]
            assert now_obj is obj, f"{kind[:-1]} {name} was replaced by another tensor"
            assert now_obj.dtype == saved.dtype and now_obj.shape == saved.shape, f"{name} changed dtype/shape"
            # bit-identical: compare the raw bytes, so -0.0 vs 0.0 or NaN payloads count too
            assert torch.equal(now_obj.detach().reshape(-1).view(torch.uint8) if now_obj.numel() else now_obj,
                               saved.reshape(-1).view(torch.uint8) if saved.numel() else saved), \
                f"{kind[:-1]} {name} changed value"
    assert after["training"] == before["training"], "training flags changed"
    assert all(after["modules"][k] is m for k, m in before["modules"].items()), "a submodule was replaced"


def aliasing(outputs: Any, inputs: Sequence[Any], *modules: torch.nn.Module) -> set[tuple[str, str]]:
    """Which output leaves share memory with an input, a parameter/buffer of ``modules`` or another output.

    Returns pairs like ``("out0", "input0")``, ``("out1", "param:proj.weight")``, ``("out1", "out0")``.
    A rewrite must not add any: a caller writing into an output would change its input, the model's
    weights, or another output.
    """
    def storage(t: torch.Tensor) -> int | None:
        return t.untyped_storage().data_ptr() if isinstance(t, torch.Tensor) and t.numel() else None

    owners: dict[int, list[str]] = {}
    for i, x in enumerate(pytree.tree_leaves(list(inputs))):
        if (p := storage(x)) is not None:
            owners.setdefault(p, []).append(f"input{i}")
    for module in modules:
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if (p := storage(t)) is not None and f"param:{name}" not in owners.get(p, []):
                owners.setdefault(p, []).append(f"param:{name}")
    pairs: set[tuple[str, str]] = set()
    for j, out in enumerate(pytree.tree_leaves(outputs)):
        p = storage(out)
        if p is None:
            continue
        pairs.update((f"out{j}", owner) for owner in owners.get(p, []))
        owners.setdefault(p, []).append(f"out{j}")
    return pairs
