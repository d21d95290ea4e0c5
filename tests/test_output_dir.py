"""Atomic publication of ``-o DIR`` (issue 21 item 3): no run is lost, stale staging dirs go, SIGTERM cleans up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from graphopt import cli
from graphopt.commands.output_dir import OutputConflict, remove_stale_partials, staged_output_dir


def _partials(tmp_path, name="out"):
    return [p for p in os.listdir(tmp_path) if p.startswith(f".{name}.partial-")]


def test_directory_that_appears_meanwhile_is_not_overwritten(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OutputConflict, match="appeared while this run was working"):
        with staged_output_dir(str(out), force=False) as staging:
            open(os.path.join(staging, "model.pt2"), "w").write("second")
            out.mkdir()  # another run published first
            (out / "model.pt2").write_text("first")
    assert (out / "model.pt2").read_text() == "first"
    assert _partials(tmp_path) == []


def test_force_replaces_a_directory_that_appeared(tmp_path):
    out = tmp_path / "out"
    with staged_output_dir(str(out), force=True) as staging:
        open(os.path.join(staging, "model.pt2"), "w").write("second")
        out.mkdir()
        (out / "model.pt2").write_text("first")
    assert (out / "model.pt2").read_text() == "second"


def test_stale_partial_of_a_dead_pid_is_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".out.partial-{dead_pid}-abcd"
    live = tmp_path / f".out.partial-{os.getppid()}-abcd"  # a live process (our parent)
    for d in (stale, live):
        d.mkdir()
        (d / "model.pt2").write_text("x")
    removed = remove_stale_partials(str(tmp_path / "out"))
    assert removed == [str(stale)]
    assert not stale.exists() and live.exists()


def test_sigterm_unwinds_and_removes_the_staging_dir(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(cli.Terminated):
        with cli._sigterm_as_interrupt(), staged_output_dir(str(out), force=False) as staging:
            open(os.path.join(staging, "model.pt2"), "w").write("x")
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs between bytecodes
                pass
    assert not out.exists()
    assert _partials(tmp_path) == []


def test_two_concurrent_runs_into_one_new_directory(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "graphopt.cli", "optimize", "examples:mlp", "-o", str(out), "--no-verify"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "Traceback" not in loser and str(out) in loser
    assert "model.pt2" in os.listdir(out)
    assert _partials(tmp_path) == []
