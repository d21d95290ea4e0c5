"""Decode through torch.compile (``compile_decode=True``): checked like the graphs, and dropped with a note where it
fails to compile, fails to run, or misses the check."""

from __future__ import annotations

import pytest
import torch

import graphopt
from graphopt.generate.compiled import CompiledDecode
from tests.support.generation_models import padded_prompts
from tests.support.generation_models import tiny_llama as llama

transformers = pytest.importorskip("transformers")

def test_compiled_decode_generates_transformers_tokens():
    model = llama()
    graphs = graphopt.prepare_generation(model, compile_decode=True)
    assert graphs.compile_decode and graphs.notes == [] and graphs.compiled_note is None
    assert isinstance(graphs.decode_step(torch.device("cpu")), CompiledDecode)
    assert graphs.check.ok(None)  # the check ran through the compiled step
    ids, mask = padded_prompts()
    for rows in (slice(0, 1), slice(0, 3)):
        expected = model.generate(ids[rows], attention_mask=mask[rows], max_new_tokens=12, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)
        got = graphs.generate(ids[rows], attention_mask=mask[rows], max_new_tokens=12, eos_token_id=None,
                              pad_token_id=0)
        assert torch.equal(got, expected)
    assert graphs.compiled_note is None  # it ran compiled, no fallback


def test_a_failed_compile_leaves_decode_uncompiled_with_a_note(monkeypatch):
    def no_compiler(fn, **kwargs):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

    monkeypatch.setattr(torch, "compile", no_compiler)
    model = llama()
    graphs = graphopt.prepare_generation(model, compile_decode=True)
    assert not graphs.compile_decode
    assert graphs.notes == ["decode not compiled: torch.compile failed (RuntimeError: InvalidCxxCompiler: "
                            "No working C++ compiler found)"]
    ids, mask = padded_prompts()
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
    assert torch.equal(graphs.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=None,
                                       pad_token_id=0), expected)


def test_a_compiled_step_that_misses_the_check_is_dropped(monkeypatch):
    def wrong(fn, **kwargs):
        return lambda *args: fn(*args) * 1.01  # logits off by 1%: far over the exact tolerance

    monkeypatch.setattr(torch, "compile", wrong)
    graphs = graphopt.prepare_generation(llama(), compile_decode=True)
    assert not graphs.compile_decode
    assert len(graphs.notes) == 1 and graphs.notes[0].startswith("decode not compiled: the compiled step misses "
                                                                 "the check (teacher-forced")
    assert graphs.check.ok(None)  # the check on record is the uncompiled pair's


def test_a_compiled_step_that_fails_at_run_time_falls_back_for_good():
    calls = []

    def decode(*args):
        calls.append("graph")
        return torch.ones(1)

    def failing(*args):
        calls.append("compiled")
        raise RuntimeError("CppCompileError: C++ compile error\nlong log")

    runner = CompiledDecode(decode, compiler=lambda fn, **kw: failing)
    args = (torch.zeros(1, 1), torch.ones(1, 4), torch.zeros(1, 1), torch.tensor(0), [])
    assert torch.equal(runner(*args), torch.ones(1)) and torch.equal(runner(*args), torch.ones(1))
    assert calls == ["compiled", "graph", "graph"]
    assert runner.fallback_reason == "the compiled decode step failed (RuntimeError: CppCompileError: C++ compile error)"
