"""The static-cache step is checked against the model's own forward before any graph is built on it.

GPT-Neo's local attention over transformers' StaticCache takes its window mask at the cache's allocated length:
past the window, ``generate(cache_implementation="static")`` gives other tokens than the default dynamic cache.
graphopt checks the step past a model's window: it caps generation at the window where the step misses there
(GPT-Neo), generates past it where the step holds (Mistral, Gemma 3), and refuses a model whose static-cache
logits miss its own.
"""

from __future__ import annotations

import pytest
import torch

import graphopt
from graphopt.errors import BadInput
from graphopt.generate import read_cache_layout
from graphopt.generate.cache_check import static_cache_error

transformers = pytest.importorskip("transformers")

VOCAB = 200
WINDOW = 24


def gpt_neo(window: int = WINDOW) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPTNeoConfig(num_layers=2, hidden_size=64, num_heads=4, vocab_size=VOCAB,
                                       max_position_embeddings=128, attention_types=[[["global", "local"], 1]],
                                       window_size=window)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def assert_generates_transformers_tokens(model: torch.nn.Module, graphs, prompt: int, padding: int, new: int,
                                         seed: int) -> torch.Tensor:
    """Greedy tokens of two rows (the second left-padded by ``padding``) equal transformers'; returns the ids."""
    ids = torch.randint(1, VOCAB, (2, prompt), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :padding] = 0
    ids[1, :padding] = 0
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
    assert torch.equal(graphs.generate(ids, mask, max_new_tokens=new, eos_token_id=None, pad_token_id=0), expected)
    return ids


def test_the_check_sees_gpt_neo_past_its_window_and_passes_within_it():
    model = gpt_neo()
    layout = read_cache_layout(model)
    assert layout.sliding_window == WINDOW  # GPT-Neo names it window_size
    assert static_cache_error(model, layout, WINDOW) < 1e-5
    assert static_cache_error(model, layout, WINDOW + 16) > 1e-2


def test_gpt_neo_generates_transformers_tokens_within_its_window_and_refuses_past_it():
    model = gpt_neo()
    graphs = graphopt.prepare_generation(model)
    assert graphs.max_length == WINDOW
    assert any(n.startswith(f"prompt + generation capped at the {WINDOW}-token attention window") for n in graphs.notes)
    ids = assert_generates_transformers_tokens(model, graphs, prompt=9, padding=4, new=12, seed=3)
    with pytest.raises(BadInput, match="exceeds the 24"):
        graphs.generate(ids, max_new_tokens=WINDOW)


def test_a_model_whose_static_cache_misses_its_own_logits_is_refused(monkeypatch):
    # without the window, the build would check (and then generate) past it
    monkeypatch.setattr("graphopt.generate.step.WINDOW_NAMES", ("sliding_window",))
    with pytest.raises(BadInput, match="static KV cache gives other logits than its own forward"):
        graphopt.prepare_generation(gpt_neo())


def test_a_model_that_fails_on_its_own_gets_one_line():
    model = gpt_neo()

    def broken(*args, **kwargs):
        raise RuntimeError("The size of tensor a (4) must match the size of tensor b (8)\nmore detail")

    model.forward = broken
    with pytest.raises(BadInput, match=r"fails on a 2-token prompt with a KV cache \(RuntimeError: The size") as info:
        read_cache_layout(model)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("config_class, extra", [("MistralConfig", {}), ("Gemma3TextConfig", {"head_dim": 16})])
def test_a_windowed_model_whose_step_holds_past_the_window_generates_past_it(config_class, extra):
    # the window is 12 positions: a 30-token prompt and 30 new tokens attend through it many times over
    config = getattr(transformers, config_class)(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
        vocab_size=VOCAB, max_position_embeddings=128, sliding_window=12, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    graphs = graphopt.prepare_generation(model, max_length=80)
    assert graphs.max_length == 80 and not any("attention window" in n for n in graphs.notes)
    assert_generates_transformers_tokens(model, graphs, prompt=30, padding=5, new=30, seed=4)
