"""``hf:`` specs: random-weight transformers models from a config and example inputs that fit them."""
from __future__ import annotations

import pytest

from graphopt.specs import SpecError, load_spec

pytest.importorskip("transformers")

TINY_GPT2 = "hf:gpt2?n_layer=1&n_embd=32&n_head=2&vocab_size=100"


def test_the_default_seq_fits_a_model_with_fewer_positions():
    spec = load_spec(TINY_GPT2 + "&n_positions=16")  # the default seq (64) would not fit
    assert tuple(spec.args[0].shape) == (1, 16)
    assert tuple(load_spec(TINY_GPT2).args[0].shape) == (1, 64)


def test_a_given_seq_beyond_the_model_positions_is_refused():
    with pytest.raises(SpecError, match=r"seq=20 exceeds the model's max positions \(16\); lower seq"):
        load_spec(TINY_GPT2 + "&n_positions=16&seq=20")
