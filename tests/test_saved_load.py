"""graphopt.load: saved results load and run in a process that never imports transformers or the model's code."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import graphopt
from graphopt.examples_models import nanogpt
from graphopt.saved import NotASavedModel, flatten_outputs, output_structure, rebuild_outputs

transformers = pytest.importorskip("transformers")

#: run in the fresh process: transformers made unimportable first; plain torch.export.load before graphopt
FRESH = r"""
import json, sys
sys.modules["transformers"] = None
import torch
cases = json.loads(sys.argv[1])
plain = {}
for name, d in cases.items():
    ep = torch.export.load(d + "/model.pt2")   # plain torch, before graphopt is imported
    args, kwargs = torch.load(d + "/inputs.pt")
    plain[name] = [t for t in ep.module()(*args, **kwargs)]
import graphopt
for name, d in cases.items():
    args, kwargs = torch.load(d + "/inputs.pt")
    expected = torch.load(d + "/expected.pt")
    out = graphopt.load(d)(*args, **kwargs)
    got = list(out.values())   # every field, in order (no nested or None fields in these cases)
    assert len(got) == len(expected) == len(plain[name]), name
    assert all(torch.equal(g, e) for g, e in zip(got, expected)), name
    assert all(torch.equal(p, e) for p, e in zip(plain[name], expected)), name
    print(name, type(out).__name__, list(out) if isinstance(out, dict) else "")
assert "transformers" not in {m.split(".")[0] for m, v in sys.modules.items() if v is not None}
"""


def _tiny(name):
    torch.manual_seed(0)
    if name == "gpt2":
        m = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=96,
                                                                 n_positions=32))
    elif name == "bert":
        m = transformers.BertModel(transformers.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                                           intermediate_size=64, vocab_size=96))
    else:
        m = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=96, max_position_embeddings=64))
    return m.eval()


def test_converted_models_load_in_a_process_without_transformers(tmp_path):
    cases = {}
    for name in ("gpt2", "bert", "llama"):
        model = _tiny(name)
        args, kwargs = (torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(1)),), {"use_cache": False}
        if name == "bert":
            kwargs = {"attention_mask": torch.ones(2, 8, dtype=torch.long)}
        result = graphopt.optimize(model, args, kwargs)
        d = tmp_path / name
        result.save(d)
        out = result.module(*args, **kwargs)
        torch.save((args, kwargs), d / "inputs.pt")
        torch.save(flatten_outputs(out), d / "expected.pt")  # every output tensor, before saving
        cases[name] = str(d)
    proc = subprocess.run([sys.executable, "-c", FRESH, json.dumps(cases)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "gpt2 dict ['logits']" in proc.stdout
    assert "bert dict ['last_hidden_state', 'pooler_output']" in proc.stdout


def test_loaded_in_process_the_model_output_class_comes_back(tmp_path):
    model, args = _tiny("gpt2"), (torch.randint(0, 96, (1, 6)),)
    result = graphopt.optimize(model, args, {"use_cache": False})
    paths = result.save(tmp_path)
    assert set(paths) == {"pt2", "report", "manifest"}
    out = graphopt.load(tmp_path)(*args, use_cache=False)
    assert type(out).__name__ == "CausalLMOutputWithCrossAttentions"
    assert torch.equal(out.logits, result.module(*args, use_cache=False).logits)


def test_a_hand_written_model_with_nested_outputs_round_trips(tmp_path):
    class Nested(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            y = self.lin(x)
            return {"a": (y, y.relu()), "b": [x.sum(-1)], "none": None}

    model, x = Nested().eval(), torch.randn(3, 4)
    graphopt.optimize(model, (x,)).save(tmp_path)
    out = graphopt.load(tmp_path)(x)
    ref = model(x)
    assert list(out) == ["a", "b", "none"] and out["none"] is None
    assert torch.allclose(out["a"][1], ref["a"][1]) and torch.allclose(out["b"][0], ref["b"][0])
    gpt, gx = nanogpt(n_layer=1)
    graphopt.optimize(gpt, gx).save(tmp_path / "nano")
    assert torch.allclose(graphopt.load(tmp_path / "nano")(*gx), gpt(*gx), atol=1e-5)


def test_structure_rebuild_is_the_inverse_of_flatten():
    out = transformers.modeling_outputs.BaseModelOutput(last_hidden_state=torch.ones(1), attentions=(torch.zeros(2),))
    obj = (out, {"k": [torch.ones(3), None, 4]})
    structure = json.loads(json.dumps(output_structure(obj)))
    back = rebuild_outputs(structure, flatten_outputs(obj))
    assert type(back[0]) is type(out) and torch.equal(back[0].attentions[0], torch.zeros(2))
    assert back[1]["k"][1] is None and back[1]["k"][2] == 4


@pytest.mark.parametrize("setup, words", [
    (lambda d: None, "no graphopt.json"),
    (lambda d: (d / "graphopt.json").write_text("[1]"), "not a graphopt manifest"),
    (lambda d: (d / "graphopt.json").write_text('{"format": "graphopt.saved", "version": 99, "kind": "model"}'),
     "format version 99"),
    (lambda d: (d / "graphopt.json").write_text('{"format": "graphopt.saved", "version": 1, "kind": "model", '
                                                 '"program": "../x.pt2"}'), "not a file of this directory"),
    (lambda d: (d / "graphopt.json").write_text('{"format": "graphopt.saved", "version": 1, "kind": "spaceship"}'),
     "cannot load"),
    (lambda d: ((d / "graphopt.json").write_text('{"format": "graphopt.saved", "version": 1, "kind": "model"}'),
                (d / "model.pt2").write_bytes(b"PK\x03\x04 truncated")), "not a loadable torch.export program"),
])
def test_anything_else_is_refused_with_one_line(tmp_path, setup, words):
    setup(tmp_path)
    with pytest.raises(NotASavedModel, match=words) as info:
        graphopt.load(tmp_path)
    assert "\n" not in str(info.value)


def test_a_missing_path_and_a_foreign_file_are_refused(tmp_path):
    with pytest.raises(NotASavedModel, match="no such file"):
        graphopt.load(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(NotASavedModel, match="not a .pt2"):
        graphopt.load(os.path.join(tmp_path, "notes.txt"))
