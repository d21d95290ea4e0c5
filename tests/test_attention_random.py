"""Differential test: random attention variants must fuse and stay numerically equal.

A hypothesis strategy draws an attention written one of many ways (product
form x scale x mask x float32 softmax x eval dropout x GQA x shapes); the
attention pass must find exactly one rewritable site, fuse it, and the fused
module must match the model on fresh inputs (relative L2 <= 1e-5).

tests/test_differential.py runs the default pipeline (fuse_attention
included) on random models whose attention is matmul-form with mul/div/
pre-scaled-q scales and buffer/tril/where/padding masks; this test adds the
forms that generator does not draw (bmm, baddbmm, einsum, OPT-style reshapes,
masked_fill of an input mask, HF-style inline masks, band masks, float32
softmax, repeat_kv) and checks the analysis (causality, GQA, scale) as well.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import attention_cases as C
import graphopt
from graphopt.passes.analysis.sites import find_attention_sites

FORMS = ["matmul", "bmm", "baddbmm", "einsum"]
SCALES = ["mul", "div", "prescale_q", "prescale_qk", "none"]
MASKS = ["none", "additive", "where_bool", "masked_fill_bool", "tril_buffer", "triu_buffer", "inline_causal",
         "band", "causal_and_padding"]
INPUT_MASKS = {"additive", "where_bool", "masked_fill_bool", "causal_and_padding"}


@dataclass(frozen=True)
class Spec:
    form: str
    scale: str
    mask: str
    fp32_softmax: bool
    dropout: bool
    batch: int
    heads: int
    kv_heads: int
    repeat: str
    seq: int
    head_dim: int


@st.composite
def specs(draw) -> Spec:
    heads = draw(st.sampled_from([1, 2, 4]))
    kv_heads = draw(st.sampled_from([h for h in (1, 2, 4) if heads % h == 0]))
    return Spec(
        form=draw(st.sampled_from(FORMS)), scale=draw(st.sampled_from(SCALES)), mask=draw(st.sampled_from(MASKS)),
        fp32_softmax=draw(st.booleans()), dropout=draw(st.booleans()), batch=draw(st.sampled_from([1, 2])),
        heads=heads, kv_heads=kv_heads, repeat=draw(st.sampled_from(["repeat_kv", "repeat_interleave"])),
        seq=draw(st.sampled_from([1, 3, 8])), head_dim=draw(st.sampled_from([4, 8])),
    )


class RandomAttention(nn.Module):
    """Attention written the way ``spec`` says."""

    def __init__(self, spec: Spec) -> None:
        super().__init__()
        self.spec = spec
        self.drop = nn.Dropout(0.2)
        block = 16
        self.register_buffer("tril", torch.tril(torch.ones(block, block)).view(1, 1, block, block))
        self.register_buffer("future", torch.triu(torch.ones(block, block, dtype=torch.bool), diagonal=1))

    def forward(self, q, k, v, mask=None):
        s = self.spec
        b, h, t, d = q.shape
        scale = 1 / math.sqrt(d)
        if s.kv_heads != s.heads:
            n_rep = s.heads // s.kv_heads
            if s.repeat == "repeat_kv":
                k, v = C.repeat_kv(k, n_rep), C.repeat_kv(v, n_rep)
            else:
                k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
        if s.scale == "prescale_q":
            q = q * scale
        elif s.scale == "prescale_qk":
            q, k = q * scale ** 0.5, k * scale ** 0.5
        # Q @ K^T
        if s.form == "matmul":
            att = q @ k.transpose(-2, -1)
        elif s.form == "einsum":
            att = torch.einsum("bhqd,bhkd->bhqk", q, k)
        else:
            q3, k3 = q.reshape(b * h, t, d), k.reshape(b * h, t, d)
            if s.form == "bmm":
                att = torch.bmm(q3, k3.transpose(1, 2))
            else:
                att = torch.baddbmm(torch.empty(b * h, t, t, dtype=q.dtype), q3, k3.transpose(1, 2), beta=0.0,
                                    alpha=1.0)
            att = att.view(b, h, t, t)  # masks apply on (b, h, t, t), as OPT does
        if s.scale == "mul":
            att = att * scale
        elif s.scale == "div":
            att = att / math.sqrt(d)
        att = self._mask(att, mask, t)
        if s.form in ("bmm", "baddbmm"):
            att = att.reshape(b * h, t, t)
        p = F.softmax(att, dim=-1, dtype=torch.float32).to(q.dtype) if s.fp32_softmax else att.softmax(-1)
        if s.dropout:
            p = self.drop(p)
        if s.form == "matmul":
            return p @ v
        if s.form == "einsum":
            return torch.einsum("bhqk,bhkd->bhqd", p, v)
        return torch.bmm(p, v.reshape(b * h, t, d)).view(b, h, t, d)

    def _mask(self, att, mask, t):
        kind = self.spec.mask
        if kind == "additive":
            return att + mask
        if kind == "where_bool":
            return torch.where(mask, att, float("-inf"))
        if kind == "masked_fill_bool":
            return att.masked_fill(~mask, float("-inf"))
        if kind == "tril_buffer":
            return att.masked_fill(self.tril[:, :, :t, :t] == 0, float("-inf"))
        if kind == "triu_buffer":
            return att.masked_fill(self.future[:t, :t], float("-inf"))
        if kind == "inline_causal":
            pos = torch.arange(t)
            return att + torch.where(pos[None, :] <= pos[:, None], 0.0, torch.finfo(att.dtype).min)
        if kind == "band":
            pos = torch.arange(t)
            keep = (pos[None, :] <= pos[:, None]) & (pos[:, None] - pos[None, :] < 2)
            return att.masked_fill(~keep, float("-inf"))
        if kind == "causal_and_padding":
            att = att.masked_fill(self.future[:t, :t], float("-inf"))
            return att + mask
        return att


def _inputs(spec: Spec, seed: int) -> tuple[torch.Tensor, ...]:
    q, k, v = C.qkv(spec.batch, spec.heads, spec.seq, spec.head_dim, spec.kv_heads, seed=seed)
    if spec.mask not in INPUT_MASKS:
        return q, k, v
    keep = C.padding_mask(spec.batch, spec.seq, seed=seed + 100)
    if spec.mask in ("where_bool", "masked_fill_bool"):
        return q, k, v, keep
    return q, k, v, torch.zeros(keep.shape).masked_fill(~keep, -1e9)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs())
def test_random_attention_variants_fuse_and_match(spec: Spec) -> None:
    model = RandomAttention(spec).eval()
    args = _inputs(spec, 0)
    (site,) = find_attention_sites(graphopt.capture(model, args).module)
    assert site.ok, (spec, site.declined)
    expected_causal = spec.mask in ("tril_buffer", "triu_buffer", "inline_causal") and spec.seq > 1
    assert site.is_causal == expected_causal, spec
    assert site.gqa == (spec.kv_heads != spec.heads) and site.num_kv_heads == spec.kv_heads, spec
    assert site.scale == pytest.approx(1 / math.sqrt(spec.head_dim) if spec.scale != "none" else 1.0), spec
    result = C.fuse(model, args)
    record = result.report.record("fuse_attention")
    assert record.status == "applied", (spec, record.status, record.error, record.declined)
    assert len(C.sdpa_nodes(result.module)) == 1 and C.softmax_nodes(result.module) == []
    fresh = _inputs(spec, 1)
    with torch.no_grad():
        assert C.rel_l2(model(*fresh), result.module(*fresh)) <= 1e-5, spec
