"""Reduced precision: latency, output error and top-1 agreement, side by side.

CPU (default): a BERT-base-like encoder (transformers BertModel, 12 layers,
hidden 768, 12 heads, intermediate 3072) at batch 8, seq 128, and GPT-2
(GPT2LMHeadModel, 12 layers, hidden 768) at batch 4, seq 128:
fp32 vs ``precision="int8"`` vs ``precision="auto"``.

CUDA (``--device cuda``): a Llama (8 layers, hidden 2048, 32 heads, 8 KV heads)
at batch 4, seq 512: fp32 vs bf16 vs fp8 vs auto.

On CPU two reference rows sit beside them: ``graphopt fp32`` (the default
pipeline without ``precision``, so the effect of the other passes is
separated from reduced precision) and ``torch.ao dynamic`` (torch's own
``quantize_dynamic`` module swap: per-tensor 7-bit activations, per-tensor
weights), the int8 speed and error a user gets without graphopt.

Every variant is timed in the same process, round-robin after warm-up, so
the ratios are comparable even on a busy machine. Three figures per variant:
the fastest and the median wall-clock time, and the fastest process CPU time
(``time.process_time``: with ``--threads 1`` this is the least disturbed by
other jobs on a shared machine, which only ever add time); the load average
before and after is printed. Errors are measured on fresh inputs (not the
example the plan was searched on): relative L2 of the last hidden state (BERT)
or logits (LMs), and top-1 agreement of the LM logits. Models have random
weights (configs only).

    python benchmarks/precision.py                  # CPU: BERT + GPT-2
    python benchmarks/precision.py --model bert --runs 10 --threads 1
    python benchmarks/precision.py --model bert --kernels --threads 1   # int8 ceiling on this CPU
    python benchmarks/precision.py --device cuda    # GPU: Llama
    python benchmarks/precision.py --model bert --onnx   # also each plan in onnxruntime
    python benchmarks/precision.py --model llama --modes fp8 --emulate-fp8 --batch 1   # fp8's errors on a CPU

``--onnx`` exports every plan with ``graphopt.export_onnx`` (target
onnxruntime; the export's own check holds it to the error budget against the
original model) and times the files in onnxruntime beside the plain
``torch.onnx.export`` of the fp32 model, in one process with runs interleaved.
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
from graphopt.passes import default_pipeline  # noqa: E402
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


def time_round_robin(fns: dict, runs: int, warmup: int, device: str) -> dict[str, dict[str, float]]:
    """{variant: {"min", "median" (wall seconds), "cpu" (fastest process CPU seconds)}}."""
    wall = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    with torch.no_grad():
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        for _ in range(runs):
            for name, fn in fns.items():
                if device == "cuda":
                    torch.cuda.synchronize()
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                if device == "cuda":
                    torch.cuda.synchronize()
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    return {k: {"min": min(wall[k]), "median": statistics.median(wall[k]), "cpu": min(cpu[k])} for k in fns}


def torch_ao_dynamic(model):
    """torch's own dynamic int8 (module swap), as a reference point."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def errors(reference, candidate, is_lm: bool) -> tuple[float, float | None]:
    r, c = reference.double(), candidate.double()
    rel = float((c - r).norm() / r.norm())
    top1 = float((reference.argmax(-1) == candidate.argmax(-1)).float().mean()) if is_lm else None
    return rel, top1


def kernel_ceiling(builder, args: argparse.Namespace) -> None:
    """How fast int8 can make this model on this CPU, from its parts (``--kernels``).

    1. Each distinct linear shape of the model, fp32 vs the int8 kernels, fastest
       of ``--runs`` interleaved runs: fbgemm's dynamic linear alone (per-tensor
       8-bit activations, no per-token scaling: the floor for any fbgemm int8
       linear), oneDNN's u8 x s8 linear alone on already-quantized activations (the
       floor for the ``per_token_sym_u8`` scheme), torch.ao's quantized Linear
       (reduce_range), and ``graphopt::int8_linear`` as the pass uses it (the
       target's scheme, with an input shift).
    2. The fp32 forward (fastest of 3) minus its linears (the table's fp32 times
       times their counts): the time int8 linears cannot touch. The profiler's
       share of self CPU time in addmm is printed too (it overstates the small
       ops, each of which pays the profiler's overhead).
    3. Amdahl: the whole-model time if every linear ran at the measured int8
       speed and everything else stayed as fast as in fp32.
    """
    from torch.profiler import ProfilerActivity, profile

    from graphopt.ops import int8_linear

    model, make, _pick, _is_lm, desc = builder("cpu", args.quick)
    example = make(torch.Generator().manual_seed(0))
    shapes: dict[tuple[int, int, int], torch.nn.Linear] = {}
    counts: dict[tuple[int, int, int], int] = {}

    def hook(mod, inp, _out):
        x = inp[0]
        key = (x.reshape(-1, x.shape[-1]).shape[0], mod.in_features, mod.out_features)
        shapes.setdefault(key, mod)
        counts[key] = counts.get(key, 0) + 1

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    clock = time.process_time if torch.get_num_threads() == 1 else time.perf_counter
    with torch.no_grad():
        model(*example)
        for h in handles:
            h.remove()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(*example)
        forward = float("inf")
        for _ in range(3):
            t0 = clock()
            model(*example)
            forward = min(forward, clock() - t0)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    linear = sum(e.self_cpu_time_total for e in events if e.key in ("aten::addmm", "aten::mm", "aten::linear"))
    share = linear / total
    print(f"\n## int8 ceiling: {desc} ({torch.get_num_threads()} threads, load average {os.getloadavg()})")
    print(f"profiler: {share:.1%} of the fp32 forward's self CPU time in linear layers")
    from graphopt.precision.target import PrecisionTarget

    target = PrecisionTarget.detect("cpu")
    scheme = target.int8_scheme or "per_token_u7"
    print(f"graphopt's int8 scheme here: {scheme}, {'pair-safe' if target.int8_pair_safe else 'plain'} weights")
    print("| linear (tokens x in -> out) | fp32 ms | fbgemm alone ms | vs fp32 | oneDNN alone ms | vs fp32 "
          "| torch.ao ms | vs fp32 | graphopt int8 ms | vs fp32 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    weighted = {"fbgemm": 0.0, "onednn": 0.0, "ao": 0.0, "graphopt": 0.0, "fp32": 0.0}
    for (m, k, n), mod in sorted(shapes.items()):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(m, k, generator=g) + torch.randn(k, generator=g)
        w, b = mod.weight.detach(), mod.bias.detach() if mod.bias is not None else None
        q, s = int8_linear.quantize_weight(w, pair_safe=target.int8_pair_safe)
        packed = int8_linear._pack(q, s)
        int8_linear.prepack(q, s, scheme)
        mu = x.mean(0)
        bs = (b if b is not None else 0) + w @ mu
        ao = torch_ao_dynamic(torch.nn.Sequential(mod))
        if int8_linear.onednn_available():
            qx, _ = int8_linear._quantize_sym_u8(x - mu)
            onednn_w, zeros = int8_linear._onednn_pack(q), torch.zeros(n, dtype=torch.long)
        fns = {"fp32": lambda: torch.nn.functional.linear(x, w, b),
               "fbgemm": lambda: torch.ops.quantized.linear_dynamic(x, packed, False),
               "ao": lambda: ao(x),
               "graphopt": lambda: torch.ops.graphopt.int8_linear(x, q, s, bs, scheme, mu)}
        if int8_linear.onednn_available():
            fns["onednn"] = lambda: int8_linear._onednn_gemm(qx, onednn_w, s, zeros)
        best = {key: float("inf") for key in fns}
        with torch.no_grad():
            for fn in fns.values():
                fn()
            for _ in range(args.runs):
                for key, fn in fns.items():
                    t0 = clock()
                    fn()
                    best[key] = min(best[key], clock() - t0)
        count = counts[(m, k, n)]
        for key in weighted:
            weighted[key] += count * best.get(key, float("nan"))
        f = best["fp32"]
        cells = " | ".join(f"{best[key] * 1e3:.2f} | {f / best[key]:.2f}x" if key in best else "n/a | n/a"
                           for key in ("fbgemm", "onednn", "ao", "graphopt"))
        print(f"| {m} x {k} -> {n} (x{count}) | {f * 1e3:.2f} | {cells} |")
    rest = max(forward - weighted["fp32"], 0.0)
    print(f"- fp32 forward {forward * 1e3:.0f} ms ({'CPU' if clock is time.process_time else 'wall'}), of which "
          f"linears {weighted['fp32'] * 1e3:.0f} ms ({weighted['fp32'] / forward:.1%}); the rest {rest * 1e3:.0f} ms")
    for key in ("fbgemm", "onednn", "ao", "graphopt"):
        speed = weighted["fp32"] / weighted[key]
        print(f"- all linears at the {key} speed ({speed:.2f}x): whole model {(weighted[key] + rest) * 1e3:.0f} ms, "
              f"{forward / (weighted[key] + rest):.2f}x fp32")
    sys.stdout.flush()


def onnx_rows(model, example, fresh, results: dict, is_lm: bool, args: argparse.Namespace) -> list[dict]:
    """Each plan exported (graphopt.export_onnx, target onnxruntime, checked) beside the plain
    ``torch.onnx.export`` of the fp32 model; onnxruntime latency side by side (one process, the same
    session options, runs interleaved) and the first output's error against torch fp32 on fresh inputs."""
    import shutil
    import tempfile

    from graphopt.onnx import export_plain
    from graphopt.onnx.speed import compare_latency, make_session, session_options

    tmp = tempfile.mkdtemp(prefix="precision-onnx-")
    try:
        paths = {"plain export (fp32)": os.path.join(tmp, "plain.onnx")}
        export_plain(model, example, {}, paths["plain export (fp32)"])
        checks = {}
        for name, result in results.items():
            paths[name] = os.path.join(tmp, f"{name.replace(' ', '_')}.onnx")
            info = graphopt.export_onnx(result, paths[name], n_random_inputs=1)
            rewrites = ", ".join(f"{k}: {v}" for k, v in sorted(info.rewrites.items()) if v)
            checks[name] = info.numerics.summary() + (f"; {rewrites}" if rewrites else "")
        so = session_options(args.threads or None)
        stats = compare_latency(paths, [x.cpu().numpy() for x in example], runs=args.runs, warmup=args.warmup, so=so)
        with torch.no_grad():
            ref = model(*fresh)
            ref = (ref.logits if is_lm else ref.last_hidden_state).cpu()
        base = stats["plain export (fp32)"]
        rows = []
        for name, path in paths.items():
            session = make_session(path, so)
            feed = dict(zip([i.name for i in session.get_inputs()], [x.cpu().numpy() for x in fresh]))
            out = torch.from_numpy(session.run(None, feed)[0])
            rel, top1 = errors(ref, out, is_lm)
            st = stats[name]
            rows.append({"variant": name, "ms": round(st.min_ms, 1), "median_ms": round(st.median_ms, 1),
                         "speedup": round(base.min_ms / st.min_ms, 2),
                         "speedup_median": round(base.median_ms / st.median_ms, 2),
                         "rel_l2": rel, "top1": top1, "check": checks.get(name, "")})
        return rows
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def emulated_fp8_pass(device: str):
    """The fp8 precision pass on a target that claims fp8 kernels it lacks: every fp8 linear then runs
    graphopt::fp8_linear's reference, which computes the numbers torch._scaled_mm computes (to bf16
    rounding; tests/test_precision_ops.py). Its errors are fp8's; its latency is nobody's (not timed)."""
    import dataclasses

    from graphopt.passes.precision import ReducedPrecision
    from graphopt.precision.target import PrecisionTarget

    return ReducedPrecision("fp8", target=dataclasses.replace(PrecisionTarget.detect(device), fp8=True))


def run_model(name: str, builder, modes: list[str], args: argparse.Namespace) -> dict:
    torch.manual_seed(0)  # the same random weights whichever models this invocation runs, and in which order
    model, make, pick, is_lm, desc = builder(args.device, args.quick)
    example = make(torch.Generator().manual_seed(0))
    fresh = make(torch.Generator().manual_seed(123))
    if args.batch:  # the first rows of the same inputs
        example, fresh = (tuple(x[:args.batch] for x in example), tuple(x[:args.batch] for x in fresh))
        desc = f"{desc.split(', batch')[0]}, batch {args.batch} (its first rows), seq {example[0].shape[-1]}"
    budget = ErrorBudget(rel_l2=args.error_budget, top1=args.top1 if is_lm else None)
    untimed: set[str] = set()
    variants = {"fp32": model}
    notes, results = {}, {}
    if args.device == "cpu" and not args.no_references:
        results["graphopt fp32"] = graphopt.optimize(model, example)
        variants["graphopt fp32"] = results["graphopt fp32"].module
        variants["torch.ao dynamic"] = torch_ao_dynamic(model)
    for mode in modes:
        t0 = time.perf_counter()
        if mode == "fp8" and args.emulate_fp8:
            # precision="fp8" as an option too: merge_matmuls then merges q/k/v and gate/up as it does for fp8
            result = graphopt.optimize(model, example, passes=[*default_pipeline(), emulated_fp8_pass(args.device)],
                                       precision="fp8", error_budget=budget, n_random_inputs=args.random_inputs)
            mode = "fp8 (emulated)"
            untimed.add(mode)
        else:
            result = graphopt.optimize(model, example, precision=mode, error_budget=budget,
                                       n_random_inputs=args.random_inputs)
        rec = result.report.record("precision")
        counts = {}
        for e in result.report.extra.get("precision", []):
            counts[e["precision"]] = counts.get(e["precision"], 0) + 1
        notes[mode] = {"status": rec.status if rec else "?", "optimize_s": round(time.perf_counter() - t0, 1),
                       "nodes": counts, "notes": [n for n in rec.notes if n.startswith(
                           ("target", "int8 input shift", "int8 weights", "bf16", "search", "fallback", "whole model",
                            "slower"))] if rec else []}
        by_precision: dict[str, list[str]] = {}
        for e in result.report.extra.get("precision", []):
            if e["precision"] not in ("fp32", "int8"):
                by_precision.setdefault(e["precision"], []).append(f"{e['node']} ({e['module'] or 'top'})")
        notes[mode]["float_nodes"] = by_precision  # which nodes run in bf16/fp16 (few, in the int8 modes)
        if rec and rec.status == "rolled back":
            notes[mode]["reason"] = rec.numerics.reason if rec.numerics else rec.error
        elif rec and rec.status != "applied":  # declined as a whole (fp8 without the kernel, ...): say why
            notes[mode]["reason"] = "; ".join(sorted({d.reason for d in rec.declined})) or rec.status
        variants[mode] = result.module
        results[mode] = result
    with torch.no_grad():
        ref = pick(model(*fresh))
        errs = {k: errors(ref, pick(m(*fresh)), is_lm) for k, m in variants.items()}
    fns = {k: (lambda m=m: m(*example)) for k, m in variants.items() if k not in untimed}
    load_before = os.getloadavg()
    times = time_round_robin(fns, args.runs, args.warmup, args.device)
    load_after = os.getloadavg()
    rows = []
    base = times["fp32"]
    for k in variants:
        rel, top1 = errs[k]
        t = times.get(k)
        timing = {"ms": None, "median_ms": None, "cpu_ms": None, "speedup": None, "speedup_median": None,
                  "speedup_cpu": None} if t is None else {
            "ms": round(t["min"] * 1e3, 1), "median_ms": round(t["median"] * 1e3, 1),
            "cpu_ms": round(t["cpu"] * 1e3, 1), "speedup": round(base["min"] / t["min"], 2),
            "speedup_median": round(base["median"] / t["median"], 2), "speedup_cpu": round(base["cpu"] / t["cpu"], 2)}
        rows.append({"variant": k, **timing, "rel_l2": rel, "top1": top1, **({"plan": notes[k]} if k in notes else {})})
    out = {"model": name, "description": desc, "rows": rows, "threads": torch.get_num_threads(),
           "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in load_after]}
    if args.onnx:
        out["onnx_rows"] = onnx_rows(model, example, fresh, results, is_lm, args)
        out["onnx_load_after"] = [round(x, 2) for x in os.getloadavg()]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", default="all", help="comma-separated: bert, gpt2, llama; all (default): bert,gpt2 "
                   "on CPU, llama on CUDA")
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--error-budget", type=float, default=2e-2)
    p.add_argument("--top1", type=float, default=0.9, help="top-1 agreement budget for LMs")
    p.add_argument("--random-inputs", type=int, default=1, help="fresh input sets the search checks besides the example")
    p.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--no-references", action="store_true", help="skip the graphopt fp32 and torch.ao rows (CPU)")
    p.add_argument("--kernels", action="store_true",
                   help="CPU: only print the int8 ceiling (linear share of fp32 time, per-shape kernel speedups)")
    p.add_argument("--modes", default="", help="comma-separated precisions to run (default: int8,auto on CPU; "
                   "bf16,fp8,auto on CUDA)")
    p.add_argument("--onnx", action="store_true",
                   help="also export every plan to ONNX (checked) and time it in onnxruntime beside the plain "
                   "torch.onnx.export of the fp32 model")
    p.add_argument("--emulate-fp8", action="store_true",
                   help="run the fp8 mode where there is no fp8 kernel (a CPU) through the op's reference: "
                   "fp8's errors, measured without a GPU; not timed")
    p.add_argument("--batch", type=int, default=0, help="use only the first N rows of the model's inputs")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {"bert": bert, "gpt2": gpt2, "llama": llama}
    if args.device == "cuda":
        default_models, modes = ["llama"], ["bf16", "fp8", "auto"]
    else:
        default_models, modes = ["bert", "gpt2"], ["int8", "auto"]
    if args.modes:
        modes = args.modes.split(",")
    chosen = default_models if args.model == "all" else args.model.split(",")
    unknown = [m for m in chosen if m not in models]
    if unknown:
        p.error(f"unknown --model {', '.join(unknown)}: choose from {', '.join(models)} or all")
    results = []
    print(f"# precision benchmark: torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""))
    for name in chosen:
        if args.kernels and args.device == "cpu":
            kernel_ceiling(models[name], args)
            continue
        res = run_model(name, models[name], modes, args)
        results.append(res)
        print(f"\n## {res['description']} ({res['threads']} threads; load average {res['load_before']} "
              f"before timing, {res['load_after']} after)")
        print("| variant | wall min ms | vs fp32 | wall median ms | vs fp32 | CPU min ms | vs fp32 | rel L2 | top-1 "
              "| plan |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
        for r in res["rows"]:
            plan = r.get("plan", {})
            summary = ", ".join(f"{k}: {v}" for k, v in sorted(plan.get("nodes", {}).items()))
            status = plan.get("status", "")
            top1 = "" if r["top1"] is None else f"{r['top1']:.4f}"
            timed = (f"{r['ms']} | {r['speedup']}x | {r['median_ms']} | {r['speedup_median']}x | {r['cpu_ms']} | "
                     f"{r['speedup_cpu']}x" if r["ms"] is not None else "not timed | | | | |")
            print(f"| {r['variant']} | {timed} | {r['rel_l2']:.2e} | {top1} | "
                  f"{status}{' (' + summary + ')' if summary else ''} |")
        for r in res["rows"]:
            for n in r.get("plan", {}).get("notes", []):
                print(f"  - {r['variant']}: {n[:400]}")
            for precision, nodes in r.get("plan", {}).get("float_nodes", {}).items():
                print(f"  - {r['variant']}: in {precision}: {', '.join(nodes)[:400]}")
            if r.get("plan", {}).get("reason"):
                print(f"  - {r['variant']} {r['plan']['status']}: {r['plan']['reason']}")
        if "onnx_rows" in res:
            print(f"\n### onnxruntime ({res['description']}; load average {res['onnx_load_after']} after)")
            print("| variant | min ms | vs plain | median ms | vs plain | rel L2 vs torch fp32 | top-1 | export check |")
            print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
            for r in res["onnx_rows"]:
                top1 = "" if r["top1"] is None else f"{r['top1']:.4f}"
                print(f"| {r['variant']} | {r['ms']} | {r['speedup']}x | {r['median_ms']} | {r['speedup_median']}x | "
                      f"{r['rel_l2']:.2e} | {top1} | {r['check']} |")
        sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
