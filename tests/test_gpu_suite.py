"""benchmarks/gpu_suite.py, the one-shot GPU run, kept working on the CPU (issue 19).

The device run happens rarely and only once per loan, so CI runs the same
script here at tiny sizes (``--smoke``), from a copy of the repository with
graphopt's install hidden: the script must import graphopt (and map
``graphopt.passes`` to ``passes/``) by itself, as on the device machine.
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, "benchmarks", "gpu_suite.py")

# Run the script as on a machine where graphopt is not installed: the editable install's finder and any
# sys.path entry holding a graphopt package are removed before the script starts.
_WITHOUT_INSTALL = """
import os, runpy, sys
sys.meta_path[:] = [f for f in sys.meta_path
                    if 'editable' not in repr(f).lower() and 'editable' not in type(f).__module__.lower()]
sys.path[:] = [p for p in sys.path if p and not os.path.isdir(os.path.join(p, 'graphopt'))]
try:
    import graphopt.passes
    raise SystemExit('graphopt is still importable without the bootstrap: the test would prove nothing')
except ImportError:
    pass
for name in [m for m in sys.modules if m.split('.')[0] == 'graphopt']:
    del sys.modules[name]
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name='__main__')
"""


def _copy_checkout(dest: str) -> str:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("graphopt", "passes", "benchmarks"):
        shutil.copytree(os.path.join(REPO_ROOT, name), os.path.join(dest, name), ignore=ignore)
    return os.path.join(dest, "benchmarks", "gpu_suite.py")


def test_smoke_run_from_a_checkout_without_install(tmp_path):
    script = _copy_checkout(str(tmp_path / "repo"))
    out = tmp_path / "out"
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "GRAPHOPT_COMMIT")}
    env["PYTHONUNBUFFERED"] = "1"
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_INSTALL, script, "--smoke", "--out", str(out),
                           "--total-seconds", "240"], cwd=str(out), env=env, capture_output=True, text=True,
                          timeout=600)
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "gpu_suite.json").read_text())
    md = (out / "gpu_suite.md").read_text()

    env_info = data["env"]
    assert env_info["graphopt_import"].startswith("bootstrapped from ")
    assert os.path.realpath(env_info["graphopt_path"]) == os.path.realpath(str(tmp_path / "repo" / "graphopt"))
    assert env_info["graphopt_commit"] == "unknown"  # the copy has no .git
    for key in ("torch", "transformers", "python"):
        assert env_info[key]
    assert data["finished"]
    sections = data["sections"]
    assert {k: v["status"] for k, v in sections.items()} == dict.fromkeys(
        ("attention", "precision", "blocked", "generation"), "done"), json.dumps(sections, default=str)[:3000]

    variants = ("eager", "sdpa", "graphopt", "compile(eager)", "compile(sdpa)", "compile(graphopt)")
    for case in sections["attention"]["cases"]:
        assert case["status"] == "done"
        for v in variants:
            row = case["rows"][v]
            assert row["ms"] > 0 and row["peak_bytes"] >= 0, (case["model"], v, row)
            if v != "eager":
                assert row["rel_l2"] < 0.05, (case["model"], v, row)
        assert case["graphopt"]["sdpa_nodes"] > 0  # eager attention fused
        assert "compile_s" in case["rows"]["compile(graphopt)"]
    prec = sections["precision"]["rows"]
    assert set(prec) == {"fp32 eager", "bf16 eager", "graphopt bf16", "graphopt fp8", "graphopt auto"}
    assert all("rel_l2" in r and "top1" in r for r in prec.values()), prec
    assert "fp8" in prec["graphopt fp8"]["plan"].get("reason", "")  # declined on a CPU, and says why
    blocked = sections["blocked"]["rows"]
    assert blocked["eager"]["peak_bytes"] > 0
    g = blocked["graphopt blocked"]
    assert g.get("status") == "BudgetError" or "predicted_peak_bytes" in g, g
    gen = sections["generation"]["rows"]
    for b in (1, 2):
        for v in ("eager dynamic cache", "sdpa static cache", "sdpa static cache + compile"):
            r = gen[f"{v} b{b}"]
            assert r["prefill_ms"] > 0 and r["decode_tok_s"] > 0 and r["new_tokens"] == 6, (v, b, r)
    assert gen["graphopt prepare_generation"].get("check", "").startswith("teacher-forced"), gen["graphopt prepare_generation"]
    for b in (1, 2):
        r = gen[f"graphopt b{b}"]
        assert r["prefill_ms"] > 0 and r["decode_tok_s"] > 0, (b, r)
        r = gen[f"graphopt b{b} cuda graphs"]  # on the CPU: the fallback, with its reason
        assert r["decode_tok_s"] > 0 and "CUDA device" in r["cuda_graphs"], (b, r)

    assert md.startswith("<!-- gpu_suite:begin -->") and md.rstrip().endswith("<!-- gpu_suite:end -->")
    for heading in ("### Attention", "### Precision", "### Blocked", "### Generation"):
        assert heading in md
    assert "| llama | 64 | 1 | compile(graphopt) |" in md
    # CPU seconds, not wall time, so a loaded runner does not fail it (about 20 s wall, 45 CPU s
    # on an idle 2-core machine)
    assert cpu_s < 150, f"the smoke run used {cpu_s:.0f} CPU seconds; keep it well under a minute"


def _load_suite():
    spec = importlib.util.spec_from_file_location("gpu_suite_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not hasattr(__import__("signal"), "setitimer"), reason="needs signal.setitimer")
def test_a_section_past_its_deadline_is_interrupted_and_the_rest_still_run(tmp_path, monkeypatch):
    suite_mod = _load_suite()
    calls = []

    def endless(suite, sec):
        sec["rows"] = {"first": {"ms": 1.0}}
        calls.append("attention")
        while True:  # a compile that never ends
            time.sleep(0.01)

    def quick(suite, sec):
        calls.append("precision")
        sec["rows"] = {"fp32 eager": {"ms": 2.0, "rel_l2": 0.0, "top1": 1.0}}

    def broken(suite, sec):
        calls.append("blocked")
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(suite_mod, "RUNNERS", {"attention": endless, "precision": quick, "blocked": broken,
                                               "generation": quick})
    args = suite_mod.parse_args(["--smoke", "--out", str(tmp_path), "--total-seconds", "40",
                                 "--sections", "attention,precision,blocked"])
    suite = suite_mod.Suite(args)
    monkeypatch.setitem(suite_mod.SHARES, "attention", 0.05)  # 2 s of the 40 s
    start = time.monotonic()
    suite_mod.run_sections(suite, ["attention", "precision", "blocked"])
    assert time.monotonic() - start < 20
    sections = json.loads((tmp_path / "gpu_suite.json").read_text())["sections"]
    assert sections["attention"]["status"] == "interrupted: time budget"
    assert sections["attention"]["rows"] == {"first": {"ms": 1.0}}  # what it measured before is kept
    assert sections["precision"]["status"] == "done"
    assert sections["blocked"]["status"] == "error"
    assert "CUDA out of memory (simulated)" in sections["blocked"]["error"]
    assert calls == ["attention", "precision", "blocked"]
    md = (tmp_path / "gpu_suite.md").read_text()
    assert "interrupted: time budget" in md and "CUDA out of memory (simulated)" in md
