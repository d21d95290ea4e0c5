"""Tensor parallel for real: `graphopt run --nproc 2` starts 2 gloo processes and checks against one process.

Each test starts the processes itself: it calls the CLI (in this process, so
torch and transformers are imported once), which forks 2 ranks that
rendezvous on a free localhost port; the run is bounded by ``--timeout``.
"""

from __future__ import annotations

import json

import pytest

from graphopt import cli

LLAMA = ("hf:llama?num_hidden_layers=2&hidden_size=64&num_attention_heads=4&num_key_value_heads=2"
         "&intermediate_size=128&vocab_size=256&seq=8")
GPT2 = "hf:gpt2?n_layer=2&n_embd=64&n_head=4&vocab_size=256&n_positions=64&seq=8"
NANOGPT = "examples:nanogpt?n_layer=2&n_embd=64&seq=8"
TIMEOUT_S = 120


def graphopt_run(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main(["run", "--nproc", "2", "--iters", "2", "--timeout", str(TIMEOUT_S), *argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, spec: str, *extra: str) -> dict:
    code, out, err = graphopt_run(capsys, "--json", *extra, spec)
    assert code == 0, err[-3000:] + out[-2000:]
    return json.loads(out)


def check_sharded_run(result: dict, regions: int) -> None:
    assert result["backend"] == "gloo" and result["nproc"] == 2
    assert result["ok"] and result["max_abs"] <= 1e-5, result["max_abs"]
    assert len(result["regions"]) == regions
    full = result["sharded_weights_full_bytes"]
    ranks = result["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        # each rank holds half of every sharded weight (measured from the module's tensors) ...
        assert r["sharded_weight_bytes"] == full // 2
        # ... and the full weights are gone: the rank holds the replicated part plus its half
        assert r["weight_bytes"] == pytest.approx(result["single_weight_bytes"] - full // 2, rel=0.01)
        assert r["latency_s"] > 0


@pytest.mark.parametrize("spec", [GPT2, LLAMA, NANOGPT], ids=["gpt2", "llama", "nanogpt"])
def test_numerics_of_two_gloo_processes_match_one(capsys, spec):
    check_sharded_run(run_json(capsys, spec), regions=4)


def test_merged_matmuls_then_sharded(capsys):
    result = run_json(capsys, LLAMA, "--passes", "merge_matmuls", "--option", "merge_matmuls_policy=always")
    check_sharded_run(result, regions=4)
    assert "q_proj+k_proj+v_proj" in " ".join(result["regions"])


def test_head_count_not_divisible_by_processes(capsys):
    code, _, err = graphopt_run(capsys, "examples:nanogpt?n_layer=1&n_embd=48&n_head=3&seq=8")
    assert code == 2
    message = " ".join(err.split())
    assert "3 attention heads" in message and "cannot be divided among 2 processes" in message
