"""Benchmark graphopt's parallel operators.

1. Horizontal fusion (merge_matmuls) on a transformers Llama (random weights):
   - the matmul shapes alone: separate q/k/v (gate/up) against the merged one,
     as the pass's micro-benchmark measures them;
   - end to end: the model after cleanup against cleanup + merge_matmuls
     (forced on), timed in alternating rounds in one process;
   - what the default (measuring) pass decides on this machine.
2. Tensor parallel: the same model on 2 gloo processes (``graphopt run``):
   per-rank weight memory and latency against one process.

    python benchmarks/parallel.py                 # CPU
    python benchmarks/parallel.py --device cuda   # fusion on the GPU (tensor parallel needs 2 GPUs: nccl)

Every ratio is measured side by side in one run; a shared machine makes the
absolute numbers noisy (rerun on a quiet machine before quoting them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

import graphopt
from graphopt.passes import cleanup_pipeline
from graphopt.passes.merge_matmuls import MergeMatmuls, MergeShape, measure_merge


def llama(hidden: int, layers: int, heads: int, kv_heads: int, ffn: int, seq: int, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, intermediate_size=ffn, vocab_size=1024, use_cache=False,
                      attn_implementation="eager")
    model = LlamaForCausalLM(cfg).eval().to(device)
    return model, (torch.randint(0, 1024, (1, seq), device=device),)


def spec_of(a: argparse.Namespace) -> str:
    return (f"hf:llama?hidden_size={a.hidden}&num_hidden_layers={a.layers}&num_attention_heads={a.heads}"
            f"&num_key_value_heads={a.kv_heads}&intermediate_size={a.ffn}&vocab_size=1024&seq={a.seq}")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(fns: dict[str, Any], args: tuple, rounds: int, iters: int, device: str) -> dict[str, float]:
    """Median seconds per call of each function, timed in alternating rounds."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn(*args)
        for _ in range(rounds):
            for name, fn in fns.items():
                sync(device)
                start = time.perf_counter()
                for _ in range(iters):
                    fn(*args)
                sync(device)
                times[name].append((time.perf_counter() - start) / iters)
    return {k: statistics.median(v) for k, v in times.items()}


def fusion(a: argparse.Namespace) -> dict[str, Any]:
    model, args = llama(a.hidden, a.layers, a.heads, a.kv_heads, a.ffn, a.seq, a.device)
    head_dim = a.hidden // a.heads
    dtype = torch.float32
    shapes = {
        "q/k/v": MergeShape(a.seq, a.hidden, (a.hidden, a.kv_heads * head_dim, a.kv_heads * head_dim), dtype,
                            False, a.device),
        "gate/up": MergeShape(a.seq, a.hidden, (a.ffn, a.ffn), dtype, False, a.device),
    }
    micro = {}
    for name, shape in shapes.items():
        sep, merged = measure_merge(shape, rounds=a.rounds, budget_seconds=2.0)
        micro[name] = {"shape": shape.describe(), "separate_us": sep * 1e6, "merged_us": merged * 1e6,
                       "speedup": sep / merged}
    base = graphopt.optimize(model, args, passes=cleanup_pipeline())
    forced = graphopt.optimize(model, args, passes=cleanup_pipeline() + [MergeMatmuls()],
                               merge_matmuls_policy="always")
    measured = graphopt.optimize(model, args, passes=cleanup_pipeline() + [MergeMatmuls()])
    record = measured.report.record("merge_matmuls")
    t = interleaved({"separate": base.module, "merged": forced.module}, args, a.rounds, a.iters, a.device)
    return {
        "micro": micro,
        "end_to_end": {"separate_ms": t["separate"] * 1e3, "merged_ms": t["merged"] * 1e3,
                       "speedup": t["separate"] / t["merged"]},
        "numerics_ok": bool(forced.report.final_numerics and forced.report.final_numerics.ok),
        "default_pass": {"status": record.status, "merged": record.notes,
                         "declined": [f"{d.site}: {d.reason}" for d in record.declined]},
    }


def tensor_parallel(a: argparse.Namespace) -> dict[str, Any]:
    from graphopt.launch import run_sharded

    backend = "nccl" if a.device.startswith("cuda") else "gloo"
    r = run_sharded(spec_of(a), 2, backend=backend, iters=a.iters * a.rounds, timeout=600)
    return r.to_dict()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--ffn", type=int, default=1408)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, help="torch threads of the one-process runs (ranks get cpu_count // 2)")
    p.add_argument("--skip-tp", action="store_true", help="only the horizontal fusion part")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    out: dict[str, Any] = {"device": a.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
                           "model": spec_of(a), "fusion": fusion(a)}
    if not a.skip_tp and (a.device == "cpu" or torch.cuda.device_count() >= 2):
        out["tensor_parallel"] = tensor_parallel(a)
    if a.json:
        print(json.dumps(out, indent=2))
        return
    f = out["fusion"]
    print(f"model: {out['model']} on {a.device} ({out['threads']} threads), torch {out['torch']}")
    print("\n## Horizontal fusion (merge_matmuls)\n")
    print("| matmuls | shape | separate | merged | speedup |\n|---|---|---|---|---|")
    for name, m in f["micro"].items():
        print(f"| {name} | {m['shape']} | {m['separate_us']:.1f} us | {m['merged_us']:.1f} us | {m['speedup']:.2f}x |")
    e = f["end_to_end"]
    print(f"| whole model | seq {a.seq} | {e['separate_ms']:.2f} ms | {e['merged_ms']:.2f} ms | {e['speedup']:.2f}x |")
    print(f"\nnumerics of the merged model: {'ok' if f['numerics_ok'] else 'FAILED'}")
    print(f"default pass (measuring) on this machine: {f['default_pass']['status']}")
    for line in f["default_pass"]["merged"] + f["default_pass"]["declined"]:
        print(f"  - {line}")
    if "tensor_parallel" in out:
        t = out["tensor_parallel"]
        print("\n## Tensor parallel, 2 processes\n")
        print("| process | weights | sharded weights | latency | threads |\n|---|---|---|---|---|")
        mib = 2**20
        print(f"| 1 process | {t['single_weight_bytes'] / mib:.2f} MiB | {t['sharded_weights_full_bytes'] / mib:.2f} MiB "
              f"| {t['single_latency_s'] * 1e3:.2f} ms | {t['single_threads']} |")
        for r in t["ranks"]:
            print(f"| rank {r['rank']} | {r['weight_bytes'] / mib:.2f} MiB | {r['sharded_weight_bytes'] / mib:.2f} MiB "
                  f"| {r['latency_s'] * 1e3:.2f} ms | {r['threads']} |")
        print(f"\nmax abs vs 1 process: {t['max_abs']:.2e}; all-reduced per forward: "
              f"{t['allreduce_bytes_per_forward'] / 1024:.0f} KiB in {len(t['regions'])} all-reduces")


if __name__ == "__main__":
    main()
