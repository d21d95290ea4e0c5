"""A tiny transformers Llama and a left-padded batch of prompts for it, shared by the compiled-decode tests."""

from __future__ import annotations

import torch

VOCAB = 320


def tiny_llama(layers: int = 2) -> torch.nn.Module:
    """A Llama from a config (random weights, seed 0): ``layers`` layers, hidden 64, 4 heads / 2 KV heads."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(num_hidden_layers=layers, hidden_size=64, intermediate_size=128,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                      max_position_embeddings=128)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def padded_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Three 10-token prompts, the second left-padded by 4: ``(input_ids, attention_mask)``."""
    ids = torch.randint(1, VOCAB, (3, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    ids[mask == 0] = 0
    return ids, mask
