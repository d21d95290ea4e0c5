"""Attention fusion benchmark: eager attention vs graphopt vs sdpa vs torch.compile, in one process.

For each model (transformers GPT-2 and Llama, and the encoders with an
attention bias, T5's encoder, MPNet and DeBERTa-v2, called with a padding
mask; each built from a config with random weights, no download) it builds the model with ``attn_implementation="eager"``
and measures, side by side:

* ``eager``     -- the model as built (hand-written attention, T x T scores);
* ``graphopt``  -- ``graphopt.optimize(eager_model, ...)``.module;
* ``sdpa``      -- the same weights loaded into ``attn_implementation="sdpa"``;
* ``compile``   -- ``torch.compile`` of the eager model.

Each: median latency (wall time, and the process's CPU time, steadier on a
shared machine) over ``--runs`` (>= 10) calls after ``--warmup`` calls, the
variants' calls interleaved so load changes hit them alike; and peak memory
of one call above what was allocated before it (CUDA: the caching
allocator's peak; CPU: the allocations torch's profiler records). Printed as
absolute figures and ratios to eager, plus the time ``optimize()`` took and
the time the first compiled call took (compilation).

    python benchmarks/attention.py                       # CPU: GPT-2 and Llama, 2 layers, d=256, seq 1024
    python benchmarks/attention.py --models gpt2         # the issue's CPU target case only
    python benchmarks/attention.py --models t5,mpnet,deberta   # learned / computed biases, with padding
    python benchmarks/attention.py --device cuda --dtype bfloat16   # GPU: Llama 8 layers, hidden 2048, seq 8192

The models are the base transformer stacks (``GPT2Model``, ``LlamaModel``,
``T5EncoderModel``, ``MPNetModel``, ``DebertaV2Model``: no LM head), so the figures are about attention and the layers around it,
not a vocabulary projection.
"""

from __future__ import annotations

import argparse
import gc
import logging

import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

CPU_SIZES = {
    "gpt2": dict(layers=2, hidden=256, heads=4, kv_heads=4, seq=1024),
    "llama": dict(layers=2, hidden=256, heads=4, kv_heads=2, seq=1024),
    "t5": dict(layers=2, hidden=256, heads=4, kv_heads=4, seq=1024),
    "mpnet": dict(layers=2, hidden=256, heads=4, kv_heads=4, seq=1024),
    "deberta": dict(layers=2, hidden=256, heads=4, kv_heads=4, seq=1024),
}
CUDA_SIZES = {
    "gpt2": dict(layers=12, hidden=768, heads=12, kv_heads=12, seq=1024),
    "llama": dict(layers=8, hidden=2048, heads=32, kv_heads=8, seq=8192),
    "t5": dict(layers=12, hidden=768, heads=12, kv_heads=12, seq=1024),
    "mpnet": dict(layers=12, hidden=768, heads=12, kv_heads=12, seq=1024),
    "deberta": dict(layers=12, hidden=768, heads=12, kv_heads=12, seq=1024),
}
#: encoders with a learned or computed attention bias: called with a padding mask
ENCODERS = ("t5", "mpnet", "deberta")


def build(name: str, size: dict[str, int], impl: str, device: str, dtype: torch.dtype,
          state: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """A transformers base model with random weights (or ``state``) and the given attention implementation."""
    import transformers

    torch.manual_seed(0)
    if name == "gpt2":
        cfg = transformers.GPT2Config(n_layer=size["layers"], n_embd=size["hidden"], n_head=size["heads"],
                                      n_positions=max(1024, size["seq"]), vocab_size=1024, use_cache=False)
        cls = transformers.GPT2Model
    elif name == "llama":
        cfg = transformers.LlamaConfig(num_hidden_layers=size["layers"], hidden_size=size["hidden"],
                                       num_attention_heads=size["heads"], num_key_value_heads=size["kv_heads"],
                                       intermediate_size=int(size["hidden"] * 2.75), vocab_size=1024,
                                       max_position_embeddings=max(2048, size["seq"]), use_cache=False)
        cls = transformers.LlamaModel
    elif name in ENCODERS:
        cfg, cls = _encoder_config(name, size, transformers)
    else:
        raise SystemExit(f"unknown model {name!r}; choose gpt2, llama, {', '.join(ENCODERS)}")
    cfg._attn_implementation = impl
    model = cls(cfg)
    if state is not None:
        model.load_state_dict(state)
    return model.to(device=device, dtype=dtype).eval()


def _encoder_config(name: str, size: dict[str, int], transformers: Any) -> tuple[Any, type]:
    """T5's encoder (relative-position buckets), MPNet (the same, added in place), DeBERTa-v2 (c2p/p2c terms)."""
    hidden, heads, layers = size["hidden"], size["heads"], size["layers"]
    if name == "t5":
        return transformers.T5Config(num_layers=layers, d_model=hidden, num_heads=heads, d_kv=hidden // heads,
                                     d_ff=4 * hidden, vocab_size=1024, use_cache=False), transformers.T5EncoderModel
    common = dict(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                  intermediate_size=4 * hidden, vocab_size=1024, max_position_embeddings=max(1024, size["seq"]) + 2)
    if name == "mpnet":
        return transformers.MPNetConfig(**common), transformers.MPNetModel
    return (transformers.DebertaV2Config(**common, relative_attention=True, pos_att_type=["p2c", "c2p"],
                                         position_buckets=256, max_relative_positions=-1),
            transformers.DebertaV2Model)


def _inputs(name: str, batch: int, seq: int, device: str, seed: int) -> tuple[tuple, dict[str, torch.Tensor]]:
    """Token ids; for the encoders also a padding mask (the last row's last eighth padded)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 1024, (batch, seq), generator=g).to(device)
    if name not in ENCODERS:
        return (ids,), {}
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, seq - seq // 8:] = 0
    return (ids,), {"attention_mask": mask.to(device)}


def peak_memory(fn: Callable[[], Any], device: str) -> int:
    """Bytes one call of ``fn`` allocates at its peak above what was in use before it.

    :func:`graphopt.target.measure_peak`: CUDA: the caching allocator's peak.
    CPU: the allocation events torch's profiler records (``profile_memory=True``).
    """
    from graphopt.target import measure_peak

    gc.collect()
    return measure_peak(fn, device=device).bytes or 0


def latencies(fns: dict[str, Callable[[], Any]], device: str, runs: int,
              warmup: int) -> dict[str, tuple[float, float]]:
    """(median wall seconds, median process CPU seconds) per call of each function.

    ``runs`` calls after ``warmup`` calls, interleaved (one of each per round)
    so a change in machine load hits every variant alike. The CPU time (all
    threads of this process) is reported too: on a shared machine it varies
    less than wall time, since waiting for a core does not count.
    """
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(runs):
        for key, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync()
            wall[key].append(time.perf_counter() - t0)
            cpu[key].append(time.process_time() - c0)
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in fns}


def _hidden(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / a.norm().clamp_min(1e-30))


def bench_model(name: str, size: dict[str, int], args: argparse.Namespace, dtype: torch.dtype) -> dict[str, Any]:
    import graphopt

    device = args.device
    eager = build(name, size, "eager", device, dtype)
    try:
        sdpa = build(name, size, "sdpa", device, dtype, eager.state_dict())
    except ValueError as exc:  # a model transformers has no sdpa path for
        logging.warning("%s: no sdpa variant (%s)", name, str(exc).split(". ")[0])
        sdpa = None
    ids, kw = _inputs(name, args.batch, size["seq"], device, 0)
    fresh, fresh_kw = _inputs(name, args.batch, size["seq"], device, 1)

    variants: dict[str, Callable[[], Any]] = {}
    extra: dict[str, float] = {}
    with torch.no_grad():
        variants["eager"] = lambda: eager(*fresh, **fresh_kw)
        t0 = time.perf_counter()
        result = graphopt.optimize(eager, ids, kw)
        extra["optimize_s"] = time.perf_counter() - t0
        fused = sum(1 for n in result.module.graph.nodes
                    if n.op == "call_function" and n.target == torch.ops.aten.scaled_dot_product_attention.default)
        gm = result.module
        variants["graphopt"] = lambda: gm(*fresh, **fresh_kw)
        if sdpa is not None:
            variants["sdpa"] = lambda: sdpa(*fresh, **fresh_kw)
        if not args.no_compile:
            compiled = torch.compile(eager)
            t0 = time.perf_counter()
            compiled(*fresh, **fresh_kw)
            extra["compile_s"] = time.perf_counter() - t0
            variants["compile"] = lambda: compiled(*fresh, **fresh_kw)

        ref = _hidden(variants["eager"]())
        errors = {k: rel_l2(ref, _hidden(fn())) for k, fn in variants.items() if k != "eager"}
        lat = latencies(variants, device, args.runs, args.warmup)
        rows = {key: {"latency_s": lat[key][0], "cpu_s": lat[key][1], "peak_bytes": peak_memory(fn, device)}
                for key, fn in variants.items()}
    return {"model": name, "size": size, "rows": rows, "errors": errors, "fused_sites": fused,
            "declined": [d.reason for r in result.report.passes for d in r.declined if r.name == "fuse_attention"],
            **extra}


def print_result(res: dict[str, Any], args: argparse.Namespace) -> None:
    size = res["size"]
    print(f"\n{res['model']}: {size['layers']} layers, hidden {size['hidden']}, {size['heads']} heads "
          f"({size['kv_heads']} kv), seq {size['seq']}, batch {args.batch}, {args.device} {args.dtype}")
    print(f"  graphopt: {res['fused_sites']} attention sites fused; optimize() {res['optimize_s']:.2f} s"
          + (f"; torch.compile first call {res['compile_s']:.1f} s" if "compile_s" in res else ""))
    if res["declined"]:
        print(f"  declined: {res['declined']}")
    eager = res["rows"]["eager"]
    print(f"  {'variant':<10} {'latency':>10} {'x eager':>8} {'cpu time':>10} {'x eager':>8} {'peak mem':>10} "
          f"{'x eager':>8} {'rel L2 vs eager':>16}")
    for key, row in res["rows"].items():
        lat, mem, cpu = row["latency_s"], row["peak_bytes"], row["cpu_s"]
        mem_s = f"{mem / 2**20:8.1f}Mi" if mem >= 0 else "       n/a"
        mem_r = f"{mem / eager['peak_bytes']:8.2f}" if mem >= 0 and eager["peak_bytes"] > 0 else "     n/a"
        err = f"{res['errors'][key]:.1e}" if key in res["errors"] else ""
        print(f"  {key:<10} {lat * 1e3:8.1f}ms {lat / eager['latency_s']:8.2f} {cpu * 1e3:8.1f}ms "
              f"{cpu / eager['cpu_s']:8.2f} {mem_s} {mem_r} {err:>16}")
    rows = res["rows"]
    if "sdpa" in rows:
        ratio = rows["graphopt"]["latency_s"] / rows["sdpa"]["latency_s"]
        cpu_ratio = rows["graphopt"]["cpu_s"] / rows["sdpa"]["cpu_s"]
        line = f"  graphopt / sdpa: latency {ratio:.3f} (cpu time {cpu_ratio:.3f})"
        if rows["sdpa"]["peak_bytes"] > 0:
            line += f", peak memory {rows['graphopt']['peak_bytes'] / rows['sdpa']['peak_bytes']:.3f}"
        if "compile" in rows:
            line += (f"; graphopt / compile latency {rows['graphopt']['latency_s'] / rows['compile']['latency_s']:.3f}"
                     f" (cpu time {rows['graphopt']['cpu_s'] / rows['compile']['cpu_s']:.3f})")
        print(line)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="gpt2,llama", help="comma-separated: gpt2, llama, t5, mpnet, deberta")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=None, help="override the sequence length")
    p.add_argument("--layers", type=int, default=None, help="override the number of layers")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    args = p.parse_args(argv)
    if args.runs < 10:
        p.error("--runs must be at least 10")
    logging.basicConfig(level=logging.WARNING)
    dtype = getattr(torch, args.dtype)
    sizes = CUDA_SIZES if args.device.startswith("cuda") else CPU_SIZES
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    for name in args.models.split(","):
        size = dict(sizes[name])
        if args.seq:
            size["seq"] = args.seq
        if args.layers:
            size["layers"] = args.layers
        print_result(bench_model(name, size, args, dtype), args)
        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())

