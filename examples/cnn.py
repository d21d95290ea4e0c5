"""Optimize the classic CIFAR-10 CNN (Conv-BN-ReLU-Pool x 2, Linear-ReLU-Linear).

    python examples/cnn.py               # print the report
    python examples/cnn.py --out out/cnn # also save model.pt2 + report.json

Each BatchNorm follows a convolution; in inference it is an affine map per
channel, so ``fold_conv_bn`` folds it into the convolution's weights and bias.
"""

from __future__ import annotations

import argparse

import torch

import graphopt
from graphopt.examples_models import cnn


def count_ops(gm: torch.fx.GraphModule, word: str) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and word in str(n.target))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", help="directory to save model.pt2 and report.json")
    args = parser.parse_args(argv)

    model, example_inputs = cnn(batch=args.batch)     # eval mode, BatchNorm with trained-like statistics
    result = graphopt.optimize(model, example_inputs)
    print(result.report)

    before, after = result.captured.module, result.module
    print(f"batch norms: {count_ops(before, 'batch_norm')} -> {count_ops(after, 'batch_norm')}; "
          f"convolutions: {count_ops(before, 'conv2d')} -> {count_ops(after, 'conv2d')}")
    images = torch.randn(args.batch, 3, 32, 32)
    with torch.no_grad():
        expected, got = model(images), result.module(images)
    agree = float((expected.argmax(-1) == got.argmax(-1)).float().mean())
    print(f"fresh batch: max |difference| {float((expected - got).abs().max()):.1e}, top-1 agreement {agree:.0%}")
    if args.out:
        paths = result.save(args.out)
        print("wrote", ", ".join(paths.values()))


if __name__ == "__main__":
    main()
