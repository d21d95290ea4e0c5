"""``graphopt viz SPEC -o graph.html``: draw a model's graph (and, with --diff, its optimization).

Without ``--diff`` the captured graph is shown; with ``--diff`` the model is
optimized first (the same passes and options as ``graphopt optimize``) and the
page shows the optimized graph with the captured one as its "before" view,
each removed/added node marked and attributed to the pass that did it.

``--profile`` runs the graph to measure each node's time
(:func:`graphopt.analyze` with ``profile=True``); the page then colours by
measured time. Formats: ``html`` (interactive, self-contained), ``dot`` (Graphviz: ``dot
-Tsvg graph.dot``), ``model-explorer`` (node data JSON for Google's Model
Explorer: ``model-explorer model.pt2 --node_data_paths=costs.json``).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from graphopt.commands.output_dir import check_can_create
from graphopt.commands.common import UsageError, add_spec_argument, err_console, load_model, step


def register(sub: Any) -> None:
    p = sub.add_parser("viz", help="write an interactive HTML view of a model's graph (or DOT / Model Explorer data)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_spec_argument(p)
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="file to write, e.g. graph.html")
    p.add_argument("--diff", action="store_true", help="optimize first and show before/after")
    p.add_argument("--format", choices=["html", "dot", "model-explorer"], default="html",
                   help="output format (default: html)")
    p.add_argument("--metric", choices=["time", "bytes", "flops", "intensity"], default="time",
                   help="what DOT and Model Explorer colour nodes by (default: time)")
    p.add_argument("--profile", action="store_true",
                   help="run the graph to measure each node's time (colour by measured time)")
    p.add_argument("--passes", metavar="A,B,...", help="with --diff: run these passes instead of the default pipeline")
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="with --diff: a pass option (repeatable)")
    p.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import graphopt
    from graphopt.viz import PassHistory, visualize

    if os.path.isdir(args.output):
        raise UsageError(f"{args.output} is a directory; give a file name such as {os.path.join(args.output, 'graph.html')}")
    if os.path.exists(args.output) and not args.force:
        raise UsageError(f"{args.output} already exists; pass --force to overwrite it")
    check_can_create(os.path.dirname(os.path.abspath(args.output)), args.output, "-o")
    if (args.passes or args.option) and not args.diff:
        raise UsageError("--passes and --option only apply with --diff (they choose the optimization to show)")
    if args.diff and args.format == "model-explorer":
        raise UsageError("Model Explorer node data describes one graph; drop --diff or use --format html")
    if args.diff:
        from graphopt.commands.optimize import select_passes
        from graphopt.commands.common import parse_options

        spec = load_model(args.spec)
        with step("optimizing"):
            subject = graphopt.optimize(spec.model, spec.args, spec.kwargs, passes=select_passes(args.passes),
                                        instruments=[PassHistory()], **parse_options(args.option))
        subject.report.model = spec.name
        title = spec.name
    else:
        spec = load_model(args.spec)
        with step("capturing"):
            subject = graphopt.capture(spec.model, spec.args, spec.kwargs)
        title = spec.name
    analysis = None
    if args.profile:
        with step("profiling"):
            graph = subject if args.diff else subject.module
            analysis = graphopt.analyze(graph, spec.args, spec.kwargs, profile=True)
    with step(f"writing {args.output}"):
        path = visualize(subject, args.output, format=args.format, diff=args.diff, title=title, metric=args.metric,
                         analysis=analysis)
    err_console.print(f"wrote {path}", markup=False)
    return 0
