"""Tensor parallelism and merged matmuls with graphopt, on CPU.

    python examples/tensor_parallel.py

1. merge_matmuls: q/k/v of a nanoGPT with separate projections become one matmul + split.
2. plan: which column -> row pairs would be sharded over 2 ranks, and the bytes
   all-reduced per layer, read from the graph (no processes needed).
3. shard: 2 processes (gloo), each builds the same model (same seed), shards it
   with graphopt.parallel.shard and runs it; rank 0 compares with one process.

The same run from the command line: ``graphopt run --nproc 2 examples:nanogpt``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import graphopt
from graphopt import parallel
from graphopt.examples_models import nanogpt
from graphopt.launch import free_port

MODEL = dict(n_layer=2, n_head=4, n_embd=128, seq=32, split_qkv=True)


def worker(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model, args = nanogpt(**MODEL)  # the seed makes every rank's weights identical
        sharded = parallel.shard(model, args)
        with torch.no_grad():
            out = sharded(*args)
            if rank == 0:
                ref = model(*args)
                print(f"rank 0: max abs vs one process {float((out - ref).abs().max()):.2e}; "
                      f"weights {parallel.weight_bytes(sharded) / 2**20:.2f} MiB of "
                      f"{parallel.weight_bytes(model) / 2**20:.2f} MiB "
                      f"(sharded part {parallel.sharded_weight_bytes(sharded) / 2**20:.2f} MiB)")
    finally:
        dist.destroy_process_group()


def main() -> None:
    model, args = nanogpt(**MODEL)

    merged = graphopt.optimize(model, args, merge_matmuls_policy="always")
    print("merge_matmuls:", *merged.report.record("merge_matmuls").notes, sep="\n  ")

    the_plan, _ = parallel.plan(model, args, world_size=2)
    print("tensor-parallel plan over 2 ranks:", *the_plan.summary(), sep="\n  ")
    for d in the_plan.declined:
        print(f"  kept replicated: {d.site}: {d.reason}")
    for row in parallel.communication_table(the_plan):
        print(f"  all-reduce after {row['row_linear']}: {row['allreduce_bytes']} bytes "
              f"(ring, per rank: W=2 {row['ring_bytes_per_rank_w2']}, W=8 {row['ring_bytes_per_rank_w8']})")

    # fork: the children reuse this process's imports (use "spawn" with CUDA / NCCL)
    mp.start_processes(worker, args=(2, free_port()), nprocs=2, start_method="fork")


if __name__ == "__main__":
    main()
