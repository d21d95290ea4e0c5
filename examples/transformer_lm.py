"""Optimize a small transformer language model and print graphopt's report.

    python examples/transformer_lm.py                 # GPT-2, 2 layers, random weights
    python examples/transformer_lm.py --family llama  # Llama with grouped-query attention
    python examples/transformer_lm.py --out out/lm    # also save model.pt2 + report.json

The model is built from a transformers config with random weights (nothing is
downloaded), with eager attention and no KV cache, as graphopt expects.
"""

from __future__ import annotations

import argparse

import torch

import graphopt


def build(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=1000, n_positions=128,
                            bos_token_id=0, eos_token_id=0, use_cache=False, attn_implementation="eager")
        return GPT2LMHeadModel(config).eval()
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=2, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1000, max_position_embeddings=128,
                         bos_token_id=0, eos_token_id=0, use_cache=False, attn_implementation="eager")
    return LlamaForCausalLM(config).eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=["gpt2", "llama"], default="gpt2")
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--out", help="directory to save model.pt2 and report.json")
    args = parser.parse_args(argv)

    model = build(args.family)
    input_ids = torch.randint(0, model.config.vocab_size, (1, args.seq))

    result = graphopt.optimize(model, (input_ids,))      # capture, rewrite, verify each pass
    print(result.report)

    # the optimized module is called like the model and returns the same ModelOutput
    fresh = torch.randint(0, model.config.vocab_size, (1, args.seq))
    with torch.no_grad():
        expected, got = model(fresh).logits, result.module(fresh).logits
    rel = float((expected - got).norm() / expected.norm())
    print(f"{type(result.module(fresh)).__name__}: logits relative L2 vs the original on a fresh input: {rel:.1e}")
    if args.out:
        paths = result.save(args.out)
        print("wrote", ", ".join(paths.values()))


if __name__ == "__main__":
    main()
