"""Shared fixtures: tiny real models and their optimized results.

Each :class:`ModelCase` is a model with its example inputs and a way to draw
fresh inputs of the same kind (token ids in the vocabulary, 0/1 attention
masks with padding, images). Building a transformers model and running
``graphopt.optimize`` on it take seconds, so both are session-scoped and
cached: ``optimized(name)`` optimizes a case once per test session (per xdist
worker) and remembers the model's state from before, so tests can check the
user's model was left alone.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

import graphopt
from tests.support.helpers import snapshot_state

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# under pytest-xdist every worker runs torch with one thread per core by default: 2 workers on 2 cores ran 4
# threads, each timing and kernel fighting the other worker's. Each worker gets its share of the cores instead.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, torch.get_num_threads() // _WORKERS))

VOCAB = 256
BATCH, SEQ = 2, 16


@dataclass
class ModelCase:
    """A model, its example inputs and a generator of fresh inputs like them."""

    name: str
    model: torch.nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    fresh: Callable[[int], tuple[tuple[Any, ...], dict[str, Any]]] | None = None

    def fresh_inputs(self, seed: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
        assert self.fresh is not None
        return self.fresh(seed)


@dataclass
class OptimizedCase:
    case: ModelCase
    result: graphopt.OptimizeResult
    state_before: dict[str, Any]


def _token_inputs(seed: int, with_mask: bool = False, vocab: int = VOCAB) -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(1000 + seed)
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=g)
    if not with_mask:
        return (ids,), {}
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    # right padding of a random length on the second row, as a tokenizer would produce
    pad = int(torch.randint(1, SEQ // 2, (1,), generator=g))
    mask[1, SEQ - pad:] = 0
    return (ids,), {"attention_mask": mask}


def build_gpt2() -> ModelCase:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64, use_cache=False,
                     bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    model = GPT2LMHeadModel(cfg)
    args, kwargs = _token_inputs(0)
    return ModelCase("gpt2", model.eval(), args, kwargs, lambda s: _token_inputs(s))


def build_bert() -> ModelCase:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                     vocab_size=VOCAB, max_position_embeddings=64, use_cache=False, attn_implementation="eager")
    model = BertModel(cfg)
    args, kwargs = _token_inputs(0, with_mask=True)
    return ModelCase("bert", model.eval(), args, kwargs, lambda s: _token_inputs(s, with_mask=True))


def build_llama() -> ModelCase:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=64, use_cache=False,
                      bos_token_id=0, eos_token_id=0, pad_token_id=None, attn_implementation="eager")
    model = LlamaForCausalLM(cfg)
    args, kwargs = _token_inputs(0)
    return ModelCase("llama", model.eval(), args, kwargs, lambda s: _token_inputs(s))


def build_nanogpt() -> ModelCase:
    from graphopt.examples_models import nanogpt

    model, args = nanogpt(n_layer=2, n_head=4, n_embd=64, vocab_size=VOCAB, block_size=64, batch=BATCH, seq=SEQ)
    return ModelCase("nanogpt", model, args, {}, lambda s: _token_inputs(s))


def build_cnn() -> ModelCase:
    from graphopt.examples_models import cnn

    model, args = cnn(batch=2, width=8)

    def fresh(seed: int) -> tuple[tuple, dict]:
        g = torch.Generator().manual_seed(2000 + seed)
        return (torch.randn(2, 3, 32, 32, generator=g),), {}

    return ModelCase("cnn", model, args, {}, fresh)


BUILDERS: dict[str, Callable[[], ModelCase]] = {
    "gpt2": build_gpt2,
    "bert": build_bert,
    "llama": build_llama,
    "nanogpt": build_nanogpt,
    "cnn": build_cnn,
}

MODEL_NAMES = list(BUILDERS)


@pytest.fixture(scope="session")
def model_cases() -> Callable[[str], ModelCase]:
    """``model_cases(name)`` -> the session's (cached) :class:`ModelCase`."""
    cache: dict[str, ModelCase] = {}

    def get(name: str) -> ModelCase:
        if name not in cache:
            cache[name] = BUILDERS[name]()
        return cache[name]

    return get


@pytest.fixture(scope="session")
def optimized(model_cases: Callable[[str], ModelCase]) -> Callable[[str], OptimizedCase]:
    """``optimized(name)`` -> the case optimized with the default pipeline (once per session)."""
    cache: dict[str, OptimizedCase] = {}

    def get(name: str) -> OptimizedCase:
        if name not in cache:
            case = model_cases(name)
            before = snapshot_state(case.model)
            result = graphopt.optimize(case.model, case.args, case.kwargs)
            cache[name] = OptimizedCase(case, result, before)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def gpt2(model_cases: Callable[[str], ModelCase]) -> ModelCase:
    return model_cases("gpt2")


@pytest.fixture(scope="session")
def bert(model_cases: Callable[[str], ModelCase]) -> ModelCase:
    return model_cases("bert")


@pytest.fixture(scope="session")
def llama(model_cases: Callable[[str], ModelCase]) -> ModelCase:
    return model_cases("llama")


@pytest.fixture(scope="session")
def nanogpt_case(model_cases: Callable[[str], ModelCase]) -> ModelCase:
    return model_cases("nanogpt")


@pytest.fixture(scope="session")
def cnn_case(model_cases: Callable[[str], ModelCase]) -> ModelCase:
    return model_cases("cnn")
