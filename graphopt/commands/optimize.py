"""``graphopt optimize SPEC -o DIR``: optimize a model, save it, print the report."""

from __future__ import annotations

import argparse
import os
from typing import Any

from graphopt.commands.common import UsageError, add_spec_argument, err_console, load_model, out_console, \
    parse_options, step
from graphopt.commands.output_dir import check_output_dir, staged_output_dir

__all__ = ["add_optimize_arguments", "check_output_dir", "optimize_from_args", "register", "run"]


def add_optimize_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by ``optimize`` and the commands that extend it."""
    add_spec_argument(p)
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output directory (written atomically: nothing is left on failure)")
    p.add_argument("--force", action="store_true", help="if DIR exists, replace graphopt's files in it")
    p.add_argument("--passes", metavar="A,B,...", help="run these passes (see `graphopt passes`) instead of the default pipeline")
    p.add_argument("--no-verify", action="store_true", help="skip the numeric check of each rewrite (not recommended)")
    p.add_argument("--memory-budget", metavar="SIZE", help="peak activation memory to fit, e.g. 2GiB")
    p.add_argument("--precision", choices=["bf16", "fp16", "int8", "fp8", "int8wo", "int4", "auto"],
                   help="reduced precision within the error budget ('auto': fastest measured on this machine)")
    p.add_argument("--error-budget", type=float, metavar="REL_L2",
                   help="largest relative L2 error of the outputs a reduced-precision rewrite may add (default 1e-2)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="a pass option (repeatable)")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")


def register(sub: Any) -> None:
    p = sub.add_parser("optimize", help="optimize a model and save model.pt2 + report.json",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_optimize_arguments(p)
    p.set_defaults(handler=run)


def select_passes(names: str | None) -> list | None:
    if not names:
        return None
    from graphopt import passes

    classes = {cls.name: cls for cls in passes.all_pass_classes()}
    chosen = []
    for name in [n.strip() for n in names.split(",") if n.strip()]:
        if name not in classes:
            raise UsageError(f"unknown pass {name!r}; `graphopt passes` lists them: {', '.join(sorted(classes))}")
        chosen.append(classes[name]())
    return chosen


def optimize_from_args(args: argparse.Namespace, *, spec: Any = None, dynamic_shapes: Any = None,
                       **extra: Any) -> Any:
    """Load the spec (unless given) and run graphopt.optimize as the CLI options say.

    ``extra`` are pass options added to ``--option``'s; ``dynamic_shapes`` goes
    to the capture. Returns ``(spec, result)``. Shared by every command that
    extends ``optimize`` (``convert``).
    """
    import graphopt

    options = parse_options(args.option)
    if getattr(args, "precision", None):
        options["precision"] = args.precision
    options.update(extra)
    named = named_options(args, options)  # checked before the model is built
    passes = select_passes(args.passes)
    spec = spec if spec is not None else load_model(args.spec)
    label = {"text": "optimizing"}

    with step("optimizing") as status:
        def progress(name: str) -> None:
            label["text"] = f"optimizing: {name}"
            if status is not None:
                status.update(label["text"])
            elif ": " not in name:  # no live line (not a terminal): passes only, not every step inside one
                err_console.print(f"[dim]  pass {name}[/]")

        # an unknown or bad option (errors.OptionError), a budget no plan meets (passes.blocked.BudgetError):
        # graphopt.errors.BadInput, which the CLI reports as one line
        result = graphopt.optimize(
            spec.model, spec.args, spec.kwargs, passes=passes, dynamic_shapes=dynamic_shapes, progress=progress,
            **named, **options,
        )
    result.report.model = spec.name
    return spec, result


#: optimize()'s own arguments that ``--option`` may also name (each once: by its flag or by --option)
_NAMED = {"memory_budget": "--memory-budget", "error_budget": "--error-budget", "verify": "--no-verify"}


def named_options(args: argparse.Namespace, options: dict[str, Any]) -> dict[str, Any]:
    """``memory_budget``, ``error_budget`` and ``verify`` from their flags or ``--option`` (moved out of
    ``options``), validated: a bad value, or one given both ways, is a UsageError before any work."""
    from graphopt.optimize import parse_bytes
    from graphopt.verify import ErrorBudget

    flags = {"memory_budget": args.memory_budget, "error_budget": getattr(args, "error_budget", None),
             "verify": False if args.no_verify else None}
    for key, flag in _NAMED.items():
        if key in options:
            if flags[key] is not None:
                raise UsageError(f"{key} is given twice ({flag} and --option {key}=...); keep one")
            flags[key] = options.pop(key)
    if not isinstance(flags["verify"], (bool, type(None))):
        raise UsageError(f"--option verify={flags['verify']!r}: write verify=true or verify=false")
    parse_bytes(flags["memory_budget"])
    if flags["error_budget"] is not None:
        if isinstance(flags["error_budget"], bool) or not isinstance(flags["error_budget"], (int, float)):
            raise UsageError(f"error_budget={flags['error_budget']!r}: write a relative L2 error such as 1e-2")
        ErrorBudget(rel_l2=float(flags["error_budget"]))
    return {"memory_budget": flags["memory_budget"], "error_budget": flags["error_budget"],
            "verify": True if flags["verify"] is None else flags["verify"]}


def run(args: argparse.Namespace) -> int:
    check_output_dir(args.output, args.force)
    _spec, result = optimize_from_args(args)
    with step(f"saving to {args.output}"), staged_output_dir(args.output, args.force) as staging:
        names = [os.path.basename(p) for p in result.save(staging).values()]
    paths = {name: os.path.join(args.output, name) for name in names}
    if args.json:
        out_console.print_json(result.report.to_json())
    else:
        result.report.render(out_console)
    err_console.print(f"wrote {', '.join(paths.values())}", markup=False)
    final = result.report.final_numerics
    return 0 if final is None or final.ok else 1
