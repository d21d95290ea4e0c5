"""Decode replayed from CUDA graphs: the static-buffer plumbing, tested on the CPU with a capturer that replays by rerunning.

The real capture (``torch.cuda.CUDAGraph``) needs a GPU (benchmarks/gpu_suite.py runs it there);
everything around it -- static inputs copied per step, caches pooled at fixed addresses, one capture
per (batch, cache), the fallback and its reason -- is the same code on the CPU.
"""

from __future__ import annotations

import pytest
import torch

from graphopt.generate import CausalLMStep, read_cache_layout, run_generation
from graphopt.generate.build import GenerationGraphs
from graphopt.generate.cuda_graphs import POOL_SIZE, CudaGraphDecode, Replay, bucketed_length
from graphopt.generate.sampling import Sampling

transformers = pytest.importorskip("transformers")

VOCAB = 256


class RerunCapturer:
    """Stands in for a CUDA graph: the step runs at capture, and each replay reruns it on the static inputs."""

    def capture(self, fn):
        out = fn()
        return Replay(lambda: out.copy_(fn()), out)


class FailingCapturer:
    def capture(self, fn):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                      max_position_embeddings=256)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def generate(model, decode, ids, new=10):
    step = CausalLMStep(model)
    return run_generation(step, decode, read_cache_layout(model), ids, None, max_new_tokens=new,
                          sampling=Sampling(), eos_token_id=None)


def reference(model, ids, new=10):
    return model.generate(ids, max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)


def prompt(batch, length, seed=1):
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_replayed_decode_gives_transformers_tokens_with_one_capture_per_batch_and_cache(llama):
    decode = CudaGraphDecode(CausalLMStep(llama), read_cache_layout(llama), capturer=RerunCapturer())
    ids = prompt(2, 7)
    assert torch.equal(generate(llama, decode, ids), reference(llama, ids))
    assert decode.captures == 1 and decode.fallback_reason is None
    other = prompt(2, 9, seed=2)  # same batch, a length in the same bucket: the same cache and capture
    assert torch.equal(generate(llama, decode, other), reference(llama, other))
    assert decode.captures == 1
    single = prompt(1, 5, seed=3)
    assert torch.equal(generate(llama, decode, single), reference(llama, single))
    assert decode.captures == 2


def test_without_a_cuda_device_decode_runs_directly_and_says_why(llama):
    decode = CudaGraphDecode(CausalLMStep(llama), read_cache_layout(llama))  # the real CUDA capturer
    ids = prompt(1, 6)
    assert torch.equal(generate(llama, decode, ids), reference(llama, ids))
    assert decode.captures == 0 and "CUDA device" in decode.fallback_reason


def test_a_failed_capture_falls_back_with_the_first_line_of_the_reason(llama):
    decode = CudaGraphDecode(CausalLMStep(llama), read_cache_layout(llama), capturer=FailingCapturer())
    ids = prompt(2, 6)
    assert torch.equal(generate(llama, decode, ids), reference(llama, ids))
    assert decode.fallback_reason == ("CUDA graph capture failed (RuntimeError: operation not permitted "
                                      "when stream is capturing)")


def test_caches_are_pooled_zeroed_and_released_with_their_captures(llama):
    layout = read_cache_layout(llama)
    decode = CudaGraphDecode(CausalLMStep(llama), layout, max_length=200, capturer=RerunCapturer())
    first = decode.allocate(1, 10)
    first[0].fill_(3.0)
    again = decode.allocate(1, 20)  # same bucket: the same tensors, zeroed
    assert again[0] is first[0] and not again[0].any()
    assert again[0].shape[2] == bucketed_length(20, 200) == 64
    assert bucketed_length(190, 200) == 192 and bucketed_length(195, 200) == 200  # never past max_length
    generate(llama, decode, prompt(1, 5), new=3)
    assert decode.captures == 1
    for batch in range(2, 2 + POOL_SIZE):  # more sizes than the pool keeps: the first cache and its capture go
        decode.allocate(batch, 10)
    assert len(decode._caches) == POOL_SIZE and not decode._graphs


def test_a_cache_the_wrapper_does_not_own_is_never_captured(llama):
    layout = read_cache_layout(llama)
    decode = CudaGraphDecode(CausalLMStep(llama), layout, capturer=RerunCapturer())
    step = CausalLMStep(llama)
    ids = prompt(1, 6)
    cache = layout.allocate(1, 8)
    mask = torch.zeros(1, 8, dtype=torch.long)
    mask[:, :7] = 1
    with torch.no_grad():
        step(ids, mask[:, :6], torch.arange(6)[None], torch.tensor(0), [c[:, :, :6] for c in cache])
        decode(ids[:, -1:], mask, torch.tensor([[6]]), torch.tensor(6), cache)
    assert decode.captures == 0


def test_generation_graphs_use_cuda_graphs_only_on_a_gpu_unless_asked(llama):
    graphs = GenerationGraphs(prefill=None, decode=type("R", (), {"module": CausalLMStep(llama)})(),
                              layout=read_cache_layout(llama), max_length=256)
    assert graphs.decode_step(torch.device("cpu")) is graphs.decode.module
    graphs.cuda_graphs = True
    runner = graphs.decode_step(torch.device("cpu"))
    assert isinstance(runner, CudaGraphDecode)
    runner(prompt(1, 1), torch.ones(1, 4, dtype=torch.long), torch.tensor([[3]]), torch.tensor(3),
           read_cache_layout(llama).allocate(1, 4))
    assert "CUDA device" in graphs.cuda_graphs_note
