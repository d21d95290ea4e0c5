"""Tensor-parallel planning in one process: which pairs are found, what is rewritten, what is declined."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt import ir, parallel
from graphopt.examples_models import nanogpt
from graphopt.pass_infra import OptimizeContext
from graphopt.passes.tensor_parallel import ShardingError, TensorParallel, shard_tensor


def tiny_llama(heads: int = 4, kv_heads: int = 2, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=layers, hidden_size=64, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, intermediate_size=128, vocab_size=256, use_cache=False,
                      attn_implementation="eager")
    return LlamaForCausalLM(cfg).eval(), (torch.randint(0, 256, (1, 8)),)


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=64, use_cache=False,
                     attn_implementation="eager")
    return GPT2LMHeadModel(cfg).eval(), (torch.randint(0, 256, (1, 8)),)


def regions(the_plan):
    return [([s.label for s, _ in r.columns], [s.label for s, _ in r.rows]) for r in the_plan.regions]


def test_llama_pairs_attention_and_swiglu():
    the_plan, gm = parallel.plan(*tiny_llama(), world_size=2)
    attn = "model.layers.0.self_attn"
    mlp = "model.layers.0.mlp"
    assert regions(the_plan)[:2] == [
        ([f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"], [f"{attn}.o_proj"]),
        ([f"{mlp}.gate_proj", f"{mlp}.up_proj"], [f"{mlp}.down_proj"]),
    ]
    assert len(the_plan.regions) == 4
    assert [d.site for d in the_plan.declined] == ["lm_head"]
    assert "reaches the model output" in the_plan.declined[0].reason
    # one all-reduce of (batch, seq, hidden) fp32 per row-parallel linear
    assert the_plan.communication() == [(f"model.layers.{i}.{m}", 1 * 8 * 64 * 4)
                                        for i in range(2) for m in ("self_attn.o_proj", "mlp.down_proj")]
    # the sharded weights: q, k, v, o, gate, up, down of both layers
    per_layer = (64 * 64 + 2 * 32 * 64 + 64 * 64 + 3 * 128 * 64) * 4
    assert the_plan.sharded_weight_bytes(gm) == 2 * per_layer


def test_gpt2_fused_c_attn_is_sharded_per_q_k_v():
    the_plan, _ = parallel.plan(*tiny_gpt2(), world_size=2)
    assert regions(the_plan)[0] == (["transformer.h.0.attn.c_attn"], ["transformer.h.0.attn.c_proj"])
    assert regions(the_plan)[1] == (["transformer.h.0.mlp.c_fc"], ["transformer.h.0.mlp.c_proj"])
    site, blocks = the_plan.regions[0].columns[0]
    assert site.kind == "addmm" and blocks == (64, 64, 64)  # Conv1D: q, k, v each split over the ranks


def test_nanogpt_hard_coded_head_count_is_rewritten():
    model, args = nanogpt(n_layer=1, n_embd=64, seq=8)
    the_plan, _ = parallel.plan(model, args, world_size=2)
    attn = the_plan.regions[0]
    edits = {(n.name, k): v for n, k, v in attn.arg_edits}
    # view(B, T, n_head, C // n_head) is hard-coded as [1, 8, 4, 16] in the graph: local head count 2
    assert [v for (name, _), v in edits.items() if name.startswith("view")].count([1, 8, 2, 16]) == 3
    assert [1, 8, 32] in edits.values()  # y.view(B, T, C) with the local C
    assert edits[("split", 1)] == 32  # qkv.split(n_embd): each of q, k, v halves


def test_head_count_not_divisible_is_a_clear_error():
    model, args = nanogpt(n_layer=1, n_embd=48, n_head=3, seq=8)
    with pytest.raises(ShardingError, match=r"3 attention heads .* cannot be divided among 2 processes; "
                                            r"use a world size that divides 3"):
        parallel.plan(model, args, world_size=2)


def test_kv_head_count_not_divisible_is_a_clear_error():
    with pytest.raises(ShardingError, match="2 attention heads .* among 4 processes"):
        parallel.plan(*tiny_llama(heads=4, kv_heads=2, layers=1), world_size=4)


class CumsumFFN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        return self.down(torch.cumsum(self.up(x), dim=-1))


def test_op_mixing_features_is_declined_with_the_reason():
    the_plan, _ = parallel.plan(CumsumFFN().eval(), (torch.randn(2, 16),), world_size=2)
    assert not the_plan.regions
    assert any("cumsum is not known to act per head / per feature" in d.reason for d in the_plan.declined)


class ScaledFFN(nn.Module):
    """An FFN with a hand-written per-feature scale: the constant is sharded with the features."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(16, 32))
        self.scale = nn.Parameter(torch.randn(32))
        self.w2 = nn.Parameter(torch.randn(32, 16))

    def forward(self, x):
        return torch.relu(x @ self.w1 * self.scale) @ self.w2


def test_matmul_with_constant_weights_and_feature_constants():
    the_plan, _ = parallel.plan(ScaledFFN().eval(), (torch.randn(2, 3, 16),), world_size=2)
    assert len(the_plan.regions) == 1
    region = the_plan.regions[0]
    assert [s.kind for s, _ in region.columns] == ["matmul"] and [s.kind for s, _ in region.rows] == ["matmul"]
    assert [str(c.target) for _, _, c, _, _ in region.const_edits] == ["scale"]


def test_shard_tensor_takes_the_rank_part_of_every_block():
    t = torch.arange(12.0)
    assert shard_tensor(t, 0, (6, 3, 3), 1, 3).tolist() == [2.0, 3.0, 7.0, 10.0]
    assert shard_tensor(t, 0, (12,), 0, 2).tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


def test_pass_declines_without_torch_distributed():
    model, args = nanogpt(n_layer=1, n_embd=64, seq=8)
    cap = graphopt.capture(model, args)
    ctx = OptimizeContext(args=cap.args, flat_inputs=ir.flat_inputs(cap.args, {}, cap.module))
    result = TensorParallel()(ir.copy_graph_module(cap.module), ctx)
    assert not result.modified
    assert "graphopt run --nproc" in result.declined[0].reason


def test_shard_without_process_group_says_what_to_do():
    model, args = nanogpt(n_layer=1, n_embd=64, seq=8)
    with pytest.raises(RuntimeError, match="init_process_group"):
        parallel.shard(model, args)


def test_communication_table_scales_as_a_ring_all_reduce():
    the_plan, _ = parallel.plan(*tiny_llama(layers=1), world_size=2)
    rows = parallel.communication_table(the_plan, world_sizes=(2, 8))
    assert [r["row_linear"] for r in rows] == ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"]
    size = 1 * 8 * 64 * 4
    assert all(r["allreduce_bytes"] == size and r["ring_bytes_per_rank_w2"] == size
               and r["ring_bytes_per_rank_w8"] == int(2 * 7 / 8 * size) for r in rows)


def test_merged_qkv_is_sharded_block_by_block():
    from graphopt.passes.merge_matmuls import MergeDecision, MergeMatmuls

    model, args = tiny_llama(layers=1)
    merged = graphopt.optimize(model, args, passes=[MergeMatmuls(decide=lambda c: MergeDecision(True, "test"))])
    the_plan, _ = parallel.plan(merged, world_size=2)
    attn, mlp = the_plan.regions
    (site, blocks), = attn.columns
    assert site.label == "model.layers.0.self_attn.q_proj+k_proj+v_proj" and blocks == (64, 32, 32)
    assert mlp.columns[0][1] == (128, 128)
    edits = {(n.target.__name__, k): v for n, k, v in attn.arg_edits}
    assert edits[("split_with_sizes.default", 1)] == [32, 16, 16]
