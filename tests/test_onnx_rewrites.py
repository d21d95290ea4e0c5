"""graphopt.onnx.gqa: causal Attention -> com.microsoft.GroupQueryAttention for onnxruntime."""

from __future__ import annotations

import onnx
import pytest
import torch

import graphopt
from graphopt import onnx as graphopt_onnx
from graphopt.examples_models import nanogpt
from tests.support.onnx_support import GQACausalAttention, MaskedAttention, rel_l2, run_onnx, use_sdpa_attention


def _ops(path) -> list[str]:
    return [(f"{n.domain}." if n.domain else "") + n.op_type for n in onnx.load(str(path)).graph.node]


@pytest.fixture(scope="module")
def sdpa_result():
    model, args = nanogpt(n_layer=2, n_embd=64, seq=16, batch=2)
    use_sdpa_attention(model)
    dyn = graphopt_onnx.dynamic_shapes_for(model, args, {}, "batch,seq")
    return model, args, graphopt.optimize(model, args, dynamic_shapes=dyn)


def test_causal_sdpa_becomes_group_query_attention(sdpa_result, tmp_path):
    model, _args, result = sdpa_result
    path = tmp_path / "m.onnx"
    info = graphopt.export_onnx(result, path, dynamic="batch,seq")
    ops = _ops(path)
    assert ops.count("com.microsoft.GroupQueryAttention") == 2
    assert "Attention" not in ops and "Softmax" not in ops
    assert info.rewrites["causal_attention_to_gqa"] == 2
    assert info.opset == 23  # picked because the graph holds scaled_dot_product_attention
    # the layout changes around each site cancel against the model's own
    assert ops.count("Transpose") <= 1
    assert info.numerics.ok and info.numerics.rel_l2 <= 1e-4
    # another batch size and sequence length than exported: seqlens_k is computed in the graph
    ids = torch.randint(0, 512, (3, 11))
    (got,) = run_onnx(str(path), [ids])
    with torch.no_grad():
        assert rel_l2(model(ids).numpy(), got) <= 1e-4


def test_standard_target_keeps_the_onnx_attention_op(sdpa_result, tmp_path):
    _model, _args, result = sdpa_result
    path = tmp_path / "m.onnx"
    info = graphopt.export_onnx(result, path, dynamic="batch,seq", target="standard")
    ops = _ops(path)
    assert ops.count("Attention") == 2
    assert not any(op.startswith("com.microsoft") for op in ops)
    assert info.rewrites == {} and info.numerics.ok


def test_below_opset_23_attention_is_decomposed_and_not_rewritten(sdpa_result, tmp_path):
    _model, _args, result = sdpa_result
    path = tmp_path / "m.onnx"
    info = graphopt.export_onnx(result, path, dynamic="batch,seq", opset=20)
    ops = _ops(path)
    assert "Softmax" in ops and "Attention" not in ops
    assert info.rewrites["causal_attention_to_gqa"] == 0 and info.numerics.ok


def test_grouped_query_heads_map_to_kv_num_heads(tmp_path):
    torch.manual_seed(0)
    model = GQACausalAttention().eval()
    x = torch.randn(2, 12, 64)
    path = tmp_path / "gqa.onnx"
    info = graphopt.export_onnx(model, path, (x,))
    (node,) = [n for n in onnx.load(str(path)).graph.node if n.op_type == "GroupQueryAttention"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["num_heads"] == 4 and attrs["kv_num_heads"] == 2
    assert info.numerics.ok and info.numerics.rel_l2 <= 1e-4


def test_masked_attention_is_declined_with_its_reason(tmp_path):
    torch.manual_seed(0)
    model = MaskedAttention().eval()
    x, mask = torch.randn(2, 8, 32), torch.randn(2, 1, 8, 8)
    path = tmp_path / "masked.onnx"
    info = graphopt.export_onnx(model, path, (x, mask))
    assert "Attention" in _ops(path)
    assert info.rewrites["causal_attention_to_gqa"] == 0
    assert info.declined and all("explicit mask" in d.reason for d in info.declined)
    assert info.numerics.ok


def test_head_size_not_a_multiple_of_8_is_declined(tmp_path):
    model, args = nanogpt(n_layer=1, n_embd=40, n_head=4, seq=8, batch=2)  # head size 10
    use_sdpa_attention(model)
    info = graphopt.export_onnx(model, tmp_path / "m.onnx", args)
    assert info.rewrites["causal_attention_to_gqa"] == 0
    assert [d.reason for d in info.declined] == [
        "head size 10 is not a multiple of 8 (onnxruntime's GroupQueryAttention requires it)"]
    assert info.numerics.ok and "Attention" in _ops(tmp_path / "m.onnx")
