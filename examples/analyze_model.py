"""Analyse a small GPT-2 (random weights): hot spots, peak memory, FFN chains, layers.

    python examples/analyze_model.py            # predicted figures
    python examples/analyze_model.py --profile  # + measured per-node times and peak memory
"""

from __future__ import annotations

import sys

import graphopt
from graphopt.specs import load_spec


def main() -> None:
    spec = load_spec("hf:gpt2?n_layer=2&n_embd=128&n_head=4&seq=256")
    analysis = graphopt.analyze(spec.model, spec.args, spec.kwargs, profile="--profile" in sys.argv, top=8)
    analysis.model = spec.name
    print(analysis)
    chain = analysis.ffn_chains[0]
    print(f"first FFN chain: {chain.up.name} -> {[a.name for a in chain.activation]} -> {chain.down.name} "
          f"in {chain.module} (d_model={chain.d_model}, d_hidden={chain.d_hidden})")
    hot = analysis.hot_matmuls[0]
    print(f"hottest matmul: {hot.node.name} in {graphopt.ir.module_path(hot.node)}, {hot.share:.0%} of the time")
    for block in analysis.repeated_blocks:
        print(f"repeated: {block.count} x {block.module_class}: {', '.join(block.instances)}")


if __name__ == "__main__":
    main()
