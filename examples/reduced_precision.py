"""Reduced precision within an error budget: int8 and auto on a small GPT-2.

    python examples/reduced_precision.py

Optimizes a GPT-2 (random weights, from a config) with ``precision="int8"``
and ``precision="auto"`` under an error budget (relative L2 of the logits and
top-1 agreement), prints the target's capabilities (``auto`` measures bf16
only where the CPU has native bf16 units), which nodes were converted and
which stayed fp32 and why, checks the result on fresh inputs, and saves it
as a .pt2.
"""

from __future__ import annotations

import tempfile
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import graphopt


def main() -> None:
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=256, n_head=4, vocab_size=2048,
                     bos_token_id=0, eos_token_id=0, attn_implementation="eager", use_cache=False)
    model = GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (4, 64))
    budget = graphopt.ErrorBudget(rel_l2=0.02, top1=0.9)

    for precision in ("int8", "auto"):
        result = graphopt.optimize(model, (ids,), precision=precision, error_budget=budget)
        record = result.report.record("precision")
        print(f"\n=== precision={precision}: pass {record.status}")
        for note in record.notes:  # the target's capabilities, the int8 input shift, the search
            if note.startswith(("target", "int8 input shift", "bf16 not considered", "search")):
                print(f"  {note[:160]}")
        for entry in result.report.extra.get("precision", []):
            print(f"  {entry['node']:<12} {entry['module'] or '-':<24} {entry['precision']:<5} {entry['reason'][:90]}")
        fresh = torch.randint(0, cfg.vocab_size, (4, 64), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            t0 = time.perf_counter()
            ref = model(fresh).logits
            t1 = time.perf_counter()
            out = result.module(fresh).logits
            t2 = time.perf_counter()
        rel = float((out - ref).norm() / ref.norm())
        top1 = float((out.argmax(-1) == ref.argmax(-1)).float().mean())
        print(f"  fresh inputs: rel L2 {rel:.2e}, top-1 agreement {top1:.3f} "
              f"(one call: fp32 {1e3 * (t1 - t0):.1f} ms, optimized {1e3 * (t2 - t1):.1f} ms; noisy)")
        with tempfile.TemporaryDirectory() as d:
            paths = result.save(d)
            reloaded = graphopt.load(d)  # the ModelOutput rebuilt from graphopt.json
            assert torch.allclose(reloaded(fresh).logits, out)
            print(f"  saved and reloaded {paths['pt2'].rsplit('/', 1)[-1]}: same outputs")


if __name__ == "__main__":
    main()
