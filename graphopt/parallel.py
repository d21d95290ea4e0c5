"""Tensor parallelism: shard a model over the processes of a torch.distributed group.

>>> # in each of N processes, after torch.distributed.init_process_group(...)
>>> sharded = graphopt.parallel.shard(model, example_inputs)      # doctest: +SKIP
>>> logits = sharded(*example_inputs)                             # same output on every rank

:func:`shard` captures the model (or takes an :class:`~graphopt.OptimizeResult`),
finds its column -> row linear pairs (attention: QKV -> attention -> output
projection; FFN: up/gate -> activation -> down) and rewrites the graph so each
rank holds 1/N of those weights and computes 1/N of the heads and FFN
features, with one all-reduce per pair (see
:mod:`graphopt.passes.tensor_parallel` for the rules and what is declined).
:func:`plan` does the analysis alone, without processes (what would be
sharded, the bytes all-reduced per layer). ``graphopt run --nproc N SPEC``
(:mod:`graphopt.launch`) starts the processes for you.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx

from graphopt import ir, meta
from graphopt.capture import capture
from graphopt.pass_infra import OptimizeContext
from graphopt.optimize import OptimizeResult
from graphopt.passes.tensor_parallel import (
    ShardingError,
    TensorParallel,
    TensorParallelPlan,
    plan_tensor_parallel,
)

log = logging.getLogger(__name__)

__all__ = ["ShardingError", "TensorParallelPlan", "communication_table", "plan", "shard", "sharded_weight_bytes",
           "weight_bytes"]


def _graph_and_inputs(model_or_result: Any, example_inputs: Sequence[Any] | Any | None,
                      example_kwargs: dict[str, Any] | None) -> tuple[fx.GraphModule, tuple, dict]:
    if isinstance(model_or_result, OptimizeResult):
        return (ir.copy_graph_module(model_or_result.module), tuple(model_or_result.example_args),
                dict(model_or_result.example_kwargs))
    if example_inputs is None:
        raise TypeError("shard/plan need example_inputs for a model (an OptimizeResult carries its own)")
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    if not isinstance(model_or_result, torch.nn.Module):
        raise TypeError(f"expected an nn.Module or an OptimizeResult, got {type(model_or_result).__name__}")
    captured = capture(model_or_result, tuple(example_inputs), example_kwargs)
    return captured.module, captured.args, captured.kwargs


def plan(model_or_result: Any, example_inputs: Sequence[Any] | Any | None = None,
         example_kwargs: dict[str, Any] | None = None, *, world_size: int) -> tuple[TensorParallelPlan, fx.GraphModule]:
    """What :func:`shard` would do over ``world_size`` ranks, without any process group.

    Returns the plan (regions, declined sites, :meth:`~TensorParallelPlan.communication`)
    and the captured graph it refers to. Raises :class:`ShardingError` when a
    head count is not divisible by ``world_size``.
    """
    gm, _, _ = _graph_and_inputs(model_or_result, example_inputs, example_kwargs)
    return plan_tensor_parallel(gm, world_size), gm


def _group(process_group: Any) -> tuple[int, int, str]:
    import torch.distributed as dist

    if process_group is None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "torch.distributed is not initialised: call torch.distributed.init_process_group(...) in each "
                "process first, or launch with `graphopt run --nproc N SPEC`")
        process_group = dist.group.WORLD
    return dist.get_world_size(process_group), dist.get_rank(process_group), process_group.group_name


def shard(
    model_or_result: Any,
    example_inputs: Sequence[Any] | Any | None = None,
    example_kwargs: dict[str, Any] | None = None,
    *,
    world_size: int | None = None,
    rank: int | None = None,
    process_group: Any = None,
) -> fx.GraphModule:
    """This rank's part of a tensor-parallel model, called exactly like the original.

    ``model_or_result``: an ``nn.Module`` (captured here with
    ``example_inputs`` / ``example_kwargs``) or an :class:`~graphopt.OptimizeResult`.
    ``process_group`` defaults to the world group; ``world_size`` / ``rank``,
    when given, must agree with it. Every rank must call ``shard`` with the same
    model (same weights) and inputs. The returned module holds only this rank's
    shards of the sharded weights (plus the replicated ones) and all-reduces
    after each row-parallel linear, so every rank returns the full output.

    Raises :class:`ShardingError` when a head count is not divisible by the
    world size, or when no column -> row pair can be sharded (with the reasons).
    """
    world, my_rank, group_name = _group(process_group)
    if world_size is not None and world_size != world:
        raise ValueError(f"world_size={world_size} but the process group has {world} ranks")
    if rank is not None and rank != my_rank:
        raise ValueError(f"rank={rank} but this process is rank {my_rank} of its group")
    gm, args, kwargs = _graph_and_inputs(model_or_result, example_inputs, example_kwargs)
    ctx = OptimizeContext(args=args, kwargs=kwargs, flat_inputs=ir.flat_inputs(args, kwargs, gm))
    with torch.no_grad():
        result = TensorParallel(world, my_rank, group_name)(gm, ctx)
    if not result.modified:
        reasons = "; ".join(f"{d.site}: {d.reason}" for d in result.declined[:5]) or "; ".join(result.notes)
        raise ShardingError(f"nothing to shard over {world} ranks: {reasons}")
    sharded = result.module
    _drop_unused_tensors(sharded)
    sharded.meta[meta.TENSOR_PARALLEL_NOTES] = list(result.notes)
    sharded.meta[meta.TENSOR_PARALLEL_DECLINED] = list(result.declined)
    log.info("rank %d/%d: %s", my_rank, world, "; ".join(result.notes))
    return sharded


def _drop_unused_tensors(gm: fx.GraphModule) -> None:
    """Delete parameters and buffers no ``get_attr`` node uses any more (the full weights)."""
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    names = [name for name, _ in gm.named_parameters(remove_duplicate=False)]
    names += [name for name, _ in gm.named_buffers(remove_duplicate=False)]
    for name in names:
        if name in used:
            continue
        owner_path, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        if hasattr(owner, attr):
            delattr(owner, attr)


def _tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    out = [t for _, t in module.named_parameters(remove_duplicate=False)]
    out += [t for _, t in module.named_buffers(remove_duplicate=False)]
    if isinstance(module, fx.GraphModule):
        for node in module.graph.nodes:
            if node.op == "get_attr":
                value = ir.get_attr_value(module, node)
                if isinstance(value, torch.Tensor):
                    out.append(value)
    return out


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of the distinct tensors (parameters, buffers, graph constants) ``module`` holds."""
    seen: set[int] = set()
    total = 0
    for t in _tensors(module):
        if t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def sharded_weight_bytes(module: fx.GraphModule) -> int:
    """Bytes of the weight shards :func:`shard` created in ``module`` (this rank's part of the sharded weights)."""
    total = 0
    for name in module.meta.get(meta.TENSOR_PARALLEL_SHARDS, []):
        t = getattr(module, name, None)
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    return total


def communication_table(the_plan: TensorParallelPlan, world_sizes: Sequence[int] = (2, 4, 8)) -> list[dict[str, Any]]:
    """Per row-parallel linear: bytes all-reduced, and what each rank sends with a ring all-reduce.

    The all-reduced tensor is the row linear's output (batch x seq x hidden),
    the same whatever the world size; a ring all-reduce of ``S`` bytes over
    ``W`` ranks sends (and receives) ``2 (W - 1) / W * S`` bytes per rank.
    Sizes come from the graph the plan was made on (its example inputs).
    """
    rows = []
    for name, size in the_plan.communication():
        row: dict[str, Any] = {"row_linear": name, "allreduce_bytes": size}
        for w in world_sizes:
            row[f"ring_bytes_per_rank_w{w}"] = int(2 * (w - 1) / w * size)
        rows.append(row)
    return rows
