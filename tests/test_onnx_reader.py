"""graphopt.onnx.reader: an .onnx file as nodes, shapes, initializer sizes, FLOPs and a networkx view."""

from __future__ import annotations

import onnx
import pytest
import torch

import graphopt
import graphopt.examples_models
from graphopt.onnx.reader import load_onnx
from tests.support.onnx_support import use_sdpa_attention


@pytest.fixture(scope="module")
def cnn_onnx(tmp_path_factory):
    model, args = graphopt.examples_models.cnn(batch=2, width=8)
    path = tmp_path_factory.mktemp("cnn") / "cnn.onnx"
    graphopt.export_onnx(model, path, args, target="standard")
    return model, path


def test_reads_nodes_shapes_and_initializers(cnn_onnx):
    model, path = cnn_onnx
    g = load_onnx(path)
    proto = onnx.load(str(path))
    assert len(g.nodes) == len(proto.graph.node)
    assert [t.shape for t in g.inputs] == [(2, 3, 32, 32)]
    assert [t.shape for t in g.outputs] == [(2, 10)]
    assert g.op_counts()["Conv"] == 2
    assert g.weight_bytes() == sum(onnx.numpy_helper.to_array(t).nbytes for t in proto.graph.initializer)
    assert g.weight_bytes() >= 4 * model.fc1.weight.numel()
    # shape inference filled in intermediate tensors
    conv = next(n for n in g.nodes if n.op_type == "Conv")
    assert g.tensors[conv.outputs[0]].shape == (2, 8, 32, 32)


def test_flops_of_conv_and_gemm_match_hand_counts(cnn_onnx):
    _model, path = cnn_onnx
    g = load_onnx(path)
    convs = [n.flops for n in g.nodes if n.op_type == "Conv"]
    # conv1: 2 * (2*8*32*32 outputs) * (3*3*3); conv2: 2 * (2*16*16*16) * (8*3*3)
    assert convs == [2 * 2 * 8 * 32 * 32 * 27, 2 * 2 * 16 * 16 * 16 * 72]
    dense = sorted(n.flops for n in g.nodes if n.op_type in ("Gemm", "MatMul"))
    # fc2 (64 -> 10) and fc1 (16*8*8 -> 64), batch 2; Gemm counts its bias add
    assert dense[0] in (2 * 2 * 64 * 10, 2 * 2 * 64 * 10 + 2 * 10)
    assert dense[1] in (2 * 2 * 1024 * 64, 2 * 2 * 1024 * 64 + 2 * 64)
    assert g.total_flops() == sum(n.flops or 0 for n in g.nodes)


def test_networkx_view_follows_the_data(cnn_onnx):
    _model, path = cnn_onnx
    g = load_onnx(path)
    view = g.to_networkx()
    (inp,) = [v for v, d in view.nodes(data=True) if d["op"] == "input"]
    (out,) = [v for v, d in view.nodes(data=True) if d["op"] == "output"]
    import networkx as nx

    assert nx.is_directed_acyclic_graph(view) and nx.has_path(view, inp, out)
    first_conv = next(n.name for n in g.nodes if n.op_type == "Conv")
    assert view.has_edge(inp, first_conv)


def test_attention_flops_with_symbolic_axes_given_sizes(tmp_path):
    model, args = graphopt.examples_models.nanogpt(n_layer=1, n_embd=32, n_head=2, seq=8, batch=2)
    use_sdpa_attention(model)
    path = tmp_path / "m.onnx"
    graphopt.export_onnx(model, path, args, dynamic="batch,seq", target="standard")
    symbolic = load_onnx(path)
    (attn,) = [n for n in symbolic.nodes if n.op_type == "Attention"]
    assert attn.flops is None  # batch and seq unknown
    sized = load_onnx(path, dims={"batch": 2, "seq": 8})
    (attn,) = [n for n in sized.nodes if n.op_type == "Attention"]
    # QK^T and PV: 2 * (2 * B * H * S * S * D)
    assert attn.flops == 2 * (2 * 2 * 2 * 8 * 8 * 16)
    assert sized.inputs[0].shape == (2, 8)


def test_group_query_attention_flops(tmp_path):
    model, args = graphopt.examples_models.nanogpt(n_layer=1, n_embd=32, n_head=2, seq=8, batch=2)
    use_sdpa_attention(model)
    path = tmp_path / "m.onnx"
    graphopt.export_onnx(model, path, args)  # onnxruntime target: GroupQueryAttention
    g = load_onnx(path)
    (gqa,) = [n for n in g.nodes if n.op == "com.microsoft.GroupQueryAttention"]
    assert gqa.flops == 2 * (2 * 2 * 2 * 8 * 8 * 16)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such ONNX file"):
        load_onnx(tmp_path / "nope.onnx")


def test_cli_analyze_reads_an_onnx_file(cnn_onnx, capsys):
    """`graphopt analyze model.onnx`: the heaviest nodes by FLOPs, op counts, weights; --json the reader's dict."""
    import json

    from graphopt.cli import main

    _model, path = cnn_onnx
    assert main(["analyze", str(path), "--top", "2"]) == 0
    text = capsys.readouterr().out
    assert "Conv" in text and "1.18 M" in text and "nodes: " in text and "MFLOP" in text  # conv2: 1,179,648
    assert main(["analyze", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    g = load_onnx(path)
    assert data["total_flops"] == g.total_flops() and data["op_counts"]["Conv"] == 2
    assert [t["op"] for t in data["top"]][:2] == ["Conv", "Conv"]


def test_cli_analyze_onnx_errors_say_what_to_do(cnn_onnx, tmp_path, capsys):
    from graphopt.cli import main

    _model, path = cnn_onnx
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    assert main(["analyze", str(empty)]) == 2
    assert "holds no graph nodes" in capsys.readouterr().err
    assert main(["analyze", str(tmp_path / "missing.onnx")]) == 2
    assert main(["analyze", str(path), "--profile"]) == 2
    assert "need a PyTorch model" in capsys.readouterr().err
    assert main(["analyze", str(path), "--dim", "seq"]) == 2
    assert "NAME=SIZE" in capsys.readouterr().err
