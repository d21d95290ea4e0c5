"""Benchmarks for graphopt's analysis (issue 3): are its figures right?

1. FLOPs: graphopt's whole-model FLOPs against ``torch.utils.flop_counter.FlopCounterMode``
   (GPT-2, BERT, Llama from transformers configs; nanoGPT and the CNN from
   graphopt.examples_models).
2. Peak memory: predicted peak activation memory (liveness) against what is
   measured for GPT-2 (n_layer=2, n_embd=256, n_head=4) at seq 1024 on CPU:
   torch.profiler's allocation events (in process) and the peak RSS of a
   fresh subprocess (VmHWM reset through /proc/self/clear_refs just before the
   forward pass, glibc told to return freed memory to the OS); on CUDA, where
   present, torch.cuda.max_memory_allocated.
3. Hot spots: with profile=True, how many of the top 10 nodes by measured time
   are among the top 10 by predicted time (GPT-2, seq 1024).
4. The issue's `graphopt analyze` Llama command: wall time of the CLI.

Run:  python benchmarks/analysis.py [--seq 1024] [--write]
``--write`` replaces the "Analysis" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_file import cpu_description, markers, write_section  # noqa: E402

import torch

GPT2 = "hf:gpt2?n_layer=2&n_embd=256&n_head=4&seq={seq}"
LLAMA_CLI = ("hf:llama?num_hidden_layers=2&hidden_size=512&intermediate_size=1376&num_attention_heads=8"
             "&num_key_value_heads=2&seq=512")
FLOP_MODELS = {
    "GPT-2 (2 layers, d=256, seq 128)": "hf:gpt2?n_layer=2&n_embd=256&n_head=4&seq=128",
    "BERT (2 layers, d=256, seq 128)": "hf:bert?num_hidden_layers=2&hidden_size=256&num_attention_heads=4"
                                       "&intermediate_size=1024&seq=128",
    "Llama GQA (2 layers, d=256, seq 128)": "hf:llama?num_hidden_layers=2&hidden_size=256&intermediate_size=688"
                                            "&num_attention_heads=8&num_key_value_heads=2&seq=128",
    "nanoGPT (2 layers, d=128, seq 64)": "examples:nanogpt?n_layer=2&seq=64",
    "CNN (batch 4)": "examples:cnn?batch=4",
}

_BEGIN, _END = markers("analysis")


def flops_table() -> list[dict]:
    from torch.utils.flop_counter import FlopCounterMode

    import graphopt
    from graphopt.specs import load_spec

    rows = []
    for label, spec_text in FLOP_MODELS.items():
        spec = load_spec(spec_text)
        a = graphopt.analyze(spec.model, spec.args, spec.kwargs)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            spec.model(*spec.args, **spec.kwargs)
        ref = counter.get_total_flops()
        rows.append({"model": label, "graphopt": a.total_flops, "flop_counter": ref,
                     "rel_diff": (a.total_flops - ref) / ref, "other_flops": a.other_flops,
                     "ffn_chains": len(a.ffn_chains),
                     "repeated": "; ".join(f"{b.count}x{b.module_class}" for b in a.repeated_blocks) or "-"})
        print(f"  {label:40s} graphopt {a.total_flops:>14,d}  FlopCounterMode {ref:>14,d}  "
              f"diff {rows[-1]['rel_diff']:+.4%}")
    return rows


def rss_child(spec_text: str) -> None:
    """In a fresh process: peak RSS growth of one forward pass of the captured graph."""
    import graphopt
    from graphopt.specs import load_spec

    spec = load_spec(spec_text)
    gm = graphopt.capture(spec.model, spec.args, spec.kwargs).module
    with torch.no_grad():
        out = gm(*spec.args, **spec.kwargs)
        del out
        gc.collect()

        def status(field: str) -> int:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        return int(line.split()[1]) * 1024
            raise KeyError(field)

        base = status("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM (the peak RSS) to the current RSS
        except OSError as exc:
            print(json.dumps({"error": f"cannot reset the peak RSS: {exc}"}))
            return
        out = gm(*spec.args, **spec.kwargs)
        peak = status("VmHWM")
    print(json.dumps({"rss_delta": peak - base, "base": base}))


def memory_figures(spec_text: str) -> dict:
    import graphopt
    from graphopt.specs import load_spec
    from graphopt.target import get_roofline, measure_peak

    spec = load_spec(spec_text)
    a = graphopt.analyze(spec.model, spec.args, spec.kwargs)
    predicted = a.peak_memory_bytes
    peak = measure_peak(a.gm, spec.args, spec.kwargs, warmup=True)
    measured, method = peak.bytes, peak.method
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    proc = subprocess.run([sys.executable, __file__, "--rss-child", spec_text], capture_output=True, text=True,
                          env=env, timeout=600)
    rss = None
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            rss = json.loads(line).get("rss_delta")
    figures = {"spec": spec_text, "predicted": predicted, "profiler": measured, "profiler_method": method,
               "rss_delta": rss, "parameters": a.memory.parameter_bytes,
               "live_at_peak": [n.name for n in a.memory.live_at_peak][:6]}
    mib = 2**20
    print(f"  predicted peak activation memory: {predicted / mib:.1f} MiB (live at peak: "
          f"{', '.join(figures['live_at_peak'])})")
    if measured is not None:
        print(f"  measured ({method}): {measured / mib:.1f} MiB -> predicted/measured {predicted / measured:.3f}")
    if rss is not None:
        print(f"  measured (peak RSS growth of a subprocess): {rss / mib:.1f} MiB -> predicted/measured "
              f"{predicted / rss:.3f}")
    else:
        print(f"  peak RSS of a subprocess: unavailable ({proc.stderr.strip().splitlines()[-1:]})")
    if torch.cuda.is_available():
        model = spec.model.cuda()
        args = tuple(x.cuda() for x in spec.args)
        gm = graphopt.capture(model, args).module
        cuda_pred = graphopt.analyze(gm, target=get_roofline("cuda")).peak_memory_bytes
        cuda_meas = measure_peak(gm, args, warmup=True).bytes
        figures.update(cuda_predicted=cuda_pred, cuda_measured=cuda_meas)
        print(f"  CUDA: predicted {cuda_pred / mib:.1f} MiB, max_memory_allocated {cuda_meas / mib:.1f} MiB")
    return figures


def hotspot_overlap(seq: int) -> dict:
    import graphopt
    from graphopt.specs import load_spec

    spec = load_spec(GPT2.format(seq=seq))
    a = graphopt.analyze(spec.model, spec.args, spec.kwargs, profile=True)
    by_pred = [r.name for r in sorted(a.nodes, key=lambda r: -r.predicted_s)[:10]]
    by_meas = [r.name for r in sorted(a.nodes, key=lambda r: -(r.measured_s or 0.0))[:10]]
    overlap = len(set(by_pred) & set(by_meas))
    print(f"  top-10 overlap (measured vs predicted): {overlap}/10")
    print(f"    predicted: {', '.join(by_pred)}")
    print(f"    measured:  {', '.join(by_meas)}")
    print(f"  predicted total {a.predicted_seconds * 1e3:.1f} ms, measured (sum of nodes) "
          f"{a.measured_seconds * 1e3:.1f} ms on {a.target.name}")
    return {"overlap": overlap, "predicted": by_pred, "measured": by_meas,
            "predicted_ms": a.predicted_seconds * 1e3, "measured_ms": a.measured_seconds * 1e3,
            "target": a.target.to_dict()}


_PHASES = """
import time; t0 = time.perf_counter()
import graphopt; from graphopt.specs import load_spec
t1 = time.perf_counter(); spec = load_spec(SPEC)
t2 = time.perf_counter(); gm = graphopt.capture(spec.model, spec.args, spec.kwargs).module
t3 = time.perf_counter(); text = str(graphopt.analyze(gm))
t4 = time.perf_counter()
print(f"import {t1 - t0:.1f} s, build the model {t2 - t1:.1f} s, capture {t3 - t2:.1f} s, analyze + table {t4 - t3:.2f} s")
"""


def cli_time() -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "graphopt", "analyze", LLAMA_CLI], capture_output=True,
                          text=True, timeout=600)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"graphopt analyze failed: {proc.stderr[-2000:]}")
    print(f"  `graphopt analyze '{LLAMA_CLI}'`: {elapsed:.1f} s (target cached)")
    phases = subprocess.run([sys.executable, "-c", _PHASES.replace("SPEC", repr(LLAMA_CLI))], capture_output=True,
                            text=True, timeout=600).stdout.strip().splitlines()
    phase_line = phases[-1] if phases else "unavailable"
    print(f"  the same steps timed in one process: {phase_line}")
    return elapsed, phase_line


def write_results(flops: list[dict], mems: list[dict], hot: dict, cli_s: tuple[float, str], seq: int) -> str:
    mib = 2**20
    t = hot["target"]
    lines = [
        _BEGIN,
        "## Analysis",
        "",
        f"`python benchmarks/analysis.py --seq {seq} --write` on {platform.machine()}, {cpu_description()} "
        f"({torch.get_num_threads()} threads, torch {torch.__version__}); load average "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} when it finished (timings, not FLOP or byte counts, "
        "move with the load of the machine).",
        f"Roofline used (cached in ~/.cache/graphopt from its first measurement on this machine; delete it to "
        f"re-measure): {t['peak_flops'].get('float32', 0) / 1e9:.1f} GFLOP/s fp32, "
        f"{t['mem_bandwidth'] / 1e9:.1f} GB/s, {t['op_overhead_s'] * 1e6:.1f} us per op.",
        "",
        "### FLOPs vs torch.utils.flop_counter.FlopCounterMode",
        "",
        "| model | graphopt total_flops | FlopCounterMode | difference | other FLOPs | FFN chains | repeated blocks |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in flops:
        lines.append(f"| {r['model']} | {r['graphopt']:,} | {r['flop_counter']:,} | {r['rel_diff']:+.4%} | "
                     f"{r['other_flops']:,} | {r['ffn_chains']} | {r['repeated']} |")
    lines += [
        "",
        f"### Peak activation memory, GPT-2 (n_layer=2, n_embd=256, n_head=4), seq {seq}, CPU",
        "",
        "| model | predicted (liveness) MiB | torch.profiler allocations MiB | subprocess peak RSS growth MiB "
        "| predicted / measured |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for m in mems:
        label = "GPT2Model (no LM head)" if "task=base" in m["spec"] else "GPT2LMHeadModel"
        prof = f"{m['profiler'] / mib:.1f}" if m.get("profiler") else "-"
        rss = f"{m['rss_delta'] / mib:.1f}" if m.get("rss_delta") else "-"
        ratios = []
        if m.get("profiler"):
            ratios.append(f"{m['predicted'] / m['profiler']:.3f} (profiler)")
        if m.get("rss_delta"):
            ratios.append(f"{m['predicted'] / m['rss_delta']:.3f} (RSS)")
        lines.append(f"| {label} | {m['predicted'] / mib:.1f} | {prof} | {rss} | {', '.join(ratios)} |")
        if m.get("cuda_measured"):
            lines.append(f"| {label}, CUDA | {m['cuda_predicted'] / mib:.1f} | max_memory_allocated "
                         f"{m['cuda_measured'] / mib:.1f} | | {m['cuda_predicted'] / m['cuda_measured']:.3f} |")
    if not any(m.get("cuda_measured") for m in mems):
        lines.append("")
        lines.append("CUDA: not measured (no GPU on this machine).")
    mem = mems[0]
    lines += [
        "",
        f"Parameters ({mem['parameters'] / mib:.1f} MiB) are not activations and are excluded from every figure above.",
        "",
        f"### Hot spots with --profile, GPT-2 seq {seq}",
        "",
        f"Top-10 overlap between measured and predicted hot spots: **{hot['overlap']}/10** "
        f"(predicted total {hot['predicted_ms']:.1f} ms, measured sum of nodes {hot['measured_ms']:.1f} ms).",
        "",
        f"- predicted: {', '.join(hot['predicted'])}",
        f"- measured: {', '.join(hot['measured'])}",
        "",
        "### CLI",
        "",
        f"`graphopt analyze '{LLAMA_CLI}'` printed its table in {cli_s[0]:.1f} s (wall, roofline cached).",
        f"The same steps timed in one process (another run): {cli_s[1]}.",
        _END,
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--write", action="store_true", help="write the Analysis section of benchmarks/RESULTS.md")
    parser.add_argument("--rss-child", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.rss_child)
        return
    import logging

    logging.basicConfig(level=logging.WARNING)
    print("FLOPs vs FlopCounterMode:")
    flops = flops_table()
    print(f"Peak memory, GPT-2 seq {args.seq}:")
    mem = memory_figures(GPT2.format(seq=args.seq))
    # without the LM head, whose 1024 x 50257 logits dominate the peak above
    print(f"Peak memory, GPT-2 base model (no LM head) seq {args.seq}:")
    mem_base = memory_figures(GPT2.format(seq=args.seq) + "&task=base")
    print(f"Hot spots with profile=True, GPT-2 seq {args.seq}:")
    hot = hotspot_overlap(args.seq)
    print("CLI:")
    cli_s = cli_time()
    if args.write:
        print("wrote", write_section("analysis", write_results(flops, [mem, mem_base], hot, cli_s, args.seq)))


if __name__ == "__main__":
    main()
