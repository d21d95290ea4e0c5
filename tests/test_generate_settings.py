"""generate() settings resolve as in transformers' generate: call > generation_config= > the model's > defaults."""

from __future__ import annotations

import logging

import pytest
import torch

from graphopt.errors import BadInput
from graphopt.generate import prepare_generation
from graphopt.generate.settings import DEFAULT_NEW_TOKENS, UnsupportedSetting, generation_defaults, resolve_request
from tests.support.generation_models import VOCAB, padded_prompts, tiny_llama

transformers = pytest.importorskip("transformers")


def test_the_call_wins_over_a_passed_config_which_wins_over_the_models():
    model = {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 30}
    passed = transformers.GenerationConfig(temperature=0.5, max_length=50)
    request = resolve_request({"generation_config": passed, "top_k": 0}, model, prompt_length=10)
    sampling = request.sampling
    assert (sampling.do_sample, sampling.temperature, sampling.top_k, sampling.top_p) == (True, 0.5, 0, 0.9)
    assert request.max_new_tokens == 40  # the passed config's max_length (prompt included) is nearer than 30


def test_unset_values_fall_back_to_transformers_defaults():
    request = resolve_request({"do_sample": True, "top_k": None}, {}, prompt_length=4)
    assert request.sampling.top_k == 50 and request.sampling.top_p is None and request.sampling.temperature == 1.0
    assert request.max_new_tokens == DEFAULT_NEW_TOKENS
    assert not resolve_request({}, {}, prompt_length=4).sampling.do_sample  # greedy
    assert resolve_request({"max_length": 9}, {}, prompt_length=4).max_new_tokens == 5


def test_end_and_pad_tokens_come_from_the_call_then_the_model():
    assert resolve_request({}, {}, 4, eos_token_id=2, pad_token_id=0).eos_token_id == 2
    assert resolve_request({"eos_token_id": None}, {}, 4, eos_token_id=2).eos_token_id is None  # none: no end
    assert resolve_request({"pad_token_id": 7}, {}, 4, pad_token_id=0).pad_token_id == 7


@pytest.mark.parametrize("call", [{"num_beams": 4}, {"no_repeat_ngram_size": 2}, {"min_new_tokens": 3},
                                  {"output_scores": True}, {"stop_strings": ["\n"]},
                                  {"generation_config": transformers.GenerationConfig(num_beams=2)}])
def test_a_setting_graphopt_does_not_apply_is_refused_in_the_call(call):
    with pytest.raises(UnsupportedSetting, match="is not applied by graphopt's generate") as info:
        resolve_request(call, {}, prompt_length=4)
    assert "\n" not in str(info.value)


def test_off_values_and_settings_without_effect_are_accepted_and_unknown_names_are_not():
    request = resolve_request({"num_beams": 1, "repetition_penalty": 1.0, "use_cache": True,
                               "return_dict_in_generate": False}, {}, prompt_length=4)
    assert request.not_applied == ()
    with pytest.raises(TypeError, match="unexpected keyword argument 'num_beam'"):
        resolve_request({"num_beam": 1}, {}, prompt_length=4)


@pytest.mark.parametrize("config", ["do_sample=True", 3, object()])
def test_a_generation_config_that_is_not_one_is_refused_in_one_line(config):
    with pytest.raises(BadInput, match="generation_config must be a transformers GenerationConfig or a dict"):
        resolve_request({"generation_config": config}, {}, prompt_length=4)


def test_generation_defaults_keep_what_a_config_sets():
    config = transformers.GenerationConfig(do_sample=True, top_p=0.8, eos_token_id=[1, 2])
    assert generation_defaults(config) == {**generation_defaults(transformers.GenerationConfig()),
                                           "do_sample": True, "top_p": 0.8, "eos_token_id": [1, 2]}
    assert generation_defaults(None) == {}


@pytest.fixture(scope="module")
def sampling_llama():
    model = tiny_llama()
    # a checkpoint that samples by default; top_k=1 makes its draws greedy, so transformers' own can be compared
    model.generation_config.do_sample, model.generation_config.top_k = True, 1
    return model, prepare_generation(model)


def test_a_plain_call_follows_the_models_generation_config_like_transformers(sampling_llama):
    model, graphs = sampling_llama
    ids, mask = padded_prompts()
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=None, pad_token_id=0)
    assert torch.equal(graphs.generate(ids, mask, max_new_tokens=6, eos_token_id=None, pad_token_id=0), expected)
    assert graphs.generation_defaults["do_sample"] is True


def test_max_length_counts_the_prompt_like_transformers(sampling_llama):
    model, graphs = sampling_llama
    ids, mask = padded_prompts()
    expected = model.generate(ids, attention_mask=mask, max_length=16, eos_token_id=None, pad_token_id=0)
    got = graphs.generate(ids, mask, max_length=16, eos_token_id=None, pad_token_id=0)
    assert got.shape == (3, 16) and torch.equal(got, expected)


def test_sampling_without_top_k_takes_transformers_top_50_and_top_k_0_turns_it_off(sampling_llama):
    model, graphs = sampling_llama
    ids = torch.randint(1, VOCAB, (16, 6), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        top50 = model(ids).logits[:, -1].topk(50).indices  # the first new token's candidates
    hot = dict(max_new_tokens=1, do_sample=True, temperature=1e4, eos_token_id=None)  # nearly uniform draws

    def first_tokens(seed: int, **kw) -> torch.Tensor:
        return graphs.generate(ids, generator=torch.Generator().manual_seed(seed), **hot, **kw)[:, -1:]

    assert all(bool((first_tokens(s, top_k=None) == top50).any(-1).all()) for s in range(4))
    outside = [int((~(first_tokens(s, top_k=0) == top50).any(-1)).sum()) for s in range(4)]
    assert sum(outside) > 0  # over 64 draws from 320 tokens, most fall outside the top 50


def test_a_setting_the_model_config_has_but_graphopt_does_not_apply_is_noted_once(sampling_llama, caplog):
    model, graphs = sampling_llama
    kept = graphs.generation_defaults
    graphs.generation_defaults = {**kept, "no_repeat_ngram_size": 3}
    ids, _ = padded_prompts()
    try:
        with caplog.at_level(logging.WARNING, logger="graphopt.generate.settings"):
            graphs.generate(ids, max_new_tokens=2)
            graphs.generate(ids, max_new_tokens=2)
    finally:
        graphs.generation_defaults = kept
    noted = [n for n in graphs.notes if "no_repeat_ngram_size=3" in n]
    assert len(noted) == 1 and "does not apply" in noted[0]
    assert sum("no_repeat_ngram_size=3" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_a_repetition_penalty_gives_transformers_tokens_greedy(sampling_llama, penalty):
    # greedy with a penalty is deterministic: the tokens must be transformers' own (padding not penalised)
    model, graphs = sampling_llama
    ids, mask = padded_prompts()
    kw = dict(max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0, repetition_penalty=penalty)
    expected = model.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(graphs.generate(ids, mask, **kw), expected)
    assert not torch.equal(graphs.generate(ids, mask, **{**kw, "repetition_penalty": 1.0}), expected)


def test_min_p_keeps_only_tokens_near_the_most_likely(sampling_llama):
    model, graphs = sampling_llama
    ids = torch.randint(1, VOCAB, (16, 6), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        probs = (model(ids).logits[:, -1] / 2.0).softmax(-1)
    allowed = probs >= 0.5 * probs.amax(-1, keepdim=True)
    for seed in range(4):
        token = graphs.generate(ids, max_new_tokens=1, do_sample=True, temperature=2.0, top_k=0, min_p=0.5,
                                eos_token_id=None, generator=torch.Generator().manual_seed(seed))[:, -1]
        assert bool(allowed.gather(1, token[:, None]).all())
