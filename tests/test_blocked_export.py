"""Blocked graphs leave graphopt as .pt2 (reloaded) and as ONNX (checked, run in onnxruntime)."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import graphopt
from graphopt.examples_models import nanogpt

from tests.support._blocked_models import LMHeadReductions, rel_l2, t5_encoder

gops = torch.ops.graphopt


def export_and_run(ep: torch.export.ExportedProgram, inputs: list[torch.Tensor], tmp_path) -> list[np.ndarray]:
    program = torch.onnx.export(ep, dynamo=True, custom_translation_table=graphopt.ops.onnx_translations(),
                                verbose=False)
    path = str(tmp_path / "model.onnx")
    program.save(path)
    onnx.checker.check_model(onnx.load(path))
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feeds = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)}
    return session.run(None, feeds)


def assert_match(onnx_out: list[np.ndarray], torch_out, tol: float = 1e-5) -> None:
    leaves = [t for t in torch.utils._pytree.tree_leaves(torch_out) if isinstance(t, torch.Tensor)]
    assert len(onnx_out) == len(leaves)
    for o, t in zip(onnx_out, leaves):
        if t.dtype.is_floating_point:
            assert rel_l2(torch.from_numpy(o), t) <= tol
        else:
            assert np.array_equal(o, t.numpy())


class OpModule(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


OP_CASES = {
    "blocked_matmul": (lambda a, b: gops.blocked_matmul(a, b, 3, 2, 4), lambda: (torch.randn(2, 7, 9),
                                                                                 torch.randn(9, 5))),
    "blocked_linear": (lambda x, w, b: gops.blocked_linear(x, w, b, 2, 3, 4),
                       lambda: (torch.randn(2, 5, 8), torch.randn(6, 8), torch.randn(6))),
    "blocked_attention_bias": (lambda q, k, v, b: gops.blocked_attention(q, k, v, b, None, -math.inf, 0.5, 3, 4),
                               lambda: (torch.randn(1, 2, 7, 4), torch.randn(1, 2, 9, 4), torch.randn(1, 2, 9, 4),
                                        torch.randn(1, 2, 7, 9))),
    "blocked_attention_mask": (lambda q, k, v, m: gops.blocked_attention(q, k, v, None, m, -1e9, 1.0, 3, 4),
                               lambda: (torch.randn(1, 2, 7, 4), torch.randn(1, 2, 9, 4), torch.randn(1, 2, 9, 4),
                                        torch.rand(7, 9) > 0.7)),
    "chunked_ffn_gated": (lambda x, w1, wg, w2: gops.chunked_ffn(x, w1, None, wg, None, w2, None, "silu", 3),
                          lambda: (torch.randn(1, 7, 8), torch.randn(16, 8), torch.randn(16, 8), torch.randn(8, 16))),
    "chunked_ffn_gelu_tanh": (lambda x, w1, b1, w2: gops.chunked_ffn(x, w1, b1, None, None, w2, None, "gelu_tanh", 2),
                              lambda: (torch.randn(7, 8), torch.randn(16, 8), torch.randn(16), torch.randn(8, 16))),
    "chunked_lm_head_gather": (lambda h, w, i: gops.chunked_lm_head_gather(h, w, None, i, "log_softmax", False, 3),
                               lambda: (torch.randn(2, 5, 8), torch.randn(30, 8), torch.randint(0, 30, (2, 5, 1)))),
    "chunked_lm_head_argmax": (lambda h, w: gops.chunked_lm_head_argmax(h, w, None, "none", False, 3),
                               lambda: (torch.randn(2, 5, 8), torch.randn(30, 8))),
    "chunked_lm_head_topk": (lambda h, w: gops.chunked_lm_head_topk(h, w, None, 3, True, "softmax", False, 2),
                             lambda: (torch.randn(2, 5, 8), torch.randn(30, 8))),
}


@pytest.mark.parametrize("case", sorted(OP_CASES))
def test_each_operator_exports_to_onnx(case, tmp_path):
    fn, make = OP_CASES[case]
    torch.manual_seed(0)
    inputs = make()
    module = OpModule(fn)
    ep = torch.export.export(module, inputs)
    assert any(n.op == "call_function" and getattr(n.target, "namespace", "") == "graphopt"
               for n in ep.graph.nodes)
    assert_match(export_and_run(ep, list(inputs), tmp_path), module(*inputs))


def _optimized(model, args, **options):
    result = graphopt.optimize(model, args, **options)
    assert result.report.record("blocked").status == "applied"
    assert result.report.final_numerics.ok
    return result


@pytest.mark.parametrize("name", ["nanogpt", "t5_recompute", "lm_head"])
def test_blocked_graphs_save_reload_and_export(name, tmp_path):
    if name == "nanogpt":
        model, args = nanogpt(n_layer=1, seq=19)
        result = _optimized(model, args, block_q=8, block_kv=5, block_ffn=6)
    elif name == "t5_recompute":
        model, args = t5_encoder(seq=24)
        result = _optimized(model, args, block_q=8, block_kv=0, blocked_leaf_bytes=0, constant_fold_max_bytes=0)
    else:
        torch.manual_seed(0)
        model = LMHeadReductions(reduction="gather").eval()
        args = (torch.randn(1, 7, 16), torch.randint(0, 100, (1, 7)))
        result = _optimized(model, args, block_lm_head=3)
    with torch.no_grad():
        expected = model(*args)
    # .pt2: saved, reloaded after `import graphopt` (the operators' registrations), same outputs
    paths = result.save(tmp_path / "out")
    reloaded = torch.export.load(paths["pt2"])
    assert any(getattr(n.target, "namespace", "") == "graphopt" for n in reloaded.graph.nodes)
    with torch.no_grad():
        again = reloaded.module()(*args)
    for r, e in zip(torch.utils._pytree.tree_leaves(again), torch.utils._pytree.tree_leaves(expected)):
        if isinstance(e, torch.Tensor) and e.dtype.is_floating_point:
            assert rel_l2(r, e) <= 1e-5
    # ONNX: the blocked graph exports and matches in onnxruntime
    flat = [a for a in args if isinstance(a, torch.Tensor)]
    assert_match(export_and_run(result.exported_program(), flat, tmp_path), expected)


def test_graphopt_export_onnx_of_a_blocked_t5(tmp_path):
    """The public exporter (graphopt.export_onnx: onnxruntime check on fresh inputs) takes blocked graphs.

    (Static shapes: a plan is sized for the example's shapes, and per-query-block rewrites are unrolled.)
    """
    model, args = t5_encoder(seq=24)
    result = _optimized(model, args, block_q=8, block_kv=0, blocked_leaf_bytes=0, constant_fold_max_bytes=0)
    graphopt.export_onnx(result, tmp_path / "t5.onnx")
    assert (tmp_path / "t5.onnx").exists()
