"""Fit a T5 encoder with a relative-position bias into a memory budget.

The eager encoder materialises a (heads, T, T) bias and (heads, T, T) scores
per layer. With ``memory_budget`` graphopt's ``blocked`` pass rewrites the
attention into ``graphopt.blocked_attention`` calls over query blocks, each
recomputing its rows of the bias, so the peak activation memory fits the
budget; the result is checked against the original model.

    python examples/memory_budget.py            # seq 1024
    python examples/memory_budget.py --seq 2048 --fraction 0.2
"""

from __future__ import annotations

import argparse

import torch
from transformers import T5Config, T5EncoderModel

import graphopt
from graphopt import ir
from graphopt.passes.analysis.blocked_liveness import memory_profile


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--fraction", type=float, default=0.25, help="budget as a fraction of the eager peak")
    args = p.parse_args()

    torch.manual_seed(0)
    config = T5Config(d_model=128, d_kv=32, d_ff=512, num_layers=2, num_heads=4, vocab_size=1000,
                      attn_implementation="eager", use_cache=False)
    model = T5EncoderModel(config).eval()
    input_ids = torch.randint(0, 1000, (1, args.seq))

    # the predicted eager peak (liveness over the captured graph) sizes the budget
    captured = graphopt.capture(model, (input_ids,))
    ir.refresh_meta(captured.module, [input_ids])
    eager_peak = memory_profile(captured.module).peak_bytes
    budget = int(eager_peak * args.fraction)
    print(f"predicted eager peak {eager_peak / 2**20:.1f} MiB; budget {budget / 2**20:.1f} MiB")

    try:
        result = graphopt.optimize(model, (input_ids,), memory_budget=budget)
    except graphopt.passes.blocked.BudgetError as err:
        print(f"cannot fit: {err}")
        return
    for note in result.report.record("blocked").notes:
        print("  " + note)
    print(f"numerics vs the original model: {result.report.final_numerics.summary()}")
    with torch.no_grad():
        out = result.module(input_ids).last_hidden_state
        ref = model(input_ids).last_hidden_state
    print(f"max |blocked - eager| = {float((out - ref).abs().max()):.2e}")


if __name__ == "__main__":
    import graphopt.passes  # noqa: F401  (graphopt.passes.blocked for BudgetError)

    main()
