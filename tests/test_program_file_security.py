"""A .pt2 whose pickled entry carries a payload runs no code under any command that takes a spec."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import zipfile

import pytest
import torch

from graphopt.program_file import UnsafeProgramFile, load_exported_program


class _Payload:
    """Unpickling this calls ``open(marker, 'w')``: the marker file appears if code runs."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.lin(x))


def _crafted(tmp_path, marker: str) -> str:
    """A real program whose example-inputs entry is replaced by a pickle with a payload."""
    clean = str(tmp_path / "clean.pt2")
    torch.export.save(torch.export.export(_Tiny(), (torch.randn(2, 4),)), clean)
    evil = str(tmp_path / "evil.pt2")
    buffer = io.BytesIO()
    torch.save(((torch.randn(2, 4), _Payload(marker)), {}), buffer)
    with zipfile.ZipFile(clean) as src, zipfile.ZipFile(evil, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if "data/sample_inputs/" in item.filename:
                data = buffer.getvalue()
            dst.writestr(item, data)
    return evil


def test_a_clean_program_loads(tmp_path):
    path = str(tmp_path / "clean.pt2")
    torch.export.save(torch.export.export(_Tiny(), (torch.randn(2, 4),)), path)
    ep = load_exported_program(path)
    assert ep.example_inputs is not None
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # the switch is restored


def test_the_payload_does_not_run_and_the_entry_is_named(tmp_path):
    marker = str(tmp_path / "marker")
    evil = _crafted(tmp_path, marker)
    with pytest.raises(UnsafeProgramFile, match="sample_inputs"):
        load_exported_program(evil)
    assert not os.path.exists(marker)


def test_torch_alone_would_run_it(tmp_path):
    """The test can fail: plain torch.export.load does run the payload (its pickle fallback)."""
    marker = str(tmp_path / "marker")
    evil = _crafted(tmp_path, marker)
    try:
        torch.export.load(evil)
    except Exception:  # noqa: BLE001 - the payload's return value is no input; what matters is the marker
        pass
    assert os.path.exists(marker)


@pytest.mark.parametrize("command", [
    ["analyze"], ["optimize", "-o", "{out}"], ["convert", "-o", "{out}"], ["viz", "-o", "{out}/g.html"],
])
def test_every_command_refuses_it_with_exit_2_and_one_line(tmp_path, command):
    marker = str(tmp_path / "marker")
    evil = _crafted(tmp_path, marker)
    argv = [a.format(out=str(tmp_path / "out")) for a in command]
    proc = subprocess.run([sys.executable, "-m", "graphopt", argv[0], evil, *argv[1:]],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert not os.path.exists(marker)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]  # besides progress lines
    assert len(errors) == 1 and "refused" in errors[0] and "sample_inputs" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_weight_marked_use_pickle_is_read_weights_only_too(tmp_path):
    """torch reads ``use_pickle`` weights with weights_only=False; graphopt's load refuses the payload."""
    import json

    marker = str(tmp_path / "marker")
    clean = str(tmp_path / "clean.pt2")
    torch.export.save(torch.export.export(_Tiny(), (torch.randn(2, 4),)), clean)
    evil = str(tmp_path / "evil_weight.pt2")
    payload = io.BytesIO()
    torch.save(_Payload(marker), payload)
    with zipfile.ZipFile(clean) as src, zipfile.ZipFile(evil, "w") as dst:
        config_name = next(n for n in src.namelist() if n.endswith("_weights_config.json"))
        config = json.loads(src.read(config_name))
        first = next(iter(config["config"].values()))
        first["use_pickle"] = True
        target = config_name.rsplit("/", 1)[0] + "/" + first["path_name"]
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == config_name:
                data = json.dumps(config).encode()
            elif item.filename == target:
                data = payload.getvalue()
            dst.writestr(item, data)
    with pytest.raises(UnsafeProgramFile, match="weight_0"):
        load_exported_program(evil)
    assert not os.path.exists(marker)
