"""Greedy generation equals transformers' generate across decoder architectures no other test names.

Each model is a tiny random one from its config; graphopt's tokens are compared with the model's own
``generate`` (default dynamic cache) at batch 1 and on a left-padded batch of 3.
"""

from __future__ import annotations

import pytest
import torch

import graphopt

transformers = pytest.importorskip("transformers")

VOCAB = 256
COMMON = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=128, head_dim=16)
CONFIGS = {
    "gpt_neox": ("GPTNeoXConfig", COMMON),  # parallel residual, partial rotary
    "gptj": ("GPTJConfig", dict(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=128, rotary_dim=8)),
    "opt": ("OPTConfig", dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, ffn_dim=128,
                              vocab_size=VOCAB, max_position_embeddings=128, word_embed_proj_dim=64)),
    "bloom": ("BloomConfig", dict(n_layer=2, hidden_size=64, n_head=4, vocab_size=VOCAB)),  # ALiBi
    "falcon": ("FalconConfig", dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=VOCAB,
                                    new_decoder_architecture=True, num_kv_heads=2)),
    "gemma2": ("Gemma2Config", {**COMMON, "sliding_window": 64}),  # soft-capping, local/global layers
    "qwen3": ("Qwen3Config", COMMON),  # q/k norms
    "mixtral": ("MixtralConfig", {**COMMON, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "gpt_bigcode": ("GPTBigCodeConfig", dict(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=128)),
    "phi3": ("Phi3Config", COMMON),
}


def build(name: str) -> torch.nn.Module:
    cls, params = CONFIGS[name]
    config = getattr(transformers, cls)(**params)
    for token in ("pad_token_id", "bos_token_id", "eos_token_id"):  # defaults of full-size vocabularies
        if isinstance(getattr(config, token, None), int) and getattr(config, token) >= VOCAB:
            setattr(config, token, 0)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_greedy_tokens_equal_transformers(name):
    model = build(name)
    graphs = graphopt.prepare_generation(model, max_length=64)
    ids = torch.randint(1, VOCAB, (3, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :6] = 0
    ids[mask == 0] = 0
    for rows in (slice(0, 1), slice(0, 3)):
        expected = model.generate(ids[rows], attention_mask=mask[rows], max_new_tokens=12, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)
        got = graphs.generate(ids[rows], attention_mask=mask[rows], max_new_tokens=12, eos_token_id=None,
                              pad_token_id=0)
        assert torch.equal(got, expected), f"{name}: rows {rows}"
