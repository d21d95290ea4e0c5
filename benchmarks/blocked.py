"""Peak memory and latency, eager vs blocked, with a memory budget of 25% of eager's measured peak.

Cases (sizes fit a 24 GiB machine and run in minutes on a few CPU cores):

* ``t5``: a T5-style encoder (transformers ``T5EncoderModel``, random weights,
  relative position bias) at sequence length 8192;
* ``ffn``: a stack of wide FFN blocks (pre-LayerNorm, GELU, residual) at 16384 tokens;
* ``lm_head``: an LM head over a 128k vocabulary followed by
  ``log_softmax`` + ``gather`` of the labels' log-probabilities.

Each measurement runs in a fresh subprocess (``--worker``): build the model,
(for ``blocked``) ``graphopt.optimize(..., memory_budget=B)``, run once to
warm up, return freed heap pages to the OS, reset the peak-RSS counter and run
again: the measured peak is the peak RSS during that call minus the RSS
before it (:func:`graphopt.target.measure_peak` with ``source="rss"``; CUDA: max allocated).
The blocked output is compared with eager's (relative L2).

    python benchmarks/blocked.py                     # all cases, CPU
    python benchmarks/blocked.py --case t5 --device cuda
    python benchmarks/blocked.py --json out.json

Latency: the blocked worker times the eager model and the blocked module
alternately in one process (medians), so the ratio is measured side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

FRACTION = 0.25  # the budget, as a fraction of eager's measured peak
TARGET_SLOWDOWN = 1.3


# ---------------------------------------------------------------- models

class WideFFNStack(nn.Module):
    """x + W2(gelu(W1(LayerNorm(x)))) repeated: the wide (tokens, hidden) intermediate dominates memory."""

    def __init__(self, d: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.norms = nn.ModuleList([nn.LayerNorm(d) for _ in range(layers)])
        self.up = nn.ModuleList([nn.Linear(d, hidden) for _ in range(layers)])
        self.down = nn.ModuleList([nn.Linear(hidden, d) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm, up, down in zip(self.norms, self.up, self.down):
            x = x + down(F.gelu(up(norm(x))))
        return x


class LMHeadLogProb(nn.Module):
    """Per-token log-probability of the labels under an LM head: the (tokens, vocab) logits only feed a gather."""

    def __init__(self, d: int, vocab: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(self.norm(hidden))
        return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def build(case: str, device: str, small: bool) -> tuple[nn.Module, tuple[Any, ...]]:
    torch.manual_seed(0)
    if case == "t5":
        from transformers import T5Config, T5EncoderModel

        seq = 512 if small else 8192
        cfg = T5Config(d_model=256, d_kv=64, d_ff=1024, num_layers=2, num_heads=4, vocab_size=1000,
                       attn_implementation="eager", use_cache=False)
        model = T5EncoderModel(cfg).eval()
        args: tuple[Any, ...] = (torch.randint(0, 1000, (1, seq)),)
    elif case == "ffn":
        tokens = 1024 if small else 16384
        model = WideFFNStack(256, 4096, 2).eval()
        args = (torch.randn(1, tokens, 256),)
    elif case == "lm_head":
        tokens, vocab = (128, 8192) if small else (1024, 128 * 1024)
        model = LMHeadLogProb(256, vocab).eval()
        args = (torch.randn(1, tokens, 256), torch.randint(0, vocab, (1, tokens)))
    else:
        raise SystemExit(f"unknown case {case!r}; choose t5, ffn or lm_head")
    return model.to(device), tuple(a.to(device) for a in args)


# ---------------------------------------------------------------- worker (fresh process)

def _first_tensor(out: Any) -> torch.Tensor:
    from torch.utils import _pytree as pytree

    return next(t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))


def worker(case: str, mode: str, budget: int | None, device: str, repeats: int, small: bool) -> dict[str, Any]:
    import graphopt
    from graphopt.target import measure_peak

    model, args = build(case, device, small)
    info: dict[str, Any] = {"case": case, "mode": mode, "device": device}
    fn = model
    if mode == "blocked":
        start = time.perf_counter()
        result = graphopt.optimize(model, args, memory_budget=budget, n_random_inputs=0, measure_peak=False)
        info["optimize_seconds"] = time.perf_counter() - start
        rec = result.report.record("blocked")
        info["pass_status"] = rec.status if rec else "missing"
        info["notes"] = list(rec.notes) if rec else []
        info["final_numerics"] = result.report.final_numerics.summary() if result.report.final_numerics else ""
        info["predicted_peak"] = result.report.extra.get("blocked", {}).get("predicted_peak_after")
        fn = result.module
        del result
    with torch.no_grad():
        out = fn(*args)  # warm-up (thread pools, lazy initialisation)
        reference = _first_tensor(out).detach().float().cpu().clone()
        del out
        peak = measure_peak(fn, args, device=device, source="rss")
        # latency: eager and blocked timed alternately in this one process, so load changes hit both
        timed = {"eager": model, "blocked": fn} if mode == "blocked" else {}
        times: dict[str, list[float]] = {k: [] for k in timed}
        for _ in range(repeats):
            for name, f in timed.items():
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                f(*args)
                if device == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)
    info.update(peak_bytes=peak.bytes, peak_method=peak.method, latencies_s=times,
                latency_s={k: statistics.median(v) for k, v in times.items() if v})
    torch.save(reference, os.environ["GRAPHOPT_BENCH_OUT"] + ".pt")
    return info


def run_worker(case: str, mode: str, budget: int | None, args: argparse.Namespace) -> dict[str, Any]:
    out = os.path.join(args.tmp, f"{case}_{mode}")
    cmd = [sys.executable, __file__, "--worker", "--case", case, "--mode", mode, "--device", args.device,
           "--repeats", str(args.repeats)]
    cmd += ["--threads", str(args.threads)] if args.threads else []
    cmd += ["--budget", str(budget)] if budget else []
    cmd += ["--small"] if args.small else []
    env = dict(os.environ, GRAPHOPT_BENCH_OUT=out)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"{case}/{mode} worker failed (exit {proc.returncode})")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    info = json.loads(line[len("RESULT "):])
    info["output"] = out + ".pt"
    return info


# ---------------------------------------------------------------- driver

def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def run_case(case: str, args: argparse.Namespace) -> dict[str, Any]:
    eager = run_worker(case, "eager", None, args)
    budget = int(eager["peak_bytes"] * args.fraction)
    blocked = run_worker(case, "blocked", budget, args)
    ref, out = torch.load(eager["output"]), torch.load(blocked["output"])
    rel = float((ref.double() - out.double()).norm() / ref.double().norm())
    row = {
        "case": case, "device": args.device,
        "eager_peak": eager["peak_bytes"], "budget": budget, "blocked_peak": blocked["peak_bytes"],
        "predicted_peak": blocked.get("predicted_peak"),
        "eager_latency_s": blocked["latency_s"]["eager"], "blocked_latency_s": blocked["latency_s"]["blocked"],
        "slowdown": blocked["latency_s"]["blocked"] / blocked["latency_s"]["eager"],
        "peak_ok": blocked["peak_bytes"] <= budget,
        "latency_ok": blocked["latency_s"]["blocked"] <= TARGET_SLOWDOWN * blocked["latency_s"]["eager"],
        "rel_l2": rel, "optimize_seconds": blocked.get("optimize_seconds"),
        "plan": blocked.get("notes"), "final_numerics": blocked.get("final_numerics"),
        "peak_method": blocked["peak_method"],
    }
    print(f"{case:8s} eager {mib(row['eager_peak']):>10s} {row['eager_latency_s']:7.2f} s | budget "
          f"{mib(budget):>9s} | blocked {mib(row['blocked_peak']):>9s} (predicted {mib(row['predicted_peak'] or 0)}) "
          f"{row['blocked_latency_s']:7.2f} s | x{row['slowdown']:.2f} | peak<=budget {row['peak_ok']} "
          f"latency<=1.3x {row['latency_ok']} | rel_l2 {rel:.1e}", flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", action="append", choices=["t5", "ffn", "lm_head"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3, help="timed calls of each (eager, blocked), alternating")
    p.add_argument("--small", action="store_true", help="tiny sizes (a smoke test of the script)")
    p.add_argument("--fraction", type=float, default=FRACTION, help="budget as a fraction of eager's peak")
    p.add_argument("--json", help="write the rows to this file")
    p.add_argument("--threads", type=int, help="torch.set_num_threads in every worker (default: torch's)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=["eager", "blocked"], help=argparse.SUPPRESS)
    p.add_argument("--budget", type=int, help=argparse.SUPPRESS)
    p.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        info = worker(args.case[0], args.mode, args.budget, args.device, args.repeats, args.small)
        print("RESULT " + json.dumps(info, default=str), flush=True)
        return
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = tmp
        print(f"torch {torch.__version__}, device {args.device}, {os.cpu_count()} CPUs, "
              f"{torch.get_num_threads()} threads; budget = "
              f"{args.fraction:.0%} of eager's measured peak", flush=True)
        rows = [run_case(case, args) for case in (args.case or ["t5", "ffn", "lm_head"])]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2, default=str)


if __name__ == "__main__":
    main()
