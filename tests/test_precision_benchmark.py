"""benchmarks/precision.py runs end to end at tiny sizes (no timing is asserted).

The GPU run is one prepared call on a lent device; the Llama and the modes it
uses (bf16, fp8, auto) are run here on the CPU first, so a script error does not
cost that call.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest

pytest.importorskip("transformers")


def _benchmark():
    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "precision.py"
    spec = importlib.util.spec_from_file_location("precision_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def _rows(path: pathlib.Path) -> dict[str, dict]:
    (result,) = json.loads(path.read_text())
    return {r["variant"]: r for r in result["rows"]}


def test_gpu_models_and_modes_run_on_the_cpu(tmp_path, capsys):
    out = tmp_path / "llama.json"
    assert _benchmark().main(["--quick", "--model", "llama", "--modes", "bf16,fp8,auto", "--runs", "1",
                              "--warmup", "0", "--no-references", "--json", str(out)]) == 0
    rows = _rows(out)
    assert list(rows) == ["fp32", "bf16", "fp8", "auto"]
    assert rows["fp8"]["plan"]["status"] == "unchanged"  # no fp8 kernel on a CPU: declined, and it says why
    assert "compute capability" in capsys.readouterr().out
    assert rows["bf16"]["plan"]["status"] in ("applied", "rolled back")
    for r in rows.values():
        assert r["rel_l2"] <= 2e-2 and r["top1"] >= 0.9  # every variant that runs is within the default budget


def test_cpu_run_with_its_reference_rows(tmp_path):
    out = tmp_path / "bert.json"
    assert _benchmark().main(["--quick", "--model", "bert", "--modes", "int8", "--runs", "1", "--warmup", "0",
                              "--onnx", "--json", str(out)]) == 0
    rows = _rows(out)
    assert list(rows) == ["fp32", "graphopt fp32", "torch.ao dynamic", "int8"]
    assert rows["graphopt fp32"]["rel_l2"] < 1e-5
    assert rows["int8"]["plan"]["status"] == "applied" and rows["int8"]["rel_l2"] <= 2e-2
    (result,) = json.loads(out.read_text())
    onnx = {r["variant"]: r for r in result["onnx_rows"]}  # every plan exported, checked and run in onnxruntime
    assert list(onnx) == ["plain export (fp32)", "graphopt fp32", "int8"]
    assert onnx["graphopt fp32"]["rel_l2"] < 1e-5 and 0 < onnx["int8"]["rel_l2"] <= 2e-2


def test_unknown_model_is_an_error(capsys):
    with pytest.raises(SystemExit):
        _benchmark().main(["--model", "resnet"])
    assert "choose from bert, gpt2, llama" in capsys.readouterr().err


def test_fp8_numerics_emulated_on_the_cpu(tmp_path):
    """--emulate-fp8: the fp8 plan runs through the op's reference (no fp8 kernel here), holds the
    budget on fresh inputs, and is not timed (its latency would be nobody's)."""
    out = tmp_path / "fp8.json"
    assert _benchmark().main(["--quick", "--model", "llama", "--modes", "fp8", "--emulate-fp8", "--batch", "1",
                              "--error-budget", "0.1", "--top1", "0.7", "--runs", "1", "--warmup", "0",
                              "--no-references", "--json", str(out)]) == 0
    rows = _rows(out)
    fp8 = rows["fp8 (emulated)"]
    assert fp8["plan"]["status"] == "applied" and fp8["plan"]["nodes"].get("fp8", 0) >= 1, fp8["plan"]
    assert fp8["ms"] is None and rows["fp32"]["ms"] is not None
    assert 1e-3 < fp8["rel_l2"] <= 0.1 * 1.25 and fp8["top1"] >= 0.7
