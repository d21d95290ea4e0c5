"""Reduced precision: latency, output error and top-1 agreement, side by side.

CPU (default): a BERT-base-like encoder (transformers BertModel, 12 layers,
hidden 768, 12 heads, intermediate 3072) at batch 8, seq 128, and GPT-2
(GPT2LMHeadModel, 12 layers, hidden 768) at batch 4, seq 128:
fp32 vs ``precision="int8"`` vs ``precision="auto"``.

CUDA (``--device cuda``): a Llama (8 layers, hidden 2048, 32 heads, 8 KV heads)
at batch 4, seq 512: fp32 vs bf16 vs fp8 vs auto.

Every variant is timed in the same process, round-robin (median over runs
after warm-up), so the ratios are comparable even on a busy machine; errors
are measured on fresh inputs (not the example the plan was searched on):
relative L2 of the last hidden state (BERT) or logits (LMs), and top-1
agreement of the LM logits. Models have random weights (configs only).

    python benchmarks/precision.py                  # CPU: BERT + GPT-2
    python benchmarks/precision.py --model bert --runs 10
    python benchmarks/precision.py --device cuda    # GPU: Llama
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import graphopt  # noqa: E402
from graphopt.verify import ErrorBudget  # noqa: E402


def bert(device: str, quick: bool):
    from transformers import BertConfig, BertModel

    layers, hidden, heads, inter, batch, seq = (2, 256, 4, 1024, 2, 32) if quick else (12, 768, 12, 3072, 8, 128)
    cfg = BertConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                     intermediate_size=inter, attn_implementation="eager")
    model = BertModel(cfg).eval().to(device)
    make = lambda g: (torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(device),)  # noqa: E731
    return model, make, lambda out: out.last_hidden_state, False, f"BertModel {layers}x{hidden}, batch {batch}, seq {seq}"


def gpt2(device: str, quick: bool):
    from transformers import GPT2Config, GPT2LMHeadModel

    layers, hidden, heads, batch, seq = (2, 128, 4, 2, 32) if quick else (12, 768, 12, 4, 128)
    cfg = GPT2Config(n_layer=layers, n_embd=hidden, n_head=heads, attn_implementation="eager", use_cache=False)
    model = GPT2LMHeadModel(cfg).eval().to(device)
    make = lambda g: (torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(device),)  # noqa: E731
    return model, make, lambda out: out.logits, True, f"GPT2LMHeadModel {layers}x{hidden}, batch {batch}, seq {seq}"


def llama(device: str, quick: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    layers, hidden, heads, kv, inter, batch, seq = (2, 256, 8, 2, 688, 2, 64) if quick else \
        (8, 2048, 32, 8, 5632, 4, 512)
    cfg = LlamaConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                      num_key_value_heads=kv, intermediate_size=inter, vocab_size=32000,
                      attn_implementation="eager", use_cache=False)
    model = LlamaForCausalLM(cfg).eval().to(device)
    make = lambda g: (torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(device),)  # noqa: E731
    return model, make, lambda out: out.logits, True, \
        f"LlamaForCausalLM {layers}x{hidden}, {heads} heads / {kv} kv, batch {batch}, seq {seq}"


def time_round_robin(fns: dict, runs: int, warmup: int, device: str) -> dict[str, float]:
    samples = {k: [] for k in fns}
    with torch.no_grad():
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        for _ in range(runs):
            for name, fn in fns.items():
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn()
                if device == "cuda":
                    torch.cuda.synchronize()
                samples[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


def errors(reference, candidate, is_lm: bool) -> tuple[float, float | None]:
    r, c = reference.double(), candidate.double()
    rel = float((c - r).norm() / r.norm())
    top1 = float((reference.argmax(-1) == candidate.argmax(-1)).float().mean()) if is_lm else None
    return rel, top1


def run_model(name: str, builder, modes: list[str], args: argparse.Namespace) -> dict:
    model, make, pick, is_lm, desc = builder(args.device, args.quick)
    example = make(torch.Generator().manual_seed(0))
    fresh = make(torch.Generator().manual_seed(123))
    budget = ErrorBudget(rel_l2=args.error_budget, top1=args.top1 if is_lm else None)
    variants = {"fp32": model}
    notes = {}
    for mode in modes:
        t0 = time.perf_counter()
        result = graphopt.optimize(model, example, precision=mode, error_budget=budget,
                                   n_random_inputs=args.random_inputs)
        rec = result.report.record("precision")
        counts = {}
        for e in result.report.extra.get("precision", []):
            counts[e["precision"]] = counts.get(e["precision"], 0) + 1
        notes[mode] = {"status": rec.status if rec else "?", "optimize_s": round(time.perf_counter() - t0, 1),
                       "nodes": counts, "notes": (rec.notes[:3] + [n for n in rec.notes if "whole model" in n])
                       if rec else []}
        if rec and rec.status == "rolled back":
            notes[mode]["reason"] = rec.numerics.reason if rec.numerics else rec.error
        variants[mode] = result.module
    with torch.no_grad():
        ref = pick(model(*fresh))
        errs = {k: errors(ref, pick(m(*fresh)), is_lm) for k, m in variants.items()}
    fns = {k: (lambda m=m: m(*example)) for k, m in variants.items()}
    times = time_round_robin(fns, args.runs, args.warmup, args.device)
    rows = []
    for k in variants:
        rel, top1 = errs[k]
        rows.append({"variant": k, "ms": round(times[k] * 1e3, 1), "speedup": round(times["fp32"] / times[k], 2),
                     "rel_l2": rel, "top1": top1, **({"plan": notes[k]} if k in notes else {})})
    return {"model": name, "description": desc, "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", default="all", help="bert, gpt2 (CPU), llama (CUDA) or all")
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--error-budget", type=float, default=2e-2)
    p.add_argument("--top1", type=float, default=0.9, help="top-1 agreement budget for LMs")
    p.add_argument("--random-inputs", type=int, default=1, help="fresh input sets the search checks besides the example")
    p.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    if args.device == "cuda":
        models, modes = {"llama": llama}, ["bf16", "fp8", "auto"]
    else:
        models, modes = {"bert": bert, "gpt2": gpt2}, ["int8", "auto"]
    chosen = list(models) if args.model == "all" else args.model.split(",")
    results = []
    print(f"# precision benchmark: torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""))
    for name in chosen:
        res = run_model(name, models[name], modes, args)
        results.append(res)
        print(f"\n## {res['description']}")
        print("| variant | latency ms | speedup vs fp32 | rel L2 | top-1 | plan |")
        print("| --- | --- | --- | --- | --- | --- |")
        for r in res["rows"]:
            plan = r.get("plan", {})
            summary = ", ".join(f"{k}: {v}" for k, v in sorted(plan.get("nodes", {}).items()))
            status = plan.get("status", "")
            top1 = "" if r["top1"] is None else f"{r['top1']:.4f}"
            print(f"| {r['variant']} | {r['ms']} | {r['speedup']}x | {r['rel_l2']:.2e} | {top1} | "
                  f"{status}{' (' + summary + ')' if summary else ''} |")
        for r in res["rows"]:
            for n in r.get("plan", {}).get("notes", []):
                print(f"  - {r['variant']}: {n[:400]}")
            if r.get("plan", {}).get("reason"):
                print(f"  - {r['variant']} rolled back: {r['plan']['reason']}")
        sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
