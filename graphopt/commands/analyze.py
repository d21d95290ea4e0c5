"""``graphopt analyze SPEC``: where the model spends its time and memory.

Prints the top hot spots (module path, op, shapes, FLOPs, bytes, intensity,
roofline bound, predicted and measured ms, % of total) and a summary (total
FLOPs, predicted time, peak activation memory, attention sites, FFN chains,
repeated blocks). ``--json`` prints the documented JSON instead
(docs/analysis.md); ``--profile`` runs the model to measure each node's time
and the peak of torch's allocations.
"""

from __future__ import annotations

import argparse
from typing import Any

from graphopt.commands.common import UsageError, add_spec_argument, load_model, out_console, step


def register(sub: Any) -> None:
    p = sub.add_parser("analyze", help="cost, roofline, peak memory and hot spots of a model",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_spec_argument(p)
    p.add_argument("--top", type=int, default=15, metavar="N", help="how many hot spots to list (default 15)")
    p.add_argument("--json", action="store_true", help="print the analysis as JSON (schema: docs/analysis.md)")
    p.add_argument("--profile", action="store_true",
                   help="run the model to measure per-node time and peak memory beside the prediction")
    p.add_argument("--target", metavar="FILE",
                   help="a roofline JSON file (Target.to_dict) to use instead of the measured one")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import json

    import graphopt
    from graphopt.cost import Target

    if args.top < 1:
        raise UsageError("--top must be at least 1")
    target = None
    if args.target:
        try:
            with open(args.target) as f:
                target = Target.from_dict(json.load(f))
        except (ValueError, KeyError) as exc:
            raise UsageError(f"{args.target} is not a target JSON ({exc}); write it like Target.to_dict()") from exc
    spec = load_model(args.spec)
    with step("analysing" + (" and profiling" if args.profile else "")):
        analysis = graphopt.analyze(spec.model, spec.args, spec.kwargs, target=target, profile=args.profile,
                                    top=args.top)
    analysis.model = spec.name
    if args.json:
        out_console.print_json(analysis.to_json(top=args.top))
    else:
        analysis.render(out_console, top=args.top)
    return 0
