"""``graphopt convert SPEC -o DIR``: optimize a model, then export it to ONNX checked in onnxruntime.

It is ``graphopt optimize`` (same options, same code path) followed by the
export. DIR receives:

  model.pt2     the optimized program, flat tensor outputs (torch.export.load)
  graphopt.json what graphopt.load(DIR) reads: the output structure (and, with
                --generate, the cache layout and generation config)
  prefill.pt2, decode.pt2   with --generate: the generation bundle
  model.onnx    the ONNX model, checked: onnx.checker, shape inference, and
                onnxruntime vs torch on the example and fresh inputs
                (model.onnx.data next to it when the weights exceed 1 GiB)
  report.json   the optimization report, with the export under extra.onnx
  report.md     the same report as Markdown
  graph.html    the graph viewer's page (when graphopt.visualize is available)

For a causal LM it also prints (and records under extra.onnx.decode_speed)
the greedy decode tokens/s in onnxruntime, on the KV-cache graph of
graphopt.onnx.kv_cache, beside torch's (graphopt's decode graph with
--generate, else transformers' generate); --no-speed skips it.

Everything is built in a temporary directory next to DIR and moved into place
at the end: a failure leaves nothing behind. An existing DIR is refused
without --force.

exit codes:
  0  converted and checked
  1  a numeric check failed (onnxruntime vs torch, or the optimized graph vs
     the original model); nothing written
  2  bad input, or the model could not be converted (e.g. an operator without
     ONNX translation, named in the message); nothing written
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from rich.markup import escape

from graphopt.commands.common import UsageError, err_console, load_model, out_console, parse_options, step
from graphopt.commands.optimize import add_optimize_arguments, check_output_dir, named_options, \
    optimize_from_args
from graphopt.commands.output_dir import staged_output_dir
from graphopt.onnx import (
    TARGETS,
    OnnxExport,
    OnnxExportError,
    OnnxMismatchError,
    dynamic_shapes_for,
    export_onnx,
    parse_dynamic,
    record_onnx_export,
    widen_for_dynamic,
)
from graphopt.model_inputs import is_causal_lm
from graphopt.onnx.decode_speed import DecodeSpeed, compare_decode_speed
from graphopt.optimize import OptimizeResult
from graphopt.viz import visualize

log = logging.getLogger(__name__)

#: exit code when a numeric check fails
EXIT_CHECK_FAILED = 1


class CheckFailed(Exception):
    """A numeric check failed; the command exits 1 after the outputs are discarded."""


def register(sub: Any) -> None:
    p = sub.add_parser("convert", help="optimize a model and export a checked ONNX model (+ .pt2, reports)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_optimize_arguments(p)
    p.add_argument("--opset", type=int, metavar="N",
                   help="ai.onnx opset (default: 23 when the graph has fused attention, else torch.onnx's default)")
    p.add_argument("--dynamic", metavar="AXES", help="dynamic axes: batch, seq or batch,seq")
    p.add_argument("--target", choices=TARGETS, default="onnxruntime",
                   help="onnxruntime: apply graphopt's onnxruntime rewrites (may use com.microsoft ops); "
                        "standard: ai.onnx ops only (default: onnxruntime)")
    p.add_argument("--no-speed", action="store_true",
                   help="skip the timings: the plain torch.onnx export of the original against graphopt's, and "
                        "a causal LM's decode tokens/s in onnxruntime (KV-cache graph) against torch's")
    p.add_argument("--speed-runs", type=int, default=10, metavar="N", help="timed runs per model (default 10)")
    p.add_argument("--generate", action="store_true",
                   help="a causal LM: also write the generation bundle (prefill.pt2, decode.pt2, the cache layout "
                        "in graphopt.json); graphopt.load(DIR).generate(...) runs it without the model's code")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Optimize, save model.pt2, export and check model.onnx, write the reports; the exit code."""
    check_output_dir(args.output, args.force)  # refuse early, before the slow work
    try:
        axes = parse_dynamic(args.dynamic)
    except ValueError as exc:
        raise UsageError(f"--dynamic: {exc}") from exc
    if args.opset is not None and not 7 <= args.opset <= 30:
        raise UsageError(f"--opset {args.opset}: give an ai.onnx opset such as 18, 20 or 23")
    named_options(args, parse_options(args.option))  # budgets and verify checked before the model is built
    spec = load_model(args.spec)
    dynamic_shapes = None
    if axes:
        spec.args, spec.kwargs = widen_for_dynamic(spec.args, spec.kwargs, axes)
        try:
            dynamic_shapes = dynamic_shapes_for(spec.model, spec.args, spec.kwargs, axes)
        except ValueError as exc:
            raise UsageError(f"--dynamic: {exc}") from exc
    extra = {}
    if args.precision and "precision_int8_pair_safe" not in parse_options(args.option):
        extra["precision_int8_pair_safe"] = True  # an ONNX file is portable: exact on CPUs without VNNI too
    _spec, result = optimize_from_args(args, spec=spec, dynamic_shapes=dynamic_shapes, **extra)
    report = result.report
    try:
        with staged_output_dir(args.output, args.force) as staging:
            final = report.final_numerics
            if final is not None and not final.ok:
                raise CheckFailed(f"the optimized graph differs from the original model: {final.reason}")
            with step("saving model.pt2" + (" and the generation bundle" if args.generate else "")):
                result.save(staging, generation=args.generate)
            with step("exporting model.onnx and checking it in onnxruntime"):
                info = _export(result, os.path.join(staging, "model.onnx"), args, axes)
            record_onnx_export(report, info)
            # the report names the files where they will be, not where they were staged
            onnx_part = report.extra["onnx"]
            onnx_part["path"] = os.path.join(args.output, "model.onnx")
            onnx_part["files"] = [os.path.join(args.output, os.path.basename(f)) for f in onnx_part["files"]]
            decode, note = time_decode(result, args)
            onnx_part["decode_speed"] = decode.to_dict() if decode else None
            if note:
                onnx_part["notes"].append(note)
            note = write_graph_html(result, os.path.join(staging, "graph.html"))
            if note:
                onnx_part["notes"].append(note)
            _write_reports(report, staging)
            written = sorted(os.listdir(staging))
    except CheckFailed as exc:
        _print_report(report, args)
        err_console.print(f"[red]check failed:[/] {escape(f'{exc}; nothing was written to {args.output}')}")
        return EXIT_CHECK_FAILED
    _print_report(report, args)
    err_console.print(info.summary(), markup=False)
    if decode:
        err_console.print(decode.summary(), markup=False)
    err_console.print(f"wrote {', '.join(os.path.join(args.output, n) for n in written)}", markup=False)
    return 0


def _export(result: OptimizeResult, path: str, args: argparse.Namespace, axes: tuple[str, ...]) -> OnnxExport:
    """Export and check; a mismatch (recorded in the report) is a :class:`CheckFailed`, any other failure exit 2."""
    try:
        return export_onnx(result, path, dynamic=axes, opset=args.opset, target=args.target,
                           compare_speed=not args.no_speed, speed_runs=args.speed_runs)
    except OnnxMismatchError as exc:
        record_onnx_export(result.report, exc.export)
        raise CheckFailed(str(exc)) from exc
    except OnnxExportError as exc:
        raise UsageError(f"conversion failed, nothing was written: {exc}") from exc
    except Exception as exc:  # anything else in the export is a failed conversion too (exit 2)
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise UsageError(f"conversion failed, nothing was written: {type(exc).__name__}: {first} "
                         f"(--debug shows the traceback)") from exc


def time_decode(result: OptimizeResult, args: argparse.Namespace) -> tuple[DecodeSpeed | None, str]:
    """A causal LM's decode tokens/s in onnxruntime beside torch's (unless --no-speed); a note when it fails."""
    if args.no_speed or not is_causal_lm(result.source_model):
        return None, ""
    try:
        with step("timing decode in onnxruntime (KV-cache graph) and torch"):
            return compare_decode_speed(result), ""
    except Exception as exc:  # a timing is auxiliary: the checked model still stands
        log.warning("decode speed not measured: %s", exc)
        return None, f"decode speed not measured: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"


def write_graph_html(result: OptimizeResult, path: str) -> str:
    """Write the viewer's page with ``graphopt.visualize(result, path)``; a note when it fails."""
    try:
        visualize(result, path)
    except Exception as exc:  # the viewer is auxiliary: the checked model still stands
        log.warning("graph.html not written: %s", exc)
        return f"graph.html not written: the viewer failed ({type(exc).__name__}: {exc})"
    return ""


def _write_reports(report: Any, directory: str) -> None:
    with open(os.path.join(directory, "report.json"), "w") as f:
        f.write(report.to_json())
    with open(os.path.join(directory, "report.md"), "w") as f:
        f.write(report.to_markdown())


def _print_report(report: Any, args: argparse.Namespace) -> None:
    if args.json:
        out_console.print_json(report.to_json())
    else:
        report.render(out_console)
