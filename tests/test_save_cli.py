"""Saving (.pt2 + report.json), packaging (`graphopt.passes`, no top-level `passes`) and the CLI.

CLI runs call :func:`graphopt.cli.main` in-process where they can (no
interpreter start-up); the console script, ``--debug`` tracebacks and the
packaging checks need a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.conftest import REPO_ROOT
import graphopt
from graphopt.cli import main
from graphopt.saved import flatten_outputs
from graphopt.commands.common import UsageError
from tests.support.helpers import assert_outputs_close, call

GRAPHOPT_SCRIPT = os.path.join(os.path.dirname(sys.executable), "graphopt")


def _run(argv: list[str], cwd: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("name", ["cnn", "gpt2"])
def test_saved_program_reloads_to_the_same_outputs(optimized, name, tmp_path):
    oc = optimized(name)
    paths = oc.result.save(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["graphopt.json", "model.pt2", "report.json"]
    plain = torch.export.load(paths["pt2"])  # flat tensors: loads with no output class registered
    loaded = graphopt.load(tmp_path)
    for seed in (21, 22):
        args, kwargs = oc.case.fresh_inputs(seed)
        expected = call(oc.result.module, args, kwargs)
        got = call(loaded, args, kwargs)
        assert type(got) is type(expected)  # a transformers ModelOutput for gpt2, rebuilt by graphopt.load
        assert_outputs_close(expected, got, tol=1e-6)
        assert_outputs_close(tuple(flatten_outputs(expected)), tuple(call(plain.module(), args, kwargs)), tol=1e-6)
    report = json.loads(open(paths["report"]).read())
    assert [p["name"] for p in report["passes"]] == [r.name for r in oc.result.report.passes]
    assert report["final_numerics"]["ok"] is True


# --------------------------------------------------------------------------- packaging


def test_installed_package_passes_module_and_console_script(tmp_path):
    """One interpreter, outside the repo root: `import passes` fails, `import graphopt.passes`
    works, and the `graphopt` console script is installed, points at graphopt.cli:main and,
    with --debug, lets the traceback through."""
    code = textwrap.dedent("""
        import importlib.util, traceback
        from importlib.metadata import entry_points
        import graphopt.passes
        assert importlib.util.find_spec("passes") is None, "a top-level 'passes' module is installed"
        try:
            import passes
        except ModuleNotFoundError as exc:
            print("import passes:", exc)
        print(graphopt.passes.__name__, len(graphopt.passes.available()))
        (script,) = [ep for ep in entry_points(group="console_scripts") if ep.name == "graphopt"]
        print("console script:", script.value)
        try:
            script.load()(["--debug", "optimize", "missing.pt2", "-o", "out"])
        except Exception:
            traceback.print_exc()
    """)
    proc = _run([sys.executable, "-c", code], cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "import passes: No module named 'passes'"
    assert lines[1].startswith("graphopt.passes ")
    assert lines[2] == "console script: graphopt.cli:main"
    assert "Traceback (most recent call last)" in proc.stderr and "no such file: missing.pt2" in proc.stderr
    assert os.path.exists(GRAPHOPT_SCRIPT)


# --------------------------------------------------------------------------- CLI


def test_cli_optimize_hf_spec_saves_and_prints_the_report(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["optimize", "hf:gpt2?n_layer=2&n_embd=128&seq=64", "-o", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert sorted(os.listdir(out)) == ["graphopt.json", "model.pt2", "report.json"]
    for expected in ("graphopt report", "remove_noops", "applied", "final check vs the original model: ok"):
        assert expected in captured.out
    assert "wrote" in captured.err
    report = json.loads((out / "report.json").read_text())
    assert report["model"].startswith("GPT2LMHeadModel") and report["final_numerics"]["ok"]


def test_cli_reoptimizes_a_saved_pt2_and_json_output(tmp_path, capsys):
    first = tmp_path / "a"
    assert main(["optimize", "examples:cnn?batch=2&width=4", "-o", str(first)]) == 0
    capsys.readouterr()
    rc = main(["optimize", str(first / "model.pt2"), "-o", str(tmp_path / "b"), "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report = json.loads(captured.out)
    assert report["final_numerics"]["ok"] and report["model"] == "model.pt2"


def test_cli_passes_lists_every_pass(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    for name in ("dead_code", "cse", "constant_folding", "remove_noops", "fold_conv_bn"):
        assert name in out


UNCAPTURABLE = '''
import torch


class Branchy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x):
        y = self.proj(x)
        if y.sum() > 0:
            return y * 2
        return y


def make():
    return Branchy(), (torch.randn(2, 4),)
'''


def _bad_inputs(tmp_path) -> dict[str, tuple[list[str], str]]:
    factory = tmp_path / "branchy.py"
    factory.write_text(UNCAPTURABLE)
    full = tmp_path / "full"
    full.mkdir()
    (full / "something").write_text("x")
    out = str(tmp_path / "out")
    return {
        "missing .pt2": (["optimize", str(tmp_path / "missing.pt2"), "-o", out], "no such file"),
        "malformed spec": (["optimize", "hf:gpt2?n_layer", "-o", out], "key=value"),
        "unreadable spec": (["optimize", "not a spec", "-o", out], "cannot read model spec"),
        "unknown model type": (["optimize", "hf:notamodel?n_layer=1", "-o", out], "unknown transformers model type"),
        "uncapturable model": (["optimize", f"{factory}:make", "-o", out], "branches on a tensor's value"),
        "non-empty output dir": (["optimize", "examples:mlp", "-o", str(full)], "--force"),
        "unknown pass": (["optimize", "examples:mlp", "-o", out, "--passes", "nope"], "unknown pass 'nope'"),
        "unknown option": (["optimize", "examples:mlp", "-o", out, "--option", "nope=1"], "unknown option"),
    }


@pytest.mark.parametrize("case", ["missing .pt2", "malformed spec", "unreadable spec", "unknown model type",
                                  "uncapturable model", "non-empty output dir", "unknown pass", "unknown option"])
def test_cli_bad_input_is_a_one_line_error_with_exit_code_2(case, tmp_path, capfd):
    argv, expected = _bad_inputs(tmp_path)[case]
    rc = main(argv)
    captured = capfd.readouterr()
    assert rc == 2
    errors = [ln for ln in captured.err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, captured.err
    assert expected in errors[0]
    assert "Traceback" not in captured.err + captured.out
    assert "def forward" not in captured.err  # no partial graphs from inside torch
    assert not os.path.exists(tmp_path / "out") or not os.listdir(tmp_path / "out")


def test_cli_debug_raises_in_process(tmp_path):
    with pytest.raises(UsageError):
        main(["--debug", "optimize", str(tmp_path / "missing.pt2"), "-o", str(tmp_path / "o")])


def test_uncapturable_model_error_names_the_branch(tmp_path, capfd):
    factory = tmp_path / "branchy.py"
    factory.write_text(UNCAPTURABLE)
    assert main(["optimize", f"{factory}:make", "-o", str(tmp_path / "out")]) == 2
    err = capfd.readouterr().err
    assert [ln for ln in err.splitlines() if ln.startswith("error:")] == [
        "error: could not capture the model: the forward branches on a tensor's value (branchy.py:12: "
        "if y.sum() > 0:); a graph cannot follow it. Make the branch depend on shapes or Python values, "
        "or use torch.cond."]


def test_help_everywhere(capsys):
    for argv in (["--help"], ["optimize", "--help"], ["passes", "--help"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 0
        assert "usage:" in capsys.readouterr().out


def test_repo_root_is_where_conftest_thinks():
    assert os.path.exists(os.path.join(REPO_ROOT, "pyproject.toml"))
