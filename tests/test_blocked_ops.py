"""The blocked / chunked operators equal their unblocked formulas.

fp32 relative L2 <= 1e-5 for sizes the block does not divide, block 1, and a
block >= the dimension; torch.library.opcheck validates schema and fake kernels.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import graphopt  # noqa: F401  (registers torch.ops.graphopt.*)
from graphopt.ops._blocking import ACTIVATIONS, spans

ops = torch.ops.graphopt

# block sizes: not dividing the dimension, 1, >= the dimension, 0 (= whole)
BLOCKS = [3, 1, 64, 0]


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def test_spans_cover_the_dimension():
    assert list(spans(7, 3)) == [(0, 3), (3, 6), (6, 7)]
    assert list(spans(7, 1)) == [(i, i + 1) for i in range(7)]
    assert list(spans(7, 7)) == [(0, 7)] == list(spans(7, 100)) == list(spans(7, 0))


# ---------------------------------------------------------------- matmul / linear

@pytest.mark.parametrize("block", BLOCKS)
def test_blocked_matmul_matches(block):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 13, 11, generator=g), torch.randn(3, 11, 10, generator=g)
    out = ops.blocked_matmul(a, b, block, block + 1 if block else 0, block)
    assert out.shape == (2, 3, 13, 10)
    assert rel_l2(out, a @ b) <= 1e-5


@pytest.mark.parametrize("block", BLOCKS)
def test_blocked_linear_matches(block):
    g = torch.Generator().manual_seed(1)
    x, w, bias = torch.randn(2, 7, 13, generator=g), torch.randn(9, 13, generator=g), torch.randn(9, generator=g)
    out = ops.blocked_linear(x, w, bias, block, block, block)
    assert rel_l2(out, F.linear(x, w, bias)) <= 1e-5
    assert rel_l2(ops.blocked_linear(x, w, None, block, 4, 5), F.linear(x, w)) <= 1e-5


def test_blocked_linear_low_precision_accumulates_in_fp32():
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(4, 2048, generator=g).bfloat16(), torch.randn(8, 2048, generator=g).bfloat16()
    exact = F.linear(x.double(), w.double())
    out = ops.blocked_linear(x, w, None, 2, 4, 64)
    assert out.dtype == torch.bfloat16
    # fp32 accumulation: only the final rounding to bf16 remains
    assert rel_l2(out, exact) <= 2 ** -8
    assert rel_l2(out, F.linear(x, w)) <= 1e-2


# ---------------------------------------------------------------- attention

def reference_attention(q, k, v, bias=None, mask=None, mask_value=-math.inf, scale=1.0, softcap=0.0):
    s = (q @ k.transpose(-2, -1)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + bias
    if mask is not None:
        s = s.masked_fill(mask, mask_value)
    return torch.softmax(s, -1) @ v


def _qkv(b=2, h=3, tq=13, tk=11, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, tq, d, generator=g), torch.randn(b, h, tk, d, generator=g),
            torch.randn(b, h, tk, d + 2, generator=g))


@pytest.mark.parametrize("q_block", BLOCKS)
@pytest.mark.parametrize("kv_block", BLOCKS)
def test_blocked_attention_full_bias(q_block, kv_block):
    q, k, v = _qkv()
    bias = torch.randn(1, 3, 13, 11, generator=torch.Generator().manual_seed(5))
    out = ops.blocked_attention(q, k, v, bias, None, -math.inf, 0.3, q_block, kv_block)
    assert rel_l2(out, reference_attention(q, k, v, bias, scale=0.3)) <= 1e-5


@pytest.mark.parametrize("kv_block", [1, 4, 0])
def test_blocked_attention_soft_cap(kv_block):
    """Gemma 2's cap * tanh(scores / cap) after the scale, before the mask: in one softmax and online."""
    q, k, v = (t * 4 for t in _qkv())  # scores large enough that the cap bends them
    causal = torch.ones(13, 11, dtype=torch.bool).triu(1)
    ref = reference_attention(q, k, v, None, causal, scale=0.5, softcap=5.0)
    out = ops.blocked_attention(q, k, v, None, causal, -math.inf, 0.5, 4, kv_block, 5.0)
    assert rel_l2(out, ref) <= 1e-5
    assert rel_l2(out, reference_attention(q, k, v, None, causal, scale=0.5)) > 1e-2  # the cap matters here


@pytest.mark.parametrize("kv_block", [1, 4, 0])
def test_blocked_attention_broadcast_bias_and_mask(kv_block):
    q, k, v = _qkv()
    alibi = torch.arange(11.0).view(1, 1, 1, 11) * torch.tensor([0.5, 0.25, 0.125]).view(1, 3, 1, 1)
    causal = torch.ones(13, 11, dtype=torch.bool).triu(1)
    ref = reference_attention(q, k, v, alibi, causal)
    out = ops.blocked_attention(q, k, v, alibi, causal, -math.inf, 1.0, 5, kv_block)
    assert rel_l2(out, ref) <= 1e-5


def test_blocked_attention_finite_mask_value_and_fully_masked_rows():
    q, k, v = _qkv(tq=6, tk=9)
    mask = torch.zeros(2, 1, 6, 9, dtype=torch.bool)
    mask[0, :, 2] = True  # a fully masked row: finfo.min gives a uniform row, like eager
    fill = torch.finfo(torch.float32).min
    ref = reference_attention(q, k, v, None, mask, fill)
    for kv_block in (2, 0):
        out = ops.blocked_attention(q, k, v, None, mask, fill, 1.0, 4, kv_block)
        assert rel_l2(out, ref) <= 1e-5
    # with -inf a fully masked row is NaN, in both
    ref_inf = reference_attention(q, k, v, None, mask, -math.inf)
    out_inf = ops.blocked_attention(q, k, v, None, mask, -math.inf, 1.0, 4, 2)
    assert torch.isnan(ref_inf[0, :, 2]).all() and torch.isnan(out_inf[0, :, 2]).all()
    keep = ~torch.isnan(ref_inf)
    assert rel_l2(out_inf[keep], ref_inf[keep]) <= 1e-5


def test_blocked_attention_broadcasts_batch_of_bias():
    q, k, v = _qkv(b=1)
    bias = torch.randn(4, 1, 13, 11)
    out = ops.blocked_attention(q, k, v, bias, None, -math.inf, 1.0, 4, 3)
    assert out.shape == (4, 3, 13, 10)
    assert rel_l2(out, reference_attention(q, k, v, bias)) <= 1e-5


def test_blocked_attention_low_precision():
    q, k, v = (t.bfloat16() for t in _qkv(tq=40, tk=40))
    ref = reference_attention(q.float(), k.float(), v.float())
    out = ops.blocked_attention(q, k, v, None, None, -math.inf, 1.0, 7, 9)
    assert out.dtype == torch.bfloat16
    assert rel_l2(out, ref) <= 1e-2


# ---------------------------------------------------------------- FFN

@pytest.mark.parametrize("chunk", BLOCKS)
@pytest.mark.parametrize("gated", [False, True])
def test_chunked_ffn_matches(chunk, gated):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 13, 8, generator=g)
    w_in, b_in = torch.randn(32, 8, generator=g), torch.randn(32, generator=g)
    w_gate = torch.randn(32, 8, generator=g) if gated else None
    w_out, b_out = torch.randn(8, 32, generator=g), torch.randn(8, generator=g)
    for name, act in ACTIVATIONS.items():
        h = F.linear(x, w_in, b_in)
        h = act.torch_fn(F.linear(x, w_gate)) * h if gated else act.torch_fn(h)
        ref = F.linear(h, w_out, b_out)
        out = ops.chunked_ffn(x, w_in, b_in, w_gate, None, w_out, b_out, name, chunk)
        assert rel_l2(out, ref) <= 1e-5, name


def test_chunked_ffn_rejects_unknown_activation():
    x, w = torch.randn(2, 4), torch.randn(4, 4)
    with pytest.raises(ValueError, match="unknown activation"):
        ops.chunked_ffn(x, w, None, None, None, w, None, "swish2", 1)


# ---------------------------------------------------------------- LM head

@pytest.mark.parametrize("chunk", BLOCKS)
@pytest.mark.parametrize("normalize", ["none", "log_softmax", "softmax"])
def test_chunked_lm_head_matches(chunk, normalize):
    g = torch.Generator().manual_seed(4)
    hidden, w, b = torch.randn(2, 13, 8, generator=g), torch.randn(50, 8, generator=g), torch.randn(50, generator=g)
    logits = F.linear(hidden, w, b)
    norm = {"none": lambda t: t, "log_softmax": lambda t: t.log_softmax(-1), "softmax": lambda t: t.softmax(-1)}
    full = norm[normalize](logits)
    labels = torch.randint(0, 50, (2, 13, 2), generator=g)
    assert rel_l2(ops.chunked_lm_head_gather(hidden, w, b, labels, normalize, False, chunk),
                  full.gather(-1, labels)) <= 1e-5
    assert torch.equal(ops.chunked_lm_head_argmax(hidden, w, b, normalize, False, chunk), full.argmax(-1))
    values, indices = ops.chunked_lm_head_topk(hidden, w, None, 3, True, normalize, False, chunk)
    ref_v, ref_i = norm[normalize](F.linear(hidden, w)).topk(3, -1)
    assert rel_l2(values, ref_v) <= 1e-5 and torch.equal(indices, ref_i)


def test_chunked_lm_head_upcast():
    hidden, w = torch.randn(5, 8).bfloat16(), torch.randn(30, 8).bfloat16()
    labels = torch.randint(0, 30, (5, 1))
    out = ops.chunked_lm_head_gather(hidden, w, None, labels, "log_softmax", True, 2)
    assert out.dtype == torch.float32
    ref = F.linear(hidden, w).float().log_softmax(-1).gather(-1, labels)
    assert rel_l2(out, ref) <= 1e-5


# ---------------------------------------------------------------- schema / fake kernels

def test_opcheck_every_operator():
    q, k, v = _qkv(b=1, h=2, tq=5, tk=6, d=4)
    x, w = torch.randn(3, 5, 8), torch.randn(6, 8)
    cases = [
        (ops.blocked_matmul.default, (torch.randn(5, 7), torch.randn(7, 3), 2, 2, 3)),
        (ops.blocked_linear.default, (x, w, torch.randn(6), 2, 4, 3)),
        (ops.blocked_attention.default, (q, k, v, torch.randn(1, 2, 5, 6), None, -math.inf, 0.5, 2, 4)),
        (ops.blocked_attention.default, (q, k, v, None, torch.rand(5, 6) > 0.5, -1e9, 1.0, 3, 0)),
        (ops.blocked_attention.default, (q, k, v, None, None, -math.inf, 0.5, 2, 3, 30.0)),
        (ops.chunked_ffn.default, (x, torch.randn(16, 8), None, torch.randn(16, 8), None, torch.randn(8, 16), None,
                                   "silu", 4)),
        (ops.chunked_lm_head_gather.default, (x, w, None, torch.randint(0, 6, (3, 5, 1)), "log_softmax", False, 2)),
        (ops.chunked_lm_head_argmax.default, (x, w, None, "none", False, 2)),
        (ops.chunked_lm_head_topk.default, (x, w, None, 2, True, "softmax", False, 4)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
