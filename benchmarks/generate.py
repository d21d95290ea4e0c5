"""Generation: prefill and decode speed of transformers' variants and graphopt's, side by side in one process.

Models (random weights, configs only):

* ``llama``: LlamaForCausalLM, 4 layers, hidden 512, 8 heads / 2 KV heads,
  intermediate 1376, vocab 32000 (issue 16's model);
* ``gpt2``: GPT2LMHeadModel, 12 layers, hidden 768 (GPT-2 small's shape).

Variants, each generating ``--new`` tokens greedily after a ``--prompt``-token
prompt at every ``--batches`` size:

* ``hf eager dynamic``: transformers, eager attention, dynamic KV cache;
* ``hf sdpa static``: sdpa attention, ``cache_implementation="static"``;
* ``hf sdpa static compile``: the same with the forward ``torch.compile``d
  (fullgraph; its first-call compile time is reported, not timed);
* ``graphopt fp32`` / ``bf16`` / ``int8`` / ``int8wo`` / ``int4`` / ``auto``:
  :func:`graphopt.prepare_generation` with that ``precision`` (the build time
  is reported, not timed), within relative L2 2e-2 and top-1 0.95 (int4: its
  own documented budget); ``auto-int4-budget``: auto held to int4's budget
  (so int4 is among its choices, with int8wo and bf16); ``int4-every-linear``:
  int4 with no budget, its error reported;
* ``graphopt <precision>+compile``: the same graphs with decode run through
  ``torch.compile`` (``compile_decode=True``; compiled at the warm-up, whose
  time is reported);
* ``graphopt <precision>+aot``: decode compiled ahead of time by AOTInductor
  (``compile_decode="aot"``; compiled before the rounds, its time reported as
  ``aot_compile_s``).

All variants are timed round-robin (``--rounds`` rounds, after one warm-up
each), the median kept: the load of a busy machine hits them alike; the load
average is printed with the figures. Prefill ms is the time to the first new
token (the median over the generate rounds and ``--prefill-rounds`` more
prefill-only calls, interleaved: one generate call gives one prefill sample;
compiled variants take only the generate rounds'); decode is the mean time
per later token (a step gives every row one token; tokens/s counts all rows). Greedy tokens are compared with ``hf eager
dynamic``'s. Reduced precision is judged by teacher-forced logits over a
``--prompt``-token prompt plus ``--new`` decode steps (8 rows) against the fp32
model (relative L2 and top-1), never by free-running text.

    python benchmarks/generate.py                          # llama and gpt2, batches 1 and 8
    python benchmarks/generate.py --models llama --batches 1 --write   # figures into RESULTS.md
    python benchmarks/generate.py --tiny                   # a seconds-long smoke run (CI)
    python benchmarks/generate.py --device cuda            # a lent GPU
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import graphopt  # noqa: E402
from graphopt import ir, meta  # noqa: E402
from graphopt.generate import GenerationTimes, check_steps  # noqa: E402
from graphopt.generate.measure import time_generation  # noqa: E402
from graphopt.passes.precision import INT4_BUDGET  # noqa: E402
from graphopt.verify import ErrorBudget  # noqa: E402

PRECISIONS = ("fp32", "bf16", "int8", "int8wo", "int4", "auto", "auto-int4-budget", "int4-every-linear")
#: the graphopt variants also timed with decode through torch.compile (+compile) and AOTInductor (+aot)
COMPILED = tuple(f"{p}+{runtime}" for runtime in ("compile", "aot")
                 for p in ("fp32", "int8wo", "auto", "int4", "auto-int4-budget", "int4-every-linear"))
#: ``<precision>+<runtime>``: the ``compile_decode`` value of each runtime
RUNTIMES: dict[str, bool | str] = {"compile": True, "aot": "aot"}
#: issue 16's budget for reduced precision: relative L2 2e-2 and teacher-forced top-1 >= 0.95
BUDGET = ErrorBudget(rel_l2=2e-2, top1=0.95)


def precision_options(precision: str) -> dict[str, Any]:
    """graphopt's options for one variant: int4 at its own documented budget; ``auto-int4-budget``: auto at
    int4's budget (int4, int8wo, bf16 per group, whichever is fastest within it); ``int4-every-linear`` with no
    budget at all (the speed of int4 weights, its error reported beside it); the rest at :data:`BUDGET`."""
    if precision == "fp32":
        return {}
    if precision == "int4":
        return {"precision": "int4"}
    if precision == "int4-every-linear":
        return {"precision": "int4", "error_budget": ErrorBudget(rel_l2=1e9)}
    if precision == "auto-int4-budget":  # auto held to int4's budget, which admits int4 among its choices
        return {"precision": "auto", "error_budget": INT4_BUDGET}
    return {"precision": precision, "error_budget": BUDGET}
HF_VARIANTS = ("hf eager dynamic", "hf sdpa static", "hf sdpa static compile")


def build(name: str, attn: str, tiny: bool) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    if name == "llama":
        size = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=512) if tiny else dict(
            num_hidden_layers=4, hidden_size=512, intermediate_size=1376, num_attention_heads=8,
            num_key_value_heads=2, vocab_size=32000)
        config = transformers.LlamaConfig(**size)
    elif name == "gpt2":
        config = transformers.GPT2Config(**(dict(n_layer=2, n_embd=64, n_head=4, vocab_size=512) if tiny else {}))
    else:
        raise SystemExit(f"unknown model {name!r}: llama or gpt2")
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


def hf_runner(model: torch.nn.Module, **kw: Any):
    def run(ids: torch.Tensor, new: int):
        return time_generation(model.generate, ids, torch.ones_like(ids), new, do_sample=False, eos_token_id=None,
                               pad_token_id=0, use_cache=True, **kw)
    return run


def graphopt_runner(graphs: Any):
    def run(ids: torch.Tensor, new: int):
        return time_generation(graphs.generate, ids, None, new, eos_token_id=None)
    return run


def variants(name: str, args: argparse.Namespace, info: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every variant's runner; build and compile times and errors go into ``info``."""
    eager = build(name, "eager", args.tiny).to(args.device)
    sdpa = build(name, "sdpa", args.tiny).to(args.device)
    sdpa.load_state_dict(eager.state_dict())
    runners: dict[str, Any] = {}
    if "hf" in args.variants:
        runners["hf eager dynamic"] = hf_runner(eager)
        runners["hf sdpa static"] = hf_runner(sdpa, cache_implementation="static", disable_compile=True)
        if not args.no_compile:
            compiled = copy.deepcopy(sdpa)
            compiled.forward = torch.compile(compiled.forward, fullgraph=True)
            runners["hf sdpa static compile"] = hf_runner(compiled, cache_implementation="static",
                                                          disable_compile=True)
    built: dict[str, Any] = {}
    for variant in [v for v in args.variants.split(",") if graphopt_variant(v)]:
        precision, _, runtime = variant.partition("+")
        label = f"graphopt {variant}"
        if precision not in built:
            t0 = time.perf_counter()
            try:
                graphs = graphopt.prepare_generation(sdpa, max_length=args.prompt + args.new + 8,
                                                     **precision_options(precision))
            except Exception as exc:  # a precision the machine cannot run is a row, not a crash
                graphs = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            built[precision] = (graphs, round(time.perf_counter() - t0, 1))
        graphs, build_s = built[precision]
        if isinstance(graphs, str):
            info[label] = {"status": graphs}
            continue
        if runtime:  # the same graphs, decode compiled (torch.compile: at the warm-up; AOTInductor: here, timed)
            graphs = dataclasses.replace(graphs, compile_decode=RUNTIMES[runtime], times=GenerationTimes(),
                                         _compiled=None, _decode_runner=None)
            t0 = time.perf_counter()
            graphs.decode_step(torch.device(args.device))
            compile_s = round(time.perf_counter() - t0, 1)
        # at the lengths timed, on other prompts and forced tokens than the build checked (seed)
        check = check_steps(graphs, eager, steps=args.new, prompt=args.prompt, seed=11)
        info[label] = {"build_s": build_s, "teacher_forced_rel_l2": check.rel_l2, "teacher_forced_top1": check.top1,
                       "approximate": list(graphs.decode.approximate + graphs.prefill.approximate),
                       "decode_weights": weight_formats(graphs.decode.module),
                       **({"aot_compile_s": compile_s} if runtime == "aot" else {}),
                       "notes": graphs.notes + ([f"decode not compiled: {graphs.compiled_note}"]
                                                if graphs.compiled_note else [])}
        runners[label] = graphopt_runner(graphs)
    return runners


def weight_formats(gm: torch.fx.GraphModule) -> dict[str, float]:
    """Share of the graph's matmul weights (elements) per format: what a plan's speed is made of (an "int4" plan
    whose linears the budget kept out of int4 runs mostly int8 weight-only)."""
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or len(node.args) < 2 or getattr(node.args[1], "op", None) != "get_attr":
            continue
        weight = ir.get_attr_value(gm, node.args[1])
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            continue
        kind = node.meta.get(meta.PRECISION, "fp32")  # what the precision pass chose for the node
        counts[kind] = counts.get(kind, 0) + weight.numel() * (2 if kind == "int4" else 1)
    total = sum(counts.values()) or 1
    return {k: v / total for k, v in sorted(counts.items(), key=lambda kv: -kv[1])}


def graphopt_variant(variant: str) -> bool:
    """``<precision>``, ``<precision>+compile`` (decode through torch.compile) or ``<precision>+aot``
    (AOTInductor)."""
    precision, plus, runtime = variant.partition("+")
    return precision in PRECISIONS and (not plus or runtime in RUNTIMES)


def measure(name: str, args: argparse.Namespace) -> dict[str, Any]:
    info: dict[str, dict[str, Any]] = {}
    runners = variants(name, args, info)
    vocab_hi = 500 if args.tiny else 30000
    results: dict[str, Any] = {}
    for batch in [int(b) for b in args.batches.split(",")]:
        ids = torch.randint(1, vocab_hi, (batch, args.prompt), generator=torch.Generator().manual_seed(batch))
        ids = ids.to(args.device)
        samples: dict[str, list[Any]] = {v: [] for v in runners}
        for v, run in runners.items():  # warm-up (and the compile, timed)
            t0 = time.perf_counter()
            run(ids, args.new)  # the same lengths as the timed runs: a static cache of another size recompiles
            info.setdefault(v, {})[f"warmup_s_b{batch}"] = round(time.perf_counter() - t0, 1)
        for _ in range(args.rounds):
            for v, run in runners.items():
                samples[v].append(run(ids, args.new))
        prefills = {v: [r.prefill_ms for r in runs] for v, runs in samples.items()}
        for _ in range(args.prefill_rounds):  # a prefill is one sample per generate call: take more, interleaved
            for v in [v for v in runners if "compile" not in v]:  # another cache length would recompile those
                # (+aot variants too take these: their one compile serves every cache length)
                prefills[v].append(runners[v](ids, 2).prefill_ms)
        reference = samples.get("hf eager dynamic", [None])[0]
        for v, runs in samples.items():
            row = {"prefill_ms": statistics.median(prefills[v]), "prefill_samples": len(prefills[v]),
                   "decode_ms": statistics.median(r.decode_ms for r in runs), "batch": batch}
            row["decode_tokens_per_s"] = batch * 1e3 / row["decode_ms"]
            if reference is not None:
                same = (runs[0].tokens == reference.tokens)[:, args.prompt:]
                row["tokens_equal"] = bool(same.all())
                row["token_agreement"] = float(same.float().mean())
            results[f"{v} b{batch}"] = {**row, **info.get(v, {})}
        print(f"[{name} b{batch}] load average {os.getloadavg()}", file=sys.stderr)
    failed = {v: i["status"] for v, i in info.items() if "status" in i}
    for v, status in failed.items():  # a variant that did not build is reported, not silently left out
        print(f"[{name}] {v} did not build: {status}", file=sys.stderr)
    return {"results": results, "failed": failed, "load_average": os.getloadavg()}


def markdown(data: dict[str, Any]) -> str:
    from results_file import cpu_description, markers

    begin, end = markers("generate")
    out = [begin, "## Generation (benchmarks/generate.py)", "",
           f"{data['machine']}, {torch.get_num_threads()} threads, torch {torch.__version__}; prompt "
           f"{data['prompt']}, {data['new']} new tokens, greedy, median of {data['rounds']} interleaved rounds.", ""]
    _ = cpu_description
    for model, section in data["models"].items():
        rows = section["results"]
        fastest_hf = {b: max((r["decode_tokens_per_s"] for k, r in rows.items()
                              if k.startswith("hf") and r["batch"] == b), default=None)
                      for b in {r["batch"] for r in rows.values()}}
        out += [f"**{model}** (load average after: {', '.join(f'{x:.2f}' for x in section['load_average'])})", "",
                "| variant | prefill ms | decode ms/step | decode tokens/s | x fastest hf | tokens equal | "
                "teacher-forced rel L2 / top-1 | decode weights | build s |", "|---|---|---|---|---|---|---|---|---|"]
        for key, r in rows.items():
            ratio = r["decode_tokens_per_s"] / fastest_hf[r["batch"]] if fastest_hf.get(r["batch"]) else None
            err = (f"{r['teacher_forced_rel_l2']:.2e} / {r['teacher_forced_top1']:.3f}"
                   if "teacher_forced_rel_l2" in r else "")
            weights = " ".join(f"{k} {v:.0%}" for k, v in r.get("decode_weights", {}).items())
            out.append(f"| {key} | {r['prefill_ms']:.1f} | {r['decode_ms']:.2f} | {r['decode_tokens_per_s']:.1f} | "
                       f"{'' if ratio is None else f'{ratio:.2f}x'} | {r.get('tokens_equal', '')} | {err} | "
                       f"{weights} | {r.get('build_s', '')} |")
        out += [f"| {v} | did not build: {status} |  |  |  |  |  |  |  |"
                for v, status in section.get("failed", {}).items()]
        out.append("")
    out.append(end)
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="llama,gpt2")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prefill-rounds", type=int, default=12,
                   help="extra interleaved prefill-only calls per variant (2 new tokens; not for compiled variants, "
                        "whose static cache would recompile at another length)")
    p.add_argument("--variants", default=",".join(["hf", *PRECISIONS, *COMPILED]),
                   help="comma list: hf (the three transformers variants) and graphopt precisions, each also as "
                        "<precision>+compile (decode through torch.compile) or <precision>+aot (AOTInductor)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant (slow to compile)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--tiny", action="store_true", help="tiny models and lengths: a smoke run")
    p.add_argument("--json", metavar="FILE", help="also write the raw figures here")
    p.add_argument("--write", action="store_true", help="put the table into benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    if args.tiny:
        args.prompt, args.new, args.rounds, args.prefill_rounds = min(args.prompt, 8), min(args.new, 6), 1, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from results_file import cpu_description, write_section

    data = {"machine": cpu_description() if args.device == "cpu" else torch.cuda.get_device_name(),
            "prompt": args.prompt, "new": args.new, "rounds": args.rounds, "models": {}}
    for name in args.models.split(","):
        data["models"][name] = measure(name, args)
    text = markdown(data)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(data, f, indent=2, default=str)
    if args.write:
        write_section("generate", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
