"""The ``tensor_parallel`` pass: plan the regions, then rewrite this rank's graph."""

from __future__ import annotations

import torch.distributed as dist
import torch.fx as fx

from graphopt import meta
from graphopt.pass_infra import OptimizeContext, Pass, PassResult
from graphopt.report import Declined
from graphopt.passes.tensor_parallel.planning import plan_tensor_parallel
from graphopt.passes.tensor_parallel.rewrite import apply_plan


def _distributed_defaults() -> tuple[int, int, str] | None:
    """``(world size, rank, group name)`` of the initialised default process group, or None."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return dist.get_world_size(), dist.get_rank(), dist.group.WORLD.group_name


class TensorParallel(Pass):
    """Shard column -> row linear pairs over the ranks of a process group (see the package docstring)."""

    name = "tensor_parallel"
    summary = "shard column -> row linear pairs (attention, FFN) over torch.distributed ranks, one all-reduce each"

    def __init__(self, world_size: int | None = None, rank: int | None = None, group_name: str | None = None) -> None:
        self.world_size, self.rank, self.group_name = world_size, rank, group_name

    def _setup(self) -> tuple[int, int, str] | None:
        if self.world_size is not None and self.rank is not None and self.group_name is not None:
            return self.world_size, self.rank, self.group_name
        return _distributed_defaults()

    def call(self, gm: fx.GraphModule, ctx: OptimizeContext) -> PassResult:
        setup = self._setup()
        if setup is None:
            return PassResult(gm, False, declined=[Declined(
                "model", "torch.distributed is not initialised; launch with `graphopt run --nproc N SPEC` "
                "or use graphopt.parallel.shard inside an initialised process group")])
        world, rank, group_name = setup
        if world == 1:
            return PassResult(gm, False, ["world size 1: nothing to shard"])
        plan = plan_tensor_parallel(gm, world)
        if not plan.regions:
            return PassResult(gm, False, ["found no column -> row pair to shard"], plan.declined)
        summary = {"world_size": world, "rank": rank, "regions": plan.summary(),
                   "sharded_full_bytes": plan.sharded_weight_bytes(gm),
                   "allreduce_bytes": plan.communication()}
        involved = apply_plan(gm, plan, rank, group_name)
        gm.meta[meta.TENSOR_PARALLEL] = summary
        notes = [f"rank {rank}/{world}: sharded {len(plan.regions)} column -> row regions"] + plan.summary()
        return PassResult(gm, True, notes, plan.declined, involved)
