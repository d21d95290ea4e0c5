"""``graphopt analyze SPEC``: where the model spends its time and memory.

Prints the top hot spots (module path, op, shapes, FLOPs, bytes, intensity,
roofline bound, predicted and measured ms, % of total) and a summary (total
FLOPs, predicted time, peak activation memory, attention sites, FFN chains,
repeated blocks). ``--json`` prints the documented JSON instead
(docs/analysis.md); ``--profile`` runs the model to measure each node's time
and the peak of torch's allocations.

An ``.onnx`` file is read without running it (graphopt.onnx.reader): op
counts, FLOPs per node (MatMul, Gemm, Conv, attention ops), the heaviest
nodes and the weight size; ``--dim batch=1`` sizes symbolic axes.
"""

from __future__ import annotations

import argparse
from typing import Any

from rich.markup import escape

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
                   help="a roofline JSON file (Roofline.to_dict) to use instead of the measured one")
    p.add_argument("--dim", action="append", metavar="NAME=SIZE",
                   help=".onnx only: size of a symbolic axis for shapes and FLOPs (repeatable), e.g. --dim seq=128")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import json

    import graphopt
    from graphopt.target import Roofline

    if args.top < 1:
        raise UsageError("--top must be at least 1")
    if args.spec.endswith(".onnx"):
        return run_onnx(args)
    if args.dim:
        raise UsageError("--dim applies to .onnx files only")
    target = None
    if args.target:
        try:
            with open(args.target) as f:
                target = Roofline.from_dict(json.load(f))
        except (ValueError, KeyError, TypeError, AttributeError, OSError) as exc:
            raise UsageError(f"{args.target} is not a target JSON ({exc}); write it like Roofline.to_dict()") from exc
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


def _human(count: float) -> str:
    """``1.23 G``, ``45.6 M``, ``789 `` (a count with an SI prefix)."""
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f} {prefix}"
    return f"{count:.0f} "


def _parse_dims(pairs: list[str] | None) -> dict[str, int]:
    dims = {}
    for pair in pairs or []:
        name, sep, size = pair.partition("=")
        if not sep or not name or not size.isdigit():
            raise UsageError(f"--dim {pair!r}: write it as NAME=SIZE, e.g. --dim seq=128")
        dims[name] = int(size)
    return dims


def run_onnx(args: argparse.Namespace) -> int:
    """``graphopt analyze model.onnx``: what the file computes, read without running it."""
    from rich.table import Table

    from graphopt.onnx.reader import load_onnx

    if args.profile or args.target:
        raise UsageError("--profile and --target need a PyTorch model; an .onnx file is only read "
                         "(run it with onnxruntime's profiler for measured times)")
    dims = _parse_dims(args.dim)
    with step(f"reading {args.spec}"):
        try:
            graph = load_onnx(args.spec, dims=dims)
        except FileNotFoundError as exc:
            raise UsageError(str(exc)) from exc
        except Exception as exc:  # onnx's DecodeError and friends: not an ONNX model
            raise UsageError(f"{args.spec} is not a readable ONNX model ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if not graph.nodes:
        raise UsageError(f"{args.spec} holds no graph nodes: is it an ONNX model? (export one with "
                         "`graphopt convert SPEC -o DIR`)")
    total = graph.total_flops()
    heavy = sorted((n for n in graph.nodes if n.flops), key=lambda n: n.flops or 0, reverse=True)[:args.top]
    if args.json:
        out = graph.to_dict()
        out["top"] = [{"name": n.name, "op": n.op, "flops": n.flops} for n in heavy]
        out_console.print_json(data=out)
        return 0
    unknown = sum(1 for n in graph.nodes if n.op_type in ("MatMul", "Gemm", "Conv") and n.flops is None)
    table = Table(title=escape(f"{args.spec}: the {len(heavy)} heaviest nodes by FLOPs"))
    for col, justify in (("node", "left"), ("op", "left"), ("output shape", "left"), ("FLOPs", "right"),
                         ("% of total", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for n in heavy:
        info = graph.tensors.get(n.outputs[0]) if n.outputs else None
        shape = "x".join(str(d) for d in info.shape) if info is not None and info.shape is not None else "?"
        table.add_row(escape(n.name), escape(n.op), escape(shape), _human(n.flops or 0), f"{100 * (n.flops or 0) / total:.1f}"
                      if total else "")
    out_console.print(table)
    ops = ", ".join(f"{op} {count}" for op, count in graph.op_counts().most_common(12))
    out_console.print(f"nodes: {len(graph.nodes)} ({ops})", highlight=False, markup=False)
    out_console.print(f"total: {_human(total)}FLOP; weights {graph.weight_bytes() / 2**20:.1f} MiB; "
                      f"inputs " + ", ".join(f"{t.name} {t.dtype} {list(t.shape) if t.shape else '?'}"
                                             for t in graph.inputs), highlight=False, markup=False)
    if unknown:
        out_console.print(f"{unknown} MatMul/Gemm/Conv nodes have symbolic shapes: their FLOPs are not counted; "
                          "give sizes with --dim NAME=SIZE", highlight=False)
    return 0
