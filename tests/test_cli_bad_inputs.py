"""Table-driven bad inputs (issue 21 items 2 and 7): every row exits 2 with one error line, no traceback,
and leaves the working directory as it was.

Each row is a command line run in-process through ``graphopt.cli.main`` (an
exception escaping ``main`` fails the row: that would be a traceback). Rows
fail before any optimization, so the file stays fast; keep it growing.
``{dir}`` is the test's temporary directory, which holds the fixtures below.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest

from graphopt.cli import main

TINY = "hf:gpt2?n_layer=1&n_embd=32&n_head=2&vocab_size=128"

FACTORIES = """\
import sys
import torch

class Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        return torch.relu(self.lin(x))

class Lookup(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4)

    def forward(self, ids):
        return self.emb(ids)

class Raises(torch.nn.Module):
    def forward(self, x):
        raise ValueError("this forward always fails")

def ok():
    return Small(), (torch.randn(2, 8),)

def boom():
    raise RuntimeError("nope")

def leave():
    sys.exit(0)

def wrong_dtype():
    return Lookup(), (torch.randn(2, 3),)

def forward_raises():
    return Raises(), (torch.randn(2),)

class OddName(torch.nn.Module):
    NAME = chr(34) + "'><svg onload=x>"

    def __init__(self):
        super().__init__()
        self.add_module(self.NAME, torch.nn.Linear(8, 8))

    def forward(self, x):
        return getattr(self, self.NAME)(x)

def odd_name():
    return OddName(), (torch.randn(2, 8),)

def meta_weights():
    with torch.device("meta"):
        model = Small()
    return model, (torch.randn(2, 8, device="meta"),)
"""

OK = "{dir}/m.py:ok"

# (id, argv, words the error line must contain)
ROWS = [
    # specs
    ("n_layer-abc", ["analyze", "hf:gpt2?n_layer=abc"], "n_layer"),
    ("seq-abc", ["analyze", TINY + "&seq=abc"], "seq='abc'"),
    ("seq-negative", ["analyze", TINY + "&seq=-1"], "seq=-1"),
    ("seq-beyond-max-positions", ["analyze", TINY + "&seq=10000000"], "max positions"),
    ("vocab-zero", ["analyze", "hf:gpt2?n_layer=1&n_embd=32&n_head=2&vocab_size=0&seq=8"], "vocab_size=0"),
    ("unknown-key-typo", ["analyze", "hf:gpt2?n_layers=1&seq=8"], "did you mean 'n_layer'"),
    ("malformed-query", ["analyze", "hf:gpt2?n_layer"], "key=value"),
    ("unknown-model-type", ["analyze", "hf:notamodel?n_layer=1"], "unknown transformers model type"),
    ("missing-file", ["analyze", "{dir}/nothing.pt2"], "no such file"),
    ("random-bytes-pt2", ["analyze", "{dir}/random.pt2"], "not a torch.export program"),
    ("truncated-pt2", ["optimize", "{dir}/truncated.pt2", "-o", "{dir}/out"], "not a torch.export program"),
    # user code
    ("factory-raises", ["analyze", "{dir}/m.py:boom"], "your factory 'boom' raised RuntimeError: nope"),
    ("factory-raises-run", ["run", "{dir}/m.py:boom", "--nproc", "2"], "your factory 'boom' raised"),
    ("factory-file-syntax-error", ["analyze", "{dir}/broken.py:make"], "raised SyntaxError on import"),
    ("factory-file-exits-on-import", ["analyze", "{dir}/exits.py:make"], "raised SystemExit on import"),
    ("os-path-join-factory", ["analyze", "os.path:join"], "your factory 'join' raised TypeError"),
    ("factory-sys-exit", ["analyze", "{dir}/m.py:leave"], "sys.exit(0)"),
    ("wrong-input-dtype", ["optimize", "{dir}/m.py:wrong_dtype", "-o", "{dir}/out"], "your model raised"),
    ("forward-raises", ["analyze", "{dir}/m.py:forward_raises"], "your model raised ValueError"),
    ("attribute-not-an-identifier", ["optimize", "{dir}/m.py:odd_name", "-o", "{dir}/out"], "not a Python identifier"),
    ("meta-weights", ["optimize", "{dir}/m.py:meta_weights", "-o", "{dir}/out"], "meta device"),
    # options
    *[(f"memory-budget-{v}", ["optimize", OK, "-o", "{dir}/out", "--memory-budget", v], "memory_budget")
      for v in ("-1", "abc", "2XB", "nan", "inf", "0")],
    ("option-memory-budget-abc", ["optimize", OK, "-o", "{dir}/out", "--option", "memory_budget=abc"], "memory_budget"),
    ("option-error-budget-abc", ["optimize", OK, "-o", "{dir}/out", "--option", "error_budget=abc"], "error_budget"),
    ("option-verify-abc", ["optimize", OK, "-o", "{dir}/out", "--option", "verify=abc"], "verify"),
    ("budget-given-twice", ["optimize", OK, "-o", "{dir}/out", "--memory-budget", "1MiB",
                            "--option", "memory_budget=2MiB"], "given twice"),
    ("option-precision-bogus", ["optimize", OK, "-o", "{dir}/out", "--option", "precision=bogus"], "precision"),
    ("error-budget-negative", ["optimize", OK, "-o", "{dir}/out", "--precision", "int8", "--error-budget", "-1"],
     "error_budget"),
    ("error-budget-nan", ["optimize", OK, "-o", "{dir}/out", "--precision", "int8", "--error-budget", "nan"],
     "error_budget"),
    ("unknown-pass", ["optimize", OK, "-o", "{dir}/out", "--passes", "nonsense"], "unknown pass"),
    ("port-out-of-range", ["run", OK, "--nproc", "2", "--port", "99999"], "--port 99999"),
    ("target-is-a-directory", ["analyze", OK, "--target", "{dir}/adir"], "not a target JSON"),
    ("target-is-a-json-list", ["analyze", OK, "--target", "{dir}/list.json"], "not a target JSON"),
    ("viz-onnx", ["viz", "{dir}/any.onnx", "-o", "{dir}/v.html"], "needs a PyTorch model"),
    # outputs (checked before the model is optimized)
    ("output-under-proc", ["optimize", OK, "-o", "/proc/graphopt-out"], "cannot write /proc/graphopt-out"),
    ("output-under-a-file", ["optimize", OK, "-o", "{dir}/afile/out"], "is a file"),
    ("output-is-a-file", ["optimize", OK, "-o", "{dir}/afile"], "not a directory"),
    ("force-over-a-model-pt2-directory", ["optimize", OK, "-o", "{dir}/taken", "--force"], "is a directory"),
    ("viz-output-under-a-file", ["viz", OK, "-o", "{dir}/afile/graph.html"], "is a file"),
    ("convert-output-under-proc", ["convert", OK, "-o", "/proc/graphopt-out"], "cannot write"),
]


def _fixtures(root: Path) -> None:
    (root / "m.py").write_text(FACTORIES)
    (root / "broken.py").write_text("def make(:\n    pass\n")
    (root / "exits.py").write_text("import sys\nsys.exit(3)\n")
    (root / "random.pt2").write_bytes(os.urandom(3000))
    with zipfile.ZipFile(root / "whole.zip", "w") as zf:
        zf.writestr("archive/version", "0" * 4000)
    (root / "truncated.pt2").write_bytes((root / "whole.zip").read_bytes()[:200])
    (root / "whole.zip").unlink()
    (root / "list.json").write_text("[1, 2]")
    (root / "adir").mkdir()
    (root / "afile").write_text("x")
    (root / "any.onnx").write_bytes(b"")
    (root / "taken" / "model.pt2").mkdir(parents=True)


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if "__pycache__" not in p.parts)


def _point_log_handlers_here() -> None:
    """Log handlers made during an earlier row (the CLI's basicConfig, transformers' own) keep that row's
    captured stderr, closed since; point them at this row's. A real run has one stderr: this only undoes
    an artefact of running many command lines in one process (call it in the test body: pytest swaps
    ``sys.stderr`` again between a test's set-up and its call)."""
    import logging
    import sys

    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    for handler in (h for lg in loggers for h in lg.handlers):
        if type(handler) is logging.StreamHandler:
            handler.stream = sys.stderr  # not setStream: it flushes the old, closed stream
            handler.__dict__.pop("flush", None)  # transformers binds flush to the stderr of its import


@pytest.mark.parametrize("argv, words", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_exits_2_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd, argv, words):
    _fixtures(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = _tree(tmp_path)
    _point_log_handlers_here()
    code = main([a.format(dir=tmp_path) for a in argv])
    err = capfd.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]  # progress lines aside
    assert code == 2, err
    assert "Traceback" not in err
    assert len(errors) == 1, err
    assert words in errors[0], errors[0]
    assert _tree(tmp_path) == before


def test_names_with_markup_are_printed_as_written(tmp_path: Path, capfd):
    """ONNX node and input names are data: rich markup in them (``[/x]``) is shown, never interpreted;
    a -1 ("any size") axis is not a size, so it gives no negative FLOPs."""
    from onnx import TensorProto, helper, save

    from graphopt.onnx import load_onnx

    def model(first_dim, path):
        x = helper.make_tensor_value_info("in[/x]", TensorProto.FLOAT, [first_dim, 8])
        y = helper.make_tensor_value_info("out[/y]", TensorProto.FLOAT, [first_dim, 8])
        w = helper.make_tensor("w[/b]", TensorProto.FLOAT, [8, 8], [0.1] * 64)
        node = helper.make_node("MatMul", ["in[/x]", "w[/b]"], ["out[/y]"], name="[/x]node[red]")
        graph = helper.make_graph([node], "g", [x], [y], [w])
        save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
        return path

    assert main(["analyze", str(model("batch", tmp_path / "m.onnx")), "--dim", "batch=2"]) == 0
    out = capfd.readouterr().out
    assert "[/x]node[red]" in out and "in[/x]" in out
    any_size = load_onnx(str(model(-1, tmp_path / "any.onnx")))
    assert any_size.nodes[0].flops is None and any_size.total_flops() == 0
