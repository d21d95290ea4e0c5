"""KV-cache ONNX export: greedy tokens in onnxruntime equal torch's (fp32), tiny random models."""

import numpy as np
import pytest
import torch
from transformers import (
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from graphopt.onnx.kv_cache import OrtKVGenerator, export_kv_onnx

NEW = 32


def _models():
    yield "gpt2", lambda: GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128))
    yield "llama_gqa", lambda: LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                                            num_attention_heads=4, num_key_value_heads=2,
                                                            vocab_size=128))
    yield "qwen2", lambda: Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    # mixture of experts: the grouped matmul's translation (graphopt.onnx.moe) in the KV-cache graph
    yield "mixtral", lambda: MixtralForCausalLM(MixtralConfig(
        num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=4, num_experts_per_tok=2, vocab_size=128))
    yield "deepseek_v3", lambda: DeepseekV3ForCausalLM(DeepseekV3Config(
        num_hidden_layers=2, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_attention_heads=4,
        num_key_value_heads=4, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=16, vocab_size=128))


def _torch_greedy(model, ids, mask):
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW,
                             do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:].numpy()


@pytest.mark.parametrize("name,make", list(_models()), ids=[n for n, _ in _models()])
def test_ort_greedy_matches_torch(name, make, tmp_path):
    torch.manual_seed(0)
    model = make().eval()
    model.generation_config.eos_token_id = None
    path = export_kv_onnx(model, tmp_path / f"{name}.onnx")
    gen = OrtKVGenerator(path)
    for prompt in (5, 11):
        ids = torch.randint(1, 128, (2, prompt))
        mask = torch.ones_like(ids)
        mask[1, :2] = 0  # row 1 left-padded
        ids[1, :2] = 0
        want = _torch_greedy(model, ids, mask)
        got = gen.generate(ids.numpy(), mask.numpy(), NEW).tokens
        assert got.shape == (2, NEW)
        np.testing.assert_array_equal(got, want)
