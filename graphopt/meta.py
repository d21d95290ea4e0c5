"""The keys graphopt writes into ``node.meta`` and ``GraphModule.meta``: one name per key, with what it holds.

Every reader and writer uses these constants, never the string, so a key is
defined once and can be found with grep. torch's own keys (``"val"``,
``"nn_module_stack"``, ``"stack_trace"``, ``"tensor_meta"``) are not repeated
here.
"""

from __future__ import annotations

# --- node.meta: written by analysis passes on the live graph -------------------------------------

#: ``graphopt.cost.NodeCost`` of the node (FLOPs, bytes, roofline bound, predicted and measured
#: seconds); written by ``graphopt.cost.annotate_costs`` (the ``cost_annotation`` pass)
COST = "cost"

#: ``int``: index of the FFN chain the node belongs to (``ffn_chains`` pass)
FFN_CHAIN = "ffn_chain"

#: ``(group index, instance index)`` of the repeated block the node belongs to (``repeated_blocks``)
REPEATED_BLOCK = "repeated_block"

#: ``int``: 1 for the matmul-class node with the largest share of the time, 2 the next... (``hot_matmuls``)
HOT_RANK = "hot_rank"

# --- node.meta: written by rewrite passes on the nodes they create ---------------------------------

#: ``str``: the precision the ``precision`` pass gave the node (``"int8"``, ``"fp8"``, ``"int8wo"``, ``"int4"``, ``"bf16"``,
#: ``"fp16"``, ``"fp16 (scaled)"``, ``"fp32"``); the viewer shows it
PRECISION = "graphopt_precision"

#: ``str``: which linears a merged matmul replaces, e.g. ``"h.0.attn.q_proj+k_proj+v_proj"``
#: (``merge_matmuls``; the tensor-parallel plan and the report name the merged node by it)
MERGED_FROM = "merged_from"

# --- GraphModule.meta: written by the tensor-parallel rewrite on the sharded module ---------------

#: ``dict``: the sharding summary of ``tensor_parallel`` (plan, collectives, weight bytes)
TENSOR_PARALLEL = "tensor_parallel"

#: ``list[str]``: the pass's notes, kept on the sharded module (``graphopt.parallel.shard``)
TENSOR_PARALLEL_NOTES = "tensor_parallel_notes"

#: ``list[Declined]``: what the tensor-parallel plan left unsharded, and why
TENSOR_PARALLEL_DECLINED = "tensor_parallel_declined"

#: ``list[str]``: attribute names of the local weight shards the rewrite registered
TENSOR_PARALLEL_SHARDS = "tensor_parallel_shards"
