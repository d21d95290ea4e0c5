"""Draw a small GPT-2's optimization as an interactive page, plus DOT and Model Explorer data.

    python examples/visualize_model.py [OUT_DIR]     # default out/viz_example

Open OUT_DIR/gpt2.html in a browser: the optimized graph, grouped by module and
coloured by each node's share of predicted time; switch to "captured (before)"
to see what the passes removed; click a node for its shapes, costs, source line
and the rewrite that touched it.
"""

from __future__ import annotations

import os
import sys

import graphopt
from graphopt.specs import load_spec
from graphopt.viz import PassHistory


def main() -> None:
    out = sys.argv[1] if len(sys.argv) > 1 else "out/viz_example"
    spec = load_spec("hf:gpt2?n_layer=2&n_embd=128&n_head=4&seq=64")
    # PassHistory records which pass removed or added each node, for the before/after view
    result = graphopt.optimize(spec.model, spec.args, spec.kwargs, instruments=[PassHistory()])
    page = graphopt.visualize(result, os.path.join(out, "gpt2.html"), title="GPT-2 (2 layers)")
    dot = graphopt.visualize(result, os.path.join(out, "gpt2.dot"), format="dot", metric="bytes")
    overlay = graphopt.visualize(result, os.path.join(out, "gpt2_costs.json"), format="model-explorer")
    for path in (page, dot, overlay):
        print(f"wrote {path} ({os.path.getsize(path) / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
