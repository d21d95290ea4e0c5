"""The attention benchmark and example scripts run end to end (tiny sizes; no timing is asserted)."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

pytest.importorskip("transformers")


def _benchmark():
    """benchmarks/attention.py, loaded as a module."""
    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "attention.py"
    spec = importlib.util.spec_from_file_location("attention_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_benchmark_runs_on_tiny_models(capsys):
    bench = _benchmark()
    assert bench.main(["--models", "gpt2,llama", "--seq", "32", "--layers", "1", "--no-compile",
                       "--runs", "10", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("1 attention sites fused") == 2
    assert "graphopt / sdpa: latency" in out


def test_benchmark_runs_on_biased_encoders(capsys):
    """T5's encoder, MPNet and DeBERTa-v2, each with a padding mask: every site fused (no sdpa variant for two)."""
    bench = _benchmark()
    assert bench.main(["--models", "t5,mpnet,deberta", "--seq", "32", "--layers", "1", "--no-compile",
                       "--runs", "10", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("1 attention sites fused") == 3 and "declined" not in out


def test_example_walk_through_runs(monkeypatch, capsys):
    import runpy

    path = pathlib.Path(__file__).parents[1] / "examples" / "attention_fusion.py"
    monkeypatch.setattr("sys.argv", [str(path), "--seq", "32"])
    runpy.run_path(str(path), run_name="__main__")
    out = capsys.readouterr().out
    assert "fuse_attention: applied" in out and "fused 2 attention sites" in out
    assert out.count("is_causal=True") == 2
    assert out.count("they must be materialised") == 2  # output_attentions=True: both sites declined
