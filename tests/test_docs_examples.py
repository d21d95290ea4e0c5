"""The docs' code and the example scripts run as written."""

from __future__ import annotations

import os
import re
import runpy

import pytest
import torch

import graphopt
from tests.conftest import REPO_ROOT


def python_blocks(doc: str) -> list[str]:
    text = open(os.path.join(REPO_ROOT, "docs", doc)).read()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_writing_a_pass_page_runs_and_its_tests_pass(capsys):
    blocks = python_blocks("writing-a-pass.md")
    assert len(blocks) == 4
    namespace: dict = {"__name__": "writing_a_pass"}
    for block in blocks:
        exec(compile(block, "docs/writing-a-pass.md", "exec"), namespace)
    assert "swish_to_silu" in capsys.readouterr().out  # the report was printed
    tests = [fn for name, fn in namespace.items() if name.startswith("test_") and callable(fn)]
    assert [t.__name__ for t in tests] == ["test_golden_ops_and_idempotence", "test_numerics",
                                           "test_declines_a_shared_sigmoid", "test_on_random_models"]
    for test in tests:
        test()


def test_getting_started_python_api_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    blocks = [b for b in python_blocks("getting-started.md") if "graphopt.optimize" in b or "torch.export.load" in b]
    assert blocks
    namespace: dict = {"__name__": "getting_started"}
    for block in blocks:
        exec(compile(block, "docs/getting-started.md", "exec"), namespace)
    assert os.path.exists(tmp_path / "out" / "model.pt2")
    assert "graphopt report" in capsys.readouterr().out


@pytest.mark.parametrize("script,argv", [("cnn.py", ["--batch", "2"]),
                                         ("transformer_lm.py", ["--family", "llama", "--seq", "16"])])
def test_example_scripts_run(script, argv, tmp_path, monkeypatch, capsys):
    path = os.path.join(REPO_ROOT, "examples", script)
    monkeypatch.setattr("sys.argv", [path, *argv, "--out", str(tmp_path)])
    runpy.run_path(path, run_name="__main__")
    out = capsys.readouterr().out
    assert "graphopt report" in out and "final check vs the original model: ok" in out
    assert sorted(os.listdir(tmp_path)) == ["graphopt.json", "model.pt2", "report.json"]
    if script == "cnn.py":
        assert "batch norms: 2 -> 0" in out and "top-1 agreement 100%" in out
    else:
        assert "CausalLMOutputWithPast" in out


def test_generation_page_runs():
    blocks = python_blocks("generation.md")
    assert len(blocks) == 3
    namespace: dict = {"__name__": "generation_page"}
    exec(compile(blocks[0], "docs/generation.md", "exec"), namespace)
    assert namespace["tokens"].shape == (2, 36)
    fp32_tokens = namespace["tokens"]
    exec(compile(blocks[1], "docs/generation.md", "exec"), namespace)  # decode through torch.compile
    assert namespace["tokens"].shape == (2, 16 + 128)
    graphs = namespace["graphs"]
    # judged by the budget the page asked for (a re-planned pair's graphs were planned at a tighter one)
    assert graphs.compile_decode and graphs.check.ok(graphs.error_budget), graphs.notes
    assert graphs.error_budget == graphopt.ErrorBudget(2e-2, top1=0.95)
    exec(compile(blocks[2], "docs/generation.md", "exec"), namespace)  # decode compiled ahead of time
    graphs = namespace["graphs"]
    assert graphs.compile_decode == "aot" and graphs.notes == [] and graphs.compiled_note is None
    assert torch.equal(namespace["tokens"], fp32_tokens)  # fp32 greedy: the same tokens as the first block


def test_generate_example_matches_transformers(monkeypatch, capsys):
    path = os.path.join(REPO_ROOT, "examples", "generate.py")
    monkeypatch.setattr("sys.argv", [path, "--batch", "2", "--new-tokens", "4"])
    runpy.run_path(path, run_name="__main__")
    out = capsys.readouterr().out
    assert "greedy tokens equal to transformers' generate: True" in out


def test_convert_deploying_section_runs(tmp_path, monkeypatch):
    """docs/convert.md 'Deploying the artifacts': make, save, load, plain torch.export.load, the bundle's generate."""
    monkeypatch.chdir(tmp_path)
    text = open(os.path.join(REPO_ROOT, "docs", "convert.md")).read()
    section = text.split("## Deploying the artifacts", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 3
    namespace: dict = {"__name__": "convert_deploying"}
    for block in blocks:
        exec(compile(block, "docs/convert.md", "exec"), namespace)
    result, tokens = namespace["result"], namespace["tokens"]
    assert torch.equal(tokens, result.generate(namespace["input_ids"], namespace["attention_mask"], max_new_tokens=32))
