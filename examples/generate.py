"""Generate with a transformers causal LM through graphopt: a KV cache, prefill and decode graphs.

    python examples/generate.py                      # a small Llama, fp32, checked against model.generate
    python examples/generate.py --precision int8wo   # int8 weights for the bandwidth-bound decode step
    python examples/generate.py --batch 4            # a left-padded batch of prompts of different lengths
    python examples/generate.py --compile            # decode through torch.compile (seconds to compile)
    python examples/generate.py --compile aot        # decode compiled ahead of time by AOTInductor (15-30 s)

The model is built from a config with random weights (never a download), so
its text is noise: what this shows is the API, the speed, and that greedy
tokens equal transformers' own ``generate`` at fp32.
"""

from __future__ import annotations

import argparse

import torch
import transformers

import graphopt
from graphopt.generate.measure import time_generation


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--precision", default=None, help="bf16, int8, int8wo, int4 or auto (default: fp32)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--compile", nargs="?", const="jit", choices=["jit", "aot"],
                   help="run the decode graph through torch.compile, or with 'aot' AOTInductor")
    args = p.parse_args()

    torch.manual_seed(0)
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=256, intermediate_size=688,
                                      num_attention_heads=8, num_key_value_heads=2, vocab_size=4000)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()   # default config: use_cache=True

    # Prompts of different lengths, left-padded (as tokenizer.padding_side = "left" gives them).
    lengths = [12 - 3 * row for row in range(args.batch)] if args.batch > 1 else [12]
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, -n:] = torch.randint(1, config.vocab_size, (n,))
        mask[row, -n:] = 1

    options = {"precision": args.precision} if args.precision else {}
    result = graphopt.optimize(model, (ids[:1].repeat(2, 1),), {"use_cache": False}, **options)
    # the prefill and decode graphs, checked on real steps (compile_decode: decode through torch.compile, or
    # "aot": AOTInductor)
    compile_decode = {"jit": True, "aot": "aot"}.get(args.compile, False)
    graphs = result.prepare_generation(compile_decode=compile_decode)
    print(graphs.check.summary(), *graphs.notes)

    tokens = result.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens, do_sample=False,
                              pad_token_id=0)
    agree = (tokens[:, ids.shape[1]:] == expected[:, ids.shape[1]:]).float().mean().item()
    print(f"greedy tokens equal to transformers' generate: {torch.equal(tokens, expected)} ({agree:.0%} agree)")

    ours = time_generation(result.generate, ids, mask, args.new_tokens, eos_token_id=None)
    theirs = time_generation(model.generate, ids, mask, args.new_tokens, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    print(f"decode: graphopt {ours.decode_ms:.2f} ms/token, transformers {theirs.decode_ms:.2f} ms/token "
          f"({theirs.decode_ms / ours.decode_ms:.2f}x)")

    sampled = result.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, temperature=0.8,
                              top_p=0.9, generator=torch.Generator().manual_seed(0))
    print("sampled:", sampled[0, ids.shape[1]:].tolist())


if __name__ == "__main__":
    main()
