"""Optimize a model and export it to ONNX, checked in onnxruntime, with dynamic batch and sequence axes.

    .venv/bin/python examples/convert_to_onnx.py [OUT_DIR]

The command-line equivalent (also writes model.pt2, report.json, report.md):

    graphopt convert 'examples:nanogpt?n_layer=2&seq=64' -o out/nanogpt-onnx --dynamic batch,seq
"""

from __future__ import annotations

import os
import sys

import numpy as np
import onnxruntime as ort
import torch

import graphopt
from graphopt.examples_models import nanogpt
from graphopt.onnx import dynamic_shapes_for, load_onnx, widen_for_dynamic


def main(out_dir: str = "out/convert-example") -> None:
    model, args = nanogpt(n_layer=2, seq=64)

    # 1. capture with dynamic batch / seq axes (a batch-1 example is widened to 2: torch.export
    #    would otherwise fix that axis to 1), then optimize as usual
    args, kwargs = widen_for_dynamic(args, {}, "batch,seq")
    dynamic_shapes = dynamic_shapes_for(model, args, kwargs, "batch,seq")
    result = graphopt.optimize(model, args, kwargs, dynamic_shapes=dynamic_shapes)

    # 2. export: onnx.checker, shape inference, onnxruntime vs torch on the example, fresh inputs and
    #    another batch size / sequence length; a mismatch raises graphopt.OnnxMismatchError
    path = os.path.join(out_dir, "model.onnx")
    info = graphopt.export_onnx(result, path, dynamic="batch,seq", compare_speed=True)
    print(info.summary())
    print("ONNX inputs:", info.inputs)
    graphopt.record_onnx_export(result.report, info)  # export_onnx writes no report: the caller records it

    # 3. use it: any batch size and sequence length
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    ids = torch.randint(0, 512, (3, 40))
    (logits,) = session.run(None, {session.get_inputs()[0].name: ids.numpy()})
    with torch.no_grad():
        expected = model(ids).numpy()
    print(f"batch 3 x seq 40: relative L2 vs torch {np.linalg.norm(logits - expected) / np.linalg.norm(expected):.1e}")

    # 4. read it back, as `graphopt analyze model.onnx` does
    graph = load_onnx(path, dims={"batch": 1, "seq": 64})
    print(f"{len(graph.nodes)} nodes, {graph.weight_bytes() / 2**20:.1f} MiB of weights, "
          f"{graph.total_flops() / 1e9:.3f} GFLOP at batch 1 x seq 64; top ops {graph.op_counts().most_common(4)}")
    print("the report carries the export:", sorted(result.report.extra["onnx"]))


if __name__ == "__main__":
    main(*sys.argv[1:2])
