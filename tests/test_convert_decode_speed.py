"""``graphopt convert`` of a causal LM prints onnxruntime's decode tokens/s beside torch's (no timing assertions)."""

from __future__ import annotations

import json

import pytest

import graphopt
from graphopt.cli import main
from graphopt.commands import convert
from graphopt.onnx.decode_speed import compare_decode_speed
from graphopt.specs import load_spec

GPT2 = "hf:gpt2?n_layer=2&n_embd=64&n_head=4&vocab_size=128&seq=12"


@pytest.fixture
def no_viewer(monkeypatch):
    monkeypatch.setattr(convert, "write_graph_html", lambda result, path: "graph.html skipped in this test")


def test_convert_prints_decode_tokens_per_s_in_onnxruntime_beside_graphopts_torch_decode(tmp_path, capsys, no_viewer):
    out = tmp_path / "out"
    assert main(["convert", GPT2, "-o", str(out), "--generate", "--speed-runs", "1"]) == 0
    err = capsys.readouterr().err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("decode: onnxruntime ")]
    assert "tokens/s (KV-cache graph) vs torch " in line and "(graphopt's decode graph)" in line
    assert "prompt 12, batch 1, 16 tokens, same greedy tokens" in line  # fp32: the two greedy runs agree
    decode = json.loads((out / "report.json").read_text())["extra"]["onnx"]["decode_speed"]
    assert decode["onnxruntime_tokens_per_s"] > 0 and decode["torch_tokens_per_s"] > 0 and decode["same_tokens"]
    assert "### decode speed" in (out / "report.md").read_text()


def test_without_generation_graphs_torchs_side_is_transformers_generate():
    spec = load_spec(GPT2)
    speed = compare_decode_speed(graphopt.optimize(spec.model, spec.args), new_tokens=4)
    assert speed.torch_side == "transformers' generate" and speed.same_tokens and speed.new_tokens == 4
    assert speed.summary().startswith("decode: onnxruntime ")


def test_no_speed_and_models_that_do_not_generate_print_no_decode_line(tmp_path, capsys, no_viewer):
    assert main(["convert", "examples:mlp", "-o", str(tmp_path / "mlp"), "--speed-runs", "1"]) == 0
    assert main(["convert", GPT2, "-o", str(tmp_path / "gpt2"), "--no-speed"]) == 0
    assert "decode:" not in capsys.readouterr().err
    assert json.loads((tmp_path / "gpt2" / "report.json").read_text())["extra"]["onnx"]["decode_speed"] is None
