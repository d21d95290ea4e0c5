"""The generation bundle: saved with the result, loaded in a process without transformers, the same tokens."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import graphopt
from graphopt.errors import BadInput
from graphopt.generate.loop import weights_device
from graphopt.generate.settings import generation_defaults
from graphopt.saved import NotASavedModel

transformers = pytest.importorskip("transformers")

VOCAB = 128

FRESH = r"""
import sys
sys.modules["transformers"] = None
import torch, graphopt
d = sys.argv[1]
cases = torch.load(d + "/cases.pt")
bundle = graphopt.load(d)
for ids, mask, new, expected in cases:
    got = bundle.generate(ids, mask, max_new_tokens=new)
    assert torch.equal(got, expected), (got, expected)
logits = bundle(cases[0][0], use_cache=False)["logits"]
print("ok", type(bundle).__name__, tuple(logits.shape))
"""


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                      max_position_embeddings=128)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(1, VOCAB, (1, 8), generator=torch.Generator().manual_seed(1))
    result = graphopt.optimize(model, (ids,), {"use_cache": False})
    d = tmp_path_factory.mktemp("bundle")
    paths = result.save(d, generation=True)
    batch = torch.randint(1, VOCAB, (2, 11), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(batch)
    mask[0, :4] = 0  # left padding
    cases = [(ids, None, 9, result.generate(ids, max_new_tokens=9)),
             (batch, mask, 12, result.generate(batch, mask, max_new_tokens=12))]
    torch.save(cases, d / "cases.pt")
    return d, paths, cases, model


def test_bundle_round_trip_in_a_fresh_process_gives_identical_tokens(saved_llama):
    d, paths, cases, model = saved_llama
    assert {"prefill", "decode", "manifest", "pt2"} <= set(paths)
    manifest = json.loads((d / "graphopt.json").read_text())
    assert manifest["kind"] == "generation" and manifest["generation"]["layout"]["keys"] == [[2, 16]] * 2
    reference = model.generate(cases[1][0], attention_mask=cases[1][1], max_new_tokens=12, do_sample=False,
                               pad_token_id=0)
    assert torch.equal(cases[1][3], reference)  # what the bundle must reproduce is transformers' greedy output
    proc = subprocess.run([sys.executable, "-c", FRESH, str(d)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"ok LoadedGeneration (1, 8, {VOCAB})" in proc.stdout


def test_a_loaded_bundle_decodes_compiled_with_the_same_tokens(saved_llama):
    d, _, cases, _ = saved_llama
    bundle = graphopt.load(d)
    bundle.compile_decode = True
    for ids, mask, new, expected in cases:
        assert torch.equal(bundle.generate(ids, mask, max_new_tokens=new), expected)
    assert bundle.compiled_note is None  # it ran compiled


def test_a_loaded_bundle_refuses_an_ahead_of_time_compile_with_what_to_do(saved_llama):
    d, _, cases, _ = saved_llama
    bundle = graphopt.load(d)
    bundle.compile_decode = "aot"
    ids, mask, new, _ = cases[0]
    with pytest.raises(BadInput, match='takes True .torch.compile., not \'aot\'; compile ahead of time'):
        bundle.generate(ids, mask, max_new_tokens=new)


def test_a_loaded_bundle_knows_where_its_weights_are_and_the_models_generation_settings(saved_llama):
    # generate() checks the ids against this device; a bundle whose graph held no weights would check nothing
    bundle = graphopt.load(saved_llama[0])
    assert weights_device(bundle.prefill.graph_module) == torch.device("cpu")
    # and what the model's generation config sets: a plain generate() call there resolves as on the graphs
    assert bundle.generation_defaults == generation_defaults(saved_llama[3].generation_config) != {}


def test_a_bundle_missing_its_generation_entry_is_refused(saved_llama, tmp_path):
    d = saved_llama[0]
    manifest = json.loads((d / "graphopt.json").read_text())
    del manifest["generation"]
    for name in ("model.pt2", "prefill.pt2", "decode.pt2"):
        (tmp_path / name).write_bytes((d / name).read_bytes())
    (tmp_path / "graphopt.json").write_text(json.dumps(manifest))
    with pytest.raises(NotASavedModel, match="no generation entry"):
        graphopt.load(tmp_path)


def test_convert_generate_writes_a_bundle_that_generates_like_transformers(tmp_path, monkeypatch):
    from graphopt.cli import main
    import graphopt.commands.convert as convert

    monkeypatch.setattr(convert, "write_graph_html", lambda *a, **k: None)
    spec = "hf:llama?num_hidden_layers=1&hidden_size=32&intermediate_size=64&num_attention_heads=4&" \
           "num_key_value_heads=2&vocab_size=96&max_position_embeddings=64&seq=8"
    out = tmp_path / "llama"
    assert main(["convert", spec, "-o", str(out), "--generate", "--no-speed"]) == 0
    assert {"prefill.pt2", "decode.pt2", "graphopt.json", "model.onnx"} <= set(p.name for p in out.iterdir())
    bundle = graphopt.load(out)
    ids = torch.randint(1, 96, (1, 6), generator=torch.Generator().manual_seed(5))
    tokens = bundle.generate(ids, max_new_tokens=5, eos_token_id=None)
    assert tokens.shape == (1, 11) and torch.equal(tokens[:, :6], ids)
