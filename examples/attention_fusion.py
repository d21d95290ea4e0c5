"""Walk-through: find the attention in GPT-2 and fuse it into scaled_dot_product_attention.

Hugging Face's "eager" attention (the implementation models fall back to for
export, custom masks or attention weights) materialises the T x T score
matrix. graphopt finds every attention site in the captured graph and
rewrites it into ``torch.nn.functional.scaled_dot_product_attention`` (the
fused flash / memory-efficient kernels), with the causal mask turned into
``is_causal=True``.

    python examples/attention_fusion.py

Runs in a few seconds on a CPU; the model is built from a config with random
weights (no download).
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers

import graphopt
from graphopt.passes.analysis.sites import find_attention_sites


def build_gpt2(seq: int) -> tuple[torch.nn.Module, torch.Tensor]:
    config = transformers.GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=1000, n_positions=seq,
                                     use_cache=False, bos_token_id=0, eos_token_id=0)
    config._attn_implementation = "eager"  # hand-written attention: softmax(q @ k^T / sqrt(d) + mask) @ v
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    return model, torch.randint(0, 1000, (1, seq))


def median_ms(fn, runs: int = 10) -> float:
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description="find and fuse the attention in GPT-2")
    parser.add_argument("--seq", type=int, default=256, help="sequence length of the example input")
    seq = parser.parse_args().seq
    model, input_ids = build_gpt2(seq)

    # 1. What the analysis sees: one site per layer, with its q/k/v, scale, mask and causality.
    captured = graphopt.capture(model, (input_ids,))
    print("attention sites in the captured graph:")
    for site in find_attention_sites(captured.module):
        print("  ", site.describe())
        print(f"      q={site.q.name} k={site.k.name} v={site.v.name} mask={site.mask_kind}"
              f" -> is_causal={site.is_causal}")

    # 2. Optimize: cleanup (folds the constant causal mask), fuse attention, cleanup again.
    #    Every rewrite is checked against the original model on the example and fresh inputs.
    result = graphopt.optimize(model, (input_ids,))
    record = result.report.record("fuse_attention")
    print(f"\nfuse_attention: {record.status}")
    for note in record.notes:
        print("  ", note)
    print("final check:", result.report.final_numerics.summary())

    # 3. The optimized module is called like the model and returns the same outputs.
    fresh = torch.randint(0, 1000, input_ids.shape)
    with torch.no_grad():
        ref, out = model(fresh).logits, result.module(fresh).logits
        print(f"\nmax |difference| on fresh tokens: {float((ref - out).abs().max()):.2e}")
        print(f"latency (median of 10, this machine): eager {median_ms(lambda: model(fresh)):.1f} ms, "
              f"graphopt {median_ms(lambda: result.module(fresh)):.1f} ms")

    # 4. Why didn't my attention fuse? Ask for the attention weights: they must be materialised,
    #    and the report says so for each site.
    weights_model = build_gpt2(seq)[0]
    result = graphopt.optimize(weights_model, (input_ids,), {"output_attentions": True})
    print("\nwith output_attentions=True:")
    for declined in result.report.record("fuse_attention").declined:
        print(f"   {declined.site}: {declined.reason}")


if __name__ == "__main__":
    main()
