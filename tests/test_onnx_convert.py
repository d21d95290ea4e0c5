"""``graphopt convert``: outputs, atomic writes, --force, exit codes."""

from __future__ import annotations

import json
import os

import onnx
import pytest
import torch

import graphopt
import graphopt.examples_models
from graphopt.cli import main
from graphopt.commands import convert
from graphopt.specs import load_spec
from tests.support.onnx_support import rel_l2, register_translation, run_onnx, scaled_relu_onnx_wrong, torch_leaves


def _leftovers(directory) -> list[str]:
    return [n for n in os.listdir(directory) if ".partial" in n]


@pytest.fixture
def no_viewer(monkeypatch):
    """No graph.html (the viewer is slow): convert records the note the page's writer returns instead."""
    monkeypatch.setattr(convert, "write_graph_html", lambda result, path: "graph.html skipped in this test")


def test_convert_writes_checked_model_and_reports(tmp_path, no_viewer):
    out = tmp_path / "out"
    assert main(["convert", "examples:mlp?batch=2", "-o", str(out), "--speed-runs", "2"]) == 0
    assert sorted(os.listdir(out)) == ["graphopt.json", "model.onnx", "model.pt2", "report.json", "report.md"]
    assert _leftovers(tmp_path) == []
    report = json.loads((out / "report.json").read_text())
    onnx_part = report["extra"]["onnx"]
    assert onnx_part["path"] == str(out / "model.onnx")  # where it is, not where it was staged
    assert onnx_part["numerics"]["ok"] and onnx_part["numerics"]["rel_l2"] <= 1e-4
    speed = onnx_part["speed"]
    assert speed["plain"]["runs"] == 2 and speed["graphopt"]["median_ms"] > 0 and speed["speedup"] > 0
    assert any("graph.html skipped" in note for note in onnx_part["notes"])
    markdown = (out / "report.md").read_text()
    assert "## ONNX export" in markdown and "onnxruntime latency" in markdown and "| remove_noops |" in markdown
    onnx.checker.check_model(str(out / "model.onnx"))
    model, args = graphopt.examples_models.mlp(batch=2)
    program = torch.export.load(str(out / "model.pt2"))
    with torch.no_grad():
        assert torch.allclose(program.module()(*args)[0], model(*args), atol=1e-6)  # flat outputs
    (got,) = run_onnx(str(out / "model.onnx"), list(args))
    assert rel_l2(model(*args).detach().numpy(), got) <= 1e-4


def test_convert_with_dynamic_axes_runs_at_other_shapes(tmp_path, no_viewer):
    spec = "hf:gpt2?n_layer=1&n_embd=32&n_head=2&seq=8"
    out = tmp_path / "gpt2"
    assert main(["convert", spec, "-o", str(out), "--dynamic", "batch,seq", "--no-speed"]) == 0
    model_proto = onnx.load(str(out / "model.onnx"))
    (value,) = model_proto.graph.input
    assert [d.dim_param for d in value.type.tensor_type.shape.dim] == ["batch", "seq"]
    assert json.loads((out / "report.json").read_text())["extra"]["onnx"]["speed"] is None  # --no-speed
    original = load_spec(spec).model  # same seed: the same random weights
    ids = torch.randint(0, 50257, (3, 5))
    with torch.no_grad():
        (expected,) = torch_leaves(original(ids))
    (got,) = run_onnx(str(out / "model.onnx"), [ids])
    assert rel_l2(expected, got) <= 1e-4


def test_existing_directory_is_refused_without_force(tmp_path, capsys, no_viewer):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    (out / "graph.html").write_text("stale page from an earlier run")
    assert main(["convert", "examples:mlp", "-o", str(out), "--no-speed"]) == 2
    assert "--force" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["graph.html", "keep.txt"]

    assert main(["convert", "examples:mlp", "-o", str(out), "--no-speed", "--force"]) == 0
    # graphopt's files replaced, the user's kept, the stale graph.html (not written this time) removed
    assert sorted(os.listdir(out)) == ["graphopt.json", "keep.txt", "model.onnx", "model.pt2", "report.json", "report.md"]
    assert _leftovers(tmp_path) == []


def test_graph_html_comes_from_the_viewer_when_there_is_one(tmp_path, monkeypatch):
    def fake_visualize(result, path):
        with open(path, "w") as f:
            f.write(f"<html>{len(result.module.graph.nodes)} nodes</html>")

    monkeypatch.setattr(convert, "visualize", fake_visualize)
    out = tmp_path / "out"
    assert main(["convert", "examples:mlp", "-o", str(out), "--no-speed"]) == 0
    assert (out / "graph.html").read_text().startswith("<html>")


def test_op_without_translation_exits_2_naming_it_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["convert", "tests.support.onnx_support:custom_op_model", "-o", str(out), "--no-speed"]) == 2
    err = capsys.readouterr().err
    assert "graphopt_test.scaled_relu.default" in " ".join(err.split())
    assert not out.exists() and _leftovers(tmp_path) == []


def test_onnxruntime_mismatch_exits_1_and_writes_nothing(tmp_path, capsys, monkeypatch):
    register_translation(monkeypatch, scaled_relu_onnx_wrong)
    out = tmp_path / "out"
    assert main(["convert", "tests.support.onnx_support:custom_op_model", "-o", str(out), "--no-speed"]) == 1
    assert "check failed" in capsys.readouterr().err
    assert not out.exists() and _leftovers(tmp_path) == []


def test_bad_dynamic_axis_exits_2(tmp_path, capsys):
    assert main(["convert", "examples:mlp", "-o", str(tmp_path / "o"), "--dynamic", "time"]) == 2
    assert "batch and/or seq" in capsys.readouterr().err
    assert main(["convert", "examples:cnn", "-o", str(tmp_path / "o"), "--dynamic", "batch,seq"]) == 2
    assert not (tmp_path / "o").exists()


def test_precision_is_handed_to_optimize_as_a_pass_option(tmp_path, monkeypatch):
    seen = {}

    class Stop(Exception):
        pass

    def spy(*args, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(graphopt, "optimize", spy)
    with pytest.raises(Stop):
        main(["convert", "examples:mlp", "-o", str(tmp_path / "o"), "--precision", "bf16"])
    assert seen["precision"] == "bf16"
    assert seen["precision_int8_pair_safe"] is True  # an ONNX file is portable: exact without VNNI too
    assert not (tmp_path / "o").exists()
    seen.clear()
    with pytest.raises(Stop):
        main(["convert", "examples:mlp", "-o", str(tmp_path / "o"), "--precision", "int8",
              "--option", "precision_int8_pair_safe=false"])
    assert seen["precision_int8_pair_safe"] is False  # the user's word wins


def test_export_of_plain_int8_weights_says_where_the_file_is_exact(tmp_path):
    model, args = graphopt.examples_models.mlp(batch=2)
    result = graphopt.optimize(model, args, precision="int8", error_budget=0.05, precision_int8_pair_safe=False)
    assert result.report.record("precision").status == "applied"
    # check=False: on an AVX2 CPU onnxruntime would saturate these weights, which is what the note says
    info = graphopt.export_onnx(result, tmp_path / "plain.onnx", check=False)
    assert any("not pair-safe" in n and "precision_int8_pair_safe=True" in n for n in info.notes), info.notes
    safe = graphopt.optimize(model, args, precision="int8", error_budget=0.05, precision_int8_pair_safe=True)
    info = graphopt.export_onnx(safe, tmp_path / "safe.onnx")
    assert not any("pair-safe" in n for n in info.notes), info.notes


def test_help_documents_the_exit_codes(capsys):
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    text = capsys.readouterr().out
    assert "exit codes" in text and "--dynamic" in text and "--opset" in text


def test_convert_writes_the_viewer_page(tmp_path):
    out = tmp_path / "out"
    assert main(["convert", "examples:cnn", "-o", str(out), "--no-speed", "--dynamic", "batch"]) == 0
    assert sorted(os.listdir(out)) == ["graph.html", "graphopt.json", "model.onnx", "model.pt2", "report.json", "report.md"]
    page = (out / "graph.html").read_text()
    assert page.lstrip().lower().startswith("<!doctype html") or "<html" in page[:500].lower()
    assert not json.loads((out / "report.json").read_text())["extra"]["onnx"]["notes"]


def test_example_script_runs(tmp_path, capsys):
    import runpy

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "convert_to_onnx.py")
    runpy.run_path(path, run_name="not_main")["main"](str(tmp_path))
    out = capsys.readouterr().out
    assert "onnxruntime vs torch ok" in out and "batch 3 x seq 40: relative L2 vs torch" in out
    assert os.listdir(tmp_path) == ["model.onnx"]
