"""benchmarks/generate.py runs (tiny sizes) and reports what it measures: a smoke test, no timing asserted."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from tests.conftest import REPO_ROOT

pytest.importorskip("transformers")


def test_tiny_run_reports_every_variant(tmp_path, capsys):
    path = os.path.join(REPO_ROOT, "benchmarks", "generate.py")
    spec = importlib.util.spec_from_file_location("bench_generate", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "gen.json"
    assert bench.main(["--tiny", "--models", "llama", "--batches", "1,2", "--variants", "hf,fp32,int8wo,int8wo+compile",
                       "--no-compile", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["models"]["llama"]["results"]
    for b in (1, 2):
        for v in ("hf eager dynamic", "hf sdpa static", "graphopt fp32", "graphopt int8wo", "graphopt int8wo+compile"):
            r = rows[f"{v} b{b}"]
            assert r["decode_ms"] > 0 and r["prefill_ms"] > 0, (v, r)
            # one prefill per generate round, plus the prefill-only round for uncompiled variants
            assert r["prefill_samples"] == (1 if "compile" in v else 2), (v, r)
        assert rows[f"graphopt fp32 b{b}"]["tokens_equal"] is True
        assert rows[f"graphopt fp32 b{b}"]["teacher_forced_rel_l2"] < 1e-4
        assert rows[f"graphopt fp32 b{b}"]["decode_weights"] == {"fp32": 1.0}
        assert rows[f"graphopt int8wo b{b}"]["decode_weights"].get("int8wo", 0) > 0
    notes = rows["graphopt int8wo+compile b1"]["notes"]
    assert not [n for n in notes if "not compiled" in n], notes  # it compiled and passed its check
    assert "| graphopt int8wo b2 |" in capsys.readouterr().out
