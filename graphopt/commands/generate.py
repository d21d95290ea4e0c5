"""``graphopt generate SPEC``: optimize a causal LM for generation and time it.

Builds the optimized prefill and decode graphs (checked on real decode
steps), generates ``--new-tokens`` after a random prompt of ``--prompt-len``
tokens for ``--batch`` rows, and prints prefill ms, decode ms per token and
tokens/s. ``--compare`` runs the original model's own ``generate`` (transformers,
dynamic KV cache) on the same prompt beside it and checks the tokens: equal at
fp32, or, with ``--precision``, the teacher-forced error within the budget.
``--compile`` runs the decode graph through ``torch.compile``, ``--compile aot``
compiles it ahead of time with AOTInductor (the faster step, 15-30 s to
compile); either is checked like the graphs, and where it cannot compile,
decode runs uncompiled and a note says why.
``hf:`` specs get transformers' ``sdpa`` attention unless the spec names one.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from graphopt.commands.common import UsageError, add_spec_argument, err_console, load_model, out_console, \
    parse_options, step

PRECISIONS = ["bf16", "fp16", "int8", "int8wo", "int4", "fp8", "auto"]
#: ``--compile [jit|aot]``: the ``compile_decode`` value of each
COMPILE_FLAGS: dict[str, bool | str] = {"jit": True, "aot": "aot"}


def register(sub: Any) -> None:
    p = sub.add_parser("generate", help="optimize a causal LM for generation (KV cache) and time it",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_spec_argument(p)
    p.add_argument("--prompt-len", type=int, default=32, metavar="N", help="prompt tokens (default 32)")
    p.add_argument("--new-tokens", type=int, default=32, metavar="N", help="tokens to generate (default 32)")
    p.add_argument("--batch", type=int, default=1, metavar="B", help="rows generated together (default 1)")
    p.add_argument("--precision", choices=PRECISIONS, help="reduced precision within the error budget")
    p.add_argument("--error-budget", type=float, metavar="REL_L2", help="error budget for --precision")
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="a pass option (repeatable)")
    p.add_argument("--compile", nargs="?", const="jit", choices=sorted(COMPILE_FLAGS), default=None,
                   help="run the decode graph through torch.compile (its small ops fused; compiles once, seconds), "
                        "or with 'aot' compile it ahead of time with AOTInductor (no per-step guards or Python "
                        "wrapper; 15-30 s)")
    p.add_argument("--compare", action="store_true", help="time the original model's generate beside it")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.set_defaults(handler=run)


def _with_sdpa(spec: str) -> str:
    if not spec.startswith("hf:") or "attn_implementation=" in spec:
        return spec
    return spec + ("&" if "?" in spec else "?") + "attn_implementation=sdpa"


def _check_sizes(args: argparse.Namespace) -> None:
    for name in ("prompt_len", "new_tokens", "batch"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    if args.new_tokens < 2:
        raise UsageError("--new-tokens must be at least 2 to time a decode step")


def run(args: argparse.Namespace) -> int:
    import torch

    import graphopt
    from graphopt.generate import is_causal_lm
    from graphopt.generate.measure import time_generation

    _check_sizes(args)
    spec = load_model(_with_sdpa(args.spec))
    if not is_causal_lm(spec.model):
        raise UsageError(f"{spec.name} is not a transformers causal LM; generate needs one (e.g. 'hf:llama?...')")
    options = parse_options(args.option)
    if args.precision:
        options["precision"] = args.precision
    if args.error_budget is not None:
        options["error_budget"] = args.error_budget
    vocab = int(spec.model.config.vocab_size)
    ids = torch.randint(1, vocab, (args.batch, args.prompt_len), generator=torch.Generator().manual_seed(0))
    with step("building the prefill and decode graphs") as status:
        graphs = graphopt.generate.prepare_generation(
            spec.model, max_length=args.prompt_len + args.new_tokens,
            compile_decode=COMPILE_FLAGS.get(args.compile, False),
            progress=(lambda m: status.update(m)) if status is not None else None, **options)
    run_kwargs = {"do_sample": False, "eos_token_id": None}
    if graphs.compile_decode is True:
        with step("compiling decode for this batch size"):  # torch.compile specialises batch 1 apart from others
            graphs.generate(ids, max_new_tokens=2, **run_kwargs)
    with step("generating"):
        ours = time_generation(graphs.generate, ids, None, args.new_tokens, **run_kwargs)
        theirs = time_generation(spec.model.generate, ids, None, args.new_tokens, pad_token_id=0,
                                 use_cache=True, **run_kwargs) if args.compare else None
    if theirs is not None and (graphs.prefill.approximate or graphs.decode.approximate):
        with step("teacher-forced check at these lengths"):  # reduced precision's error grows with the context
            graphs.check = graphopt.generate.check_steps(graphs, spec.model, steps=args.new_tokens,
                                                         prompt=args.prompt_len)
    report = _report(spec.name, graphs, ours, theirs)
    _print(report, args.json)
    return 0 if report.get("tokens_equal", True) or report.get("within_budget", False) else 1


def _report(name: str, graphs: Any, ours: Any, theirs: Any) -> dict[str, Any]:
    approximate = bool(graphs.prefill.approximate or graphs.decode.approximate)
    report: dict[str, Any] = {"model": name, "graphopt": ours.to_dict(), "check": graphs.check.summary(),
                              "decode_compiled": graphs.compile_decode, "notes": list(graphs.notes)}
    if theirs is not None:
        report["original"] = theirs.to_dict()
        report["decode_speedup"] = round(theirs.decode_ms / ours.decode_ms, 3)
        report["tokens_equal"] = bool(ours.tokens.equal(theirs.tokens))
        if approximate:
            budget = graphs.decode.context.error_budget
            report["within_budget"] = graphs.check.ok(budget)
    return report


def _print(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        out_console.print_json(json.dumps(report))
        return
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(f"generation: {report['model']}"))
    for col in ("", "prefill ms", "decode ms/token", "tokens/s"):
        table.add_column(col, justify="right" if col else "left")
    for who in ("graphopt", "original"):
        if who in report:
            f = report[who]
            table.add_row(who, f"{f['prefill_ms']:.1f}", f"{f['decode_ms_per_token']:.2f}",
                          f"{f['decode_tokens_per_s'] * f['batch']:.1f}")
    out_console.print(table)
    err_console.print(report["check"], markup=False)
    for note in report["notes"]:
        err_console.print(f"note: {note}", markup=False)
    if "tokens_equal" in report:
        verdict = "tokens equal" if report["tokens_equal"] else (
            "tokens differ (reduced precision); teacher-forced error "
            + ("within" if report.get("within_budget") else "OVER") + " the budget")
        err_console.print(f"decode {report['decode_speedup']:.2f}x the original's speed; {verdict}")
