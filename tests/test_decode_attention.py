"""One-query attention as matmuls (graphopt/generate/decode_attention.py): the same numbers as the fused op, only
in the decode copy a CPU compiler gets, declined for prompts."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

import graphopt
from graphopt.generate.decode_attention import decode_attention, math_decode_attention
from tests.support.generation_models import tiny_llama

SDPA = torch.ops.aten.scaled_dot_product_attention.default


@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (4, 4), (6, 1)])
@pytest.mark.parametrize("mask_kind", ["bool", "float", "per-head", None])
def test_decode_attention_equals_sdpa(heads, kv_heads, mask_kind):
    torch.manual_seed(0)
    b, length, dim = 3, 37, 16
    q, k, v = torch.randn(b, heads, 1, dim), torch.randn(b, kv_heads, length, dim), torch.randn(b, kv_heads, length, dim)
    mask = None
    if mask_kind is not None:
        keep = torch.rand(b, heads if mask_kind == "per-head" else 1, 1, length) > 0.3
        keep[..., -1] = True  # each row attends to its new token
        mask = keep if mask_kind == "bool" else torch.zeros(b, 1, 1, length).masked_fill(~keep, float("-inf"))
    gqa = heads != kv_heads
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=gqa)
    got = decode_attention(q, k, v, mask, scale=0.3, enable_gqa=gqa)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_only_the_decode_graphs_attentions_are_rewritten_in_a_copy():
    graphs = graphopt.prepare_generation(tiny_llama())
    decode, prefill = graphs.runnable("decode"), graphs.runnable("prefill")
    rewritten = math_decode_attention(decode)
    targets = [n.target for n in rewritten.graph.nodes]
    assert targets.count(decode_attention) == 2 and SDPA not in targets
    assert [n.target for n in decode.graph.nodes].count(SDPA) == 2  # the graph itself keeps the fused op
    logger, records = logging.getLogger("graphopt.generate.decode_attention"), _Records()
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(records)
    try:
        assert math_decode_attention(prefill) is prefill  # a prompt's query is longer than one position: declined
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)
    assert any("kept fused: a query of more than one position" in m for m in records.messages), records.messages
    states = graphs.decode.example_args
    with torch.no_grad():
        torch.testing.assert_close(rewritten(*states), decode(*states), rtol=1e-5, atol=1e-6)


def test_a_compiled_decode_step_runs_the_rewritten_copy():
    graphs = graphopt.prepare_generation(tiny_llama(), compile_decode=True)
    step = graphs.decode_step(torch.device("cpu"))
    assert [n.target for n in step.decode.graph.nodes].count(decode_attention) == 2
    assert graphs.decode_step(torch.device("cpu")) is step  # made once, not per call
