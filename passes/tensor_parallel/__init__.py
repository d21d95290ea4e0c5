"""Tensor parallelism (Megatron-style): shard column -> row linear pairs over ranks.

Rewrites, on each rank ``r`` of ``W`` (attention: QKV -> attention -> output
projection; FFN: up/gate -> activation -> down):

    y = linear(x, W_col, b_col)            -> linear(x, W_col[rows of rank r], b_col[r])   (column)
    view(y, [B, T, H, D])                  -> view(y, [B, T, H/W, D])     (hard-coded head counts)
    split(qkv, C, -1)                      -> split(qkv, C/W, -1)          (fused QKV: each of q/k/v sharded)
    expand / reshape / unflatten sizes     -> local sizes
    attention, softmax, masks, rotary, activations: unchanged (they act per head / per feature)
    z = linear(h, W_row, b_row)            -> z = all_reduce(linear(h, W_row[:, cols of rank r])) + b_row  (row)

One all-reduce per column -> row pair; everything between runs on 1/W of the
heads or FFN features. The same rules cover ``aten.linear`` (nn.Linear),
``aten.addmm`` (transformers' Conv1D, GPT-2) and ``x @ W`` with constant
weights; constants broadcast along the sharded features (a bias added by
hand) are sharded too.

How the pairs are found: linear sites that share an input are seeds (q/k/v,
gate/up, a fused c_attn); their outputs are marked *sharded on the last
dim* and the marking is propagated forward through the graph in topological
order (``Shard(dim, blocks)``: which dim is split over the ranks; ``blocks``
the sizes of the pieces that are each split, e.g. (C, C, C) for a fused QKV
that is split later). Each op either maps the marking to its output (views
through their dim groups, permutes, pointwise ops with broadcasting,
per-head attention, softmax over another dim, splits at block boundaries) or
the region is declined. A linear that contracts over the sharded dim is the
row half of the pair: its output is summed over ranks (all_reduce) and the
region ends there. When an op meets an unsharded operand that must be
sharded (keys from a different projection), the linear sites that operand
comes from (``networkx`` BFS upstream, :func:`graphopt.ir.to_networkx`) join
the seeds and the propagation restarts.

Why a graph rewrite and not ``torch.distributed.tensor.parallel``'s
``ColwiseParallel`` / ``RowwiseParallel``: those shard ``nn.Linear``
parameters but the model's own forward still uses the full head count in its
``view`` calls (transformers#45109) and GPT-2's ``Conv1D`` is not an
``nn.Linear``; in the graph the hard-coded sizes are visible and are
rewritten, and the communication is one explicit
``torch.ops._c10d_functional.all_reduce`` per pair (torch.distributed's
functional collectives: traceable, work on gloo and NCCL).

Declines, with the reason (the region stays replicated):
    * a sharded value reaches the model output (e.g. lm_head: no vocab-parallel head);
    * an op that does not act per head / per feature (layer_norm over the
      sharded features, a slice or reduction over them, a matmul contracting
      over them outside a linear, an op graphopt does not know);
    * an unsharded, non-constant operand with the full sharded size;
    * symbolic (dynamic) sizes in a view along the sharded dim.
Raises :class:`ShardingError` when a region could be sharded but its head
count (or feature count) is not divisible by the world size.
"""

from graphopt.passes.tensor_parallel.planning import plan_tensor_parallel
from graphopt.passes.tensor_parallel.rewrite import apply_plan
from graphopt.passes.tensor_parallel.shards import Shard, ShardedRegion, ShardingError, TensorParallelPlan, shard_tensor
from graphopt.passes.tensor_parallel.tensor_parallel_pass import TensorParallel

__all__ = ["TensorParallel", "plan_tensor_parallel", "apply_plan", "Shard", "ShardedRegion", "ShardingError",
           "TensorParallelPlan", "shard_tensor"]
