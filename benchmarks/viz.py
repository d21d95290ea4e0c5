"""Viewer benchmark: file size and first render of a 12-layer GPT-2 in headless Chromium.

GPT2Config defaults (12 layers, 768 wide, random weights), batch 1, seq 128,
optimized with the default pipeline; the page shows the optimized graph with
the captured graph as its "before" view. First render = time from navigation
start until the page has laid out and drawn (two animation frames after the
first render), as ``performance.now()`` reports it, over fresh page loads.

Targets (issue 9): file < 5 MB, first render < 2 s. Printed, not asserted.

    python benchmarks/viz.py [--layers 12] [--seq 128] [--repeats 5] [--out out/viz] [--write]

``--write`` replaces the "Viewer" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_file import cpu_description, markers, write_section  # noqa: E402

_BEGIN, _END = markers("viewer")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="out/viz")
    ap.add_argument("--write", action="store_true", help="write the Viewer section of benchmarks/RESULTS.md")
    args = ap.parse_args(argv)

    import graphopt
    from graphopt.specs import load_spec
    from graphopt.viz import PassHistory, visualize
    from graphopt.viz.browser import find_chromium, measure_first_render

    spec = load_spec(f"hf:gpt2?n_layer={args.layers}&seq={args.seq}")
    t0 = time.perf_counter()
    result = graphopt.optimize(spec.model, spec.args, spec.kwargs, instruments=[PassHistory()])
    t_opt = time.perf_counter() - t0
    result.report.model = spec.name
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"gpt2_{args.layers}l.html")
    t0 = time.perf_counter()
    visualize(result, path)
    t_write = time.perf_counter() - t0
    size = os.path.getsize(path)
    print(f"model: GPT-2 {args.layers} layers (GPT2Config defaults), seq {args.seq}: "
          f"{result.report.nodes_before} -> {result.report.nodes_after} nodes, optimize {t_opt:.1f} s")
    print(f"file: {path}: {size / 1e6:.2f} MB (target < 5 MB), written in {t_write:.2f} s")
    chromium = find_chromium()
    if chromium is None:
        print("first render: not measured (no Chromium; apt-get install chromium)")
        return 0
    loads = measure_first_render(path, repeats=args.repeats)
    renders = [load.first_render_ms for load in loads]
    scripts = [load.script_done_ms for load in loads]
    print(f"first render in headless Chromium ({chromium}), {len(loads)} fresh loads: "
          f"median {statistics.median(renders):.0f} ms, min {min(renders):.0f}, max {max(renders):.0f} "
          f"(target < 2000 ms); script done median {statistics.median(scripts):.0f} ms; "
          f"{loads[0].items} items drawn")
    expands = [load.expand_all_ms for load in loads if load.expand_all_ms is not None]
    print(f"expand all (every node laid out and drawn): median {statistics.median(expands):.0f} ms")
    errors = [e for load in loads for e in load.errors]
    if errors:
        print(f"console errors: {errors}")
        return 1
    if args.write:
        import torch

        section = "\n".join([
            _BEGIN,
            "## Viewer",
            "",
            f"`python benchmarks/viz.py --layers {args.layers} --seq {args.seq} --repeats {args.repeats} --write` on "
            f"{platform.machine()} ({torch.get_num_threads()} threads, torch {torch.__version__}), headless "
            f"{loads[0].browser}; {cpu_description()}; load average {', '.join(f'{x:.1f}' for x in os.getloadavg())} "
            f"when it finished ({os.cpu_count()} cores; timings move with the load).",
            "",
            "| model | nodes (captured -> optimized) | HTML file | first render, median of "
            f"{len(loads)} fresh loads (min-max) | items drawn on open | expand all, median |",
            "| --- | --- | ---: | ---: | ---: | ---: |",
            f"| GPT-2, {args.layers} layers (GPT2Config defaults), seq {args.seq}, before/after | "
            f"{result.report.nodes_before} -> {result.report.nodes_after} | {size / 1e6:.2f} MB (target < 5 MB) | "
            f"{statistics.median(renders):.0f} ms ({min(renders):.0f}-{max(renders):.0f}) (target < 2000 ms) | "
            f"{loads[0].items} | {statistics.median(expands):.0f} ms |",
            "",
            "First render: navigation start to two animation frames after the first layout and draw "
            "(`performance.now()` in the page), i.e. HTML parse, JSON parse, layout and SVG drawn; the page "
            "opens collapsed to the transformer's layers.",
            _END,
            "",
        ])
        print("wrote", write_section("viewer", section))
    return 0


if __name__ == "__main__":
    sys.exit(main())
