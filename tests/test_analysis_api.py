"""graphopt.analyze and `graphopt analyze`: inputs accepted, figures, attention sites, JSON schema, CLI."""

from __future__ import annotations

import json
import time

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.cli import main
from graphopt.target import Roofline
from graphopt.examples_models import nanogpt
from graphopt.passes.analysis import sites as attention_sites

TARGET = Roofline("test", "cpu", {"float32": 1e11}, 1e10, 1e-6)

#: keys docs/analysis.md promises at the top level of the JSON
SCHEMA_KEYS = {
    "schema_version", "model", "target", "total_flops", "other_flops", "total_bytes", "predicted_seconds",
    "measured_seconds", "profiled", "peak_memory_bytes", "measured_peak_memory_bytes", "memory", "hotspots",
    "hot_matmuls", "attention_sites", "ffn_chains", "repeated_blocks", "node_count",
}
HOTSPOT_KEYS = {
    "name", "op", "category", "module", "source", "shapes", "input_shapes", "dtype", "flops", "bytes",
    "intensity", "bound", "predicted_s", "measured_s", "share", "predicted_share", "measured_share",
}


def _mlp():
    return nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 32)).eval(), (torch.randn(4, 32),)


def test_analyze_a_module():
    model, args = _mlp()
    a = graphopt.analyze(model, args, target=TARGET)
    assert a.total_flops == 2 * 4 * (32 * 128 + 128 * 32)
    assert a.other_flops > 0
    assert len(a.ffn_chains) == 1 and not a.ffn_chains[0].gated
    assert a.predicted_seconds == pytest.approx(sum(r.predicted_s for r in a.nodes))
    assert sum(r.share for r in a.nodes) == pytest.approx(1.0)
    assert a.hotspots[0].op == "aten.linear"
    assert a.peak_memory_bytes == 2 * 4 * 128 * 4  # linear's and gelu's outputs
    assert a.measured_seconds is None and a.measured_peak_memory_bytes is None
    # node.meta carries the cost for the viewer and the rewrites
    linear = next(n for n in a.gm.graph.nodes if n.target is torch.ops.aten.linear.default)
    assert linear.meta["cost"].flops == 2 * 4 * 32 * 128


def test_analyze_accepts_graph_module_and_optimize_result():
    model, args = _mlp()
    gm = graphopt.capture(model, args).module
    from_gm = graphopt.analyze(gm, target=TARGET)
    from_module = graphopt.analyze(model, args, target=TARGET)
    result = graphopt.optimize(model, args, verify=False)
    from_result = graphopt.analyze(result, target=TARGET)
    assert from_gm.total_flops == from_module.total_flops == from_result.total_flops
    assert from_result.gm is result.module


def test_analyze_needs_inputs_to_capture():
    model, _ = _mlp()
    with pytest.raises(TypeError, match="example_inputs"):
        graphopt.analyze(model)


def test_profile_fills_measured_figures():
    model, args = nanogpt(n_layer=1, n_embd=32, seq=16)
    a = graphopt.analyze(model, args, target=TARGET, profile=True)
    assert a.profiled and a.measured_seconds > 0
    assert all(r.measured_s is not None for r in a.nodes)
    measured = [r.measured_s for r in a.nodes]
    assert measured == sorted(measured, reverse=True)  # ranked by measured time when profiled
    assert a.measured_peak_memory_bytes and a.measured_peak_memory_bytes > 0
    assert a.memory.measured_method


def test_reports_whatever_find_attention_sites_returns(monkeypatch):
    model, args = nanogpt(n_layer=2, n_embd=32, seq=16)
    gm = graphopt.capture(model, args).module
    softmaxes = [n for n in gm.graph.nodes if n.target is torch.ops.aten.softmax.int]
    fake = [attention_sites.AttentionSite(softmax=s, is_causal=True, num_heads=4, nodes=[s]) for s in softmaxes]
    seen = []

    def fake_find(g):
        seen.append(g)
        return fake

    monkeypatch.setattr(graphopt.analysis, "find_attention_sites", fake_find)
    a = graphopt.analyze(gm, target=TARGET)
    assert seen == [gm]
    assert a.attention_sites == fake
    d = a.to_dict()
    assert d["attention_sites"] == [s.to_dict() for s in fake]
    assert "attention sites: 2" in str(a)


def test_to_dict_follows_the_schema():
    model, args = nanogpt(n_layer=2, n_embd=32, seq=16)
    a = graphopt.analyze(model, args, target=TARGET, top=5)
    d = json.loads(a.to_json())
    assert set(d) == SCHEMA_KEYS
    assert len(d["hotspots"]) == 5
    for h in d["hotspots"]:
        assert set(h) == HOTSPOT_KEYS
        assert isinstance(h["flops"], int) and 0 <= h["share"] <= 1
    assert isinstance(d["attention_sites"], list) and isinstance(d["ffn_chains"], list)
    assert len(d["ffn_chains"]) == 2 and len(d["repeated_blocks"]) == 1
    assert d["total_flops"] == a.total_flops and d["peak_memory_bytes"] == a.peak_memory_bytes
    assert set(d["memory"]) >= {"peak_bytes", "peak_node", "live_at_peak", "parameter_bytes", "input_bytes"}


def test_cli_analyze_json(capsys, tmp_path):
    target = tmp_path / "target.json"
    target.write_text(json.dumps(TARGET.to_dict()))
    code = main(["analyze", "examples:nanogpt?n_layer=2&n_embd=32&seq=16", "--json", "--top", "3",
                 "--target", str(target)])
    assert code == 0
    d = json.loads(capsys.readouterr().out)
    assert set(d) == SCHEMA_KEYS
    assert len(d["hotspots"]) == 3 and all({"flops", "share"} <= set(h) for h in d["hotspots"])
    assert d["target"]["name"] == "test"
    assert len(d["ffn_chains"]) == 2


def test_cli_analyze_table_with_profile(capsys, tmp_path):
    target = tmp_path / "target.json"
    target.write_text(json.dumps(TARGET.to_dict()))
    code = main(["analyze", "examples:cnn?batch=2", "--profile", "--top", "4", "--target", str(target)])
    assert code == 0
    out = capsys.readouterr().out
    assert "top 4 by measured time" in out
    assert "conv2d" in out and "peak activation memory" in out and "FFN chains: 0" in out


def test_cli_analyze_bad_input(capsys):
    assert main(["analyze", "examples:nope"]) == 2
    assert main(["analyze", "examples:mlp", "--top", "0"]) == 2


@pytest.mark.slow
def test_cli_llama_spec_from_the_issue_prints_its_table(capsys):
    """The issue's Llama spec; the time is printed (measured), not asserted."""
    spec = ("hf:llama?num_hidden_layers=2&hidden_size=512&intermediate_size=1376&num_attention_heads=8"
            "&num_key_value_heads=2&seq=512")
    start = time.perf_counter()
    code = main(["analyze", spec])
    elapsed = time.perf_counter() - start
    out = capsys.readouterr().out
    assert code == 0
    assert "lm_head" in out and "FFN chains: 2 (2 gated)" in out and "2 x LlamaDecoderLayer" in out
    with capsys.disabled():
        print(f"\n`graphopt analyze` on the issue's Llama spec: {elapsed:.1f} s")
