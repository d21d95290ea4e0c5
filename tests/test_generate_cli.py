"""``graphopt generate``: builds the graphs, times them, checks the tokens against the original."""

from __future__ import annotations

import json

import pytest

from graphopt import cli

pytest.importorskip("transformers")

SPEC = ("hf:llama?num_hidden_layers=2&hidden_size=64&intermediate_size=128&num_attention_heads=4"
        "&num_key_value_heads=2&vocab_size=300")


def test_generate_compare_reports_equal_tokens_and_both_timings(capsys):
    code = cli.main(["generate", SPEC, "--prompt-len", "6", "--new-tokens", "5", "--batch", "2", "--compare",
                     "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert report["tokens_equal"] is True
    for who in ("graphopt", "original"):
        assert report[who]["decode_ms_per_token"] > 0 and report[who]["batch"] == 2
    assert report["check"].startswith("teacher-forced")


def test_generate_compile_runs_decode_compiled_and_still_equals_the_original(capsys):
    code = cli.main(["generate", SPEC, "--prompt-len", "6", "--new-tokens", "5", "--compile", "--compare", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert report["decode_compiled"] is True and report["notes"] == []
    assert report["tokens_equal"] is True


@pytest.mark.parametrize("flag, wanted", [([], False), (["--compile"], True), (["--compile", "aot"], "aot")])
def test_generate_compile_flag_picks_the_compiler(flag, wanted, monkeypatch, capsys):
    import graphopt.generate

    class Built(Exception):
        pass

    seen = []

    def record(model, **kwargs):
        seen.append(kwargs["compile_decode"])
        raise Built

    monkeypatch.setattr(graphopt.generate, "prepare_generation", record)
    with pytest.raises(Built):
        cli.main(["generate", SPEC, "--prompt-len", "6", "--new-tokens", "5", *flag])
    assert seen == [wanted]


@pytest.mark.parametrize("argv, words", [
    (["--new-tokens", "1"], "at least 2"),
    (["--batch", "0"], "--batch must be at least 1"),
])
def test_generate_refuses_bad_sizes_in_one_line(argv, words, capsys):
    code = cli.main(["generate", SPEC, *argv])
    err = capsys.readouterr().err
    assert code == 2 and words in err


def test_generate_refuses_a_model_that_is_not_a_causal_lm(capsys):
    code = cli.main(["generate", "examples:mlp"])
    assert code == 2 and "not a transformers causal LM" in capsys.readouterr().err


def test_generate_compare_with_reduced_precision_checks_at_the_lengths_given(capsys):
    code = cli.main(["generate", SPEC, "--prompt-len", "7", "--new-tokens", "9", "--precision", "int8wo",
                     "--error-budget", "0.5", "--compare", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["within_budget"] is True and code == 0, report
    # teacher-forced at the prompt and token counts asked for, not the build's own check lengths
    assert "(7-token prompt + 9 decode steps)" in report["check"], report["check"]
