"""Small attention modules, one per form the attention analysis recognises, and helpers.

Each module takes ``(q, k, v)`` (plus a mask where the form has one) shaped
(batch, heads, seq, head_dim) and computes attention the way people write it.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import graphopt
from graphopt.passes.attention import FuseAttention

aten = torch.ops.aten
B, H, T, D = 2, 4, 16, 8
SCALE = 1 / math.sqrt(D)


def qkv(b: int = B, h: int = H, t: int = T, d: int = D, kv_heads: int | None = None, seed: int = 0,
        dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    kvh = kv_heads or h
    q = torch.randn(b, h, t, d, generator=g).to(dtype)
    k = torch.randn(b, kvh, t, d, generator=g).to(dtype)
    v = torch.randn(b, kvh, t, d, generator=g).to(dtype)
    return q, k, v


def padding_mask(b: int = B, t: int = T, seed: int = 1) -> torch.Tensor:
    """(b, 1, 1, t) boolean keep-mask with some padded keys (the first key always kept)."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(b, 1, 1, t, generator=g) < 0.7
    keep[..., 0] = True
    return keep


# --- products ---------------------------------------------------------------------------------


class QKTranspose(nn.Module):
    """q @ k.transpose(-2, -1), scale as mul."""

    def forward(self, q, k, v):
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        return F.softmax(att, dim=-1) @ v


class TorchMatmulDiv(nn.Module):
    """torch.matmul, scale as div by sqrt(d), k transposed with (2, 3)."""

    def forward(self, q, k, v):
        att = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(q.shape[-1])
        return torch.matmul(att.softmax(dim=-1), v)


class BmmFlat(nn.Module):
    """bmm on (batch*heads, seq, d), output viewed back."""

    def forward(self, q, k, v):
        b, h, t, d = q.shape
        q3, k3, v3 = q.reshape(b * h, t, d), k.reshape(b * h, t, d), v.reshape(b * h, t, d)
        att = torch.bmm(q3, k3.transpose(1, 2)) * SCALE
        out = torch.bmm(torch.softmax(att, dim=-1), v3)
        return out.view(b, h, t, d)


class Baddbmm(nn.Module):
    """baddbmm(empty, q, k^T, beta=0, alpha=scale) (the GPT-2 upcast path)."""

    def forward(self, q, k, v):
        b, h, t, d = q.shape
        q3, k3, v3 = q.reshape(b * h, t, d), k.reshape(b * h, t, d), v.reshape(b * h, t, d)
        att = torch.baddbmm(torch.empty(b * h, t, t, dtype=q.dtype), q3, k3.transpose(-1, -2), beta=0, alpha=SCALE)
        return torch.bmm(att.softmax(-1), v3).view(b, h, t, d)


class BaddbmmBias(nn.Module):
    """baddbmm with beta=1: its input is an additive mask (BLOOM/ALiBi style, here from an input)."""

    def forward(self, q, k, v, bias):
        b, h, t, d = q.shape
        q3, k3, v3 = q.reshape(b * h, t, d), k.reshape(b * h, t, d), v.reshape(b * h, t, d)
        att = torch.baddbmm(bias, q3, k3.transpose(-1, -2), beta=1.0, alpha=SCALE)
        return torch.bmm(att.softmax(-1), v3).view(b, h, t, d)


class Einsum(nn.Module):
    """einsum on (b, h, t, d)."""

    def forward(self, q, k, v):
        att = torch.einsum("bhqd,bhkd->bhqk", q, k) * SCALE
        return torch.einsum("bhqk,bhkd->bhqd", att.softmax(-1), v)


class EinsumSeqFirst(nn.Module):
    """einsum on (b, t, h, d) layouts: the rewrite permutes the operands and the output."""

    def forward(self, q, k, v):
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (b, t, h, d)
        att = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
        return torch.einsum("bhqk,bkhd->bqhd", att.softmax(-1), v)


# --- scales -----------------------------------------------------------------------------------


class PrescaledQ(nn.Module):
    """q scaled before the product."""

    def forward(self, q, k, v):
        q = q * (q.size(-1) ** -0.5)
        return (q @ k.transpose(-2, -1)).softmax(-1) @ v


class PrescaledQK(nn.Module):
    """q and k each scaled by d ** -0.25."""

    def forward(self, q, k, v):
        s = q.size(-1) ** -0.25
        return ((q * s) @ (k * s).transpose(-2, -1)).softmax(-1) @ v


class SqrtTensorScale(nn.Module):
    """Divided by torch.sqrt of a tensor (a constant the analysis evaluates)."""

    def forward(self, q, k, v):
        att = q @ k.transpose(-2, -1) / torch.sqrt(torch.tensor(q.size(-1), dtype=torch.float32))
        return att.softmax(-1) @ v


# --- masks ------------------------------------------------------------------------------------


class AdditiveMask(nn.Module):
    """An additive float mask from the input (0 / large negative)."""

    def forward(self, q, k, v, mask):
        att = q @ k.transpose(-2, -1) * SCALE + mask
        return att.softmax(-1) @ v


class WhereBool(nn.Module):
    """torch.where(keep, scores, -inf) with a boolean input mask."""

    def forward(self, q, k, v, keep):
        att = q @ k.transpose(-2, -1) * SCALE
        att = torch.where(keep, att, float("-inf"))
        return att.softmax(-1) @ v


class MaskedFillBool(nn.Module):
    """scores.masked_fill(~keep, -inf) with a boolean input mask."""

    def forward(self, q, k, v, keep):
        att = (q @ k.transpose(-2, -1)).masked_fill(~keep, float("-inf")) * SCALE
        return att.softmax(-1) @ v


class MaskedFillFinite(nn.Module):
    """masked_fill with finfo.min (a finite fill: kept as an additive mask)."""

    def forward(self, q, k, v, keep):
        att = (q @ k.transpose(-2, -1) * SCALE).masked_fill(~keep, torch.finfo(q.dtype).min)
        return att.softmax(-1) @ v


class TrilBuffer(nn.Module):
    """nanoGPT: a tril buffer sliced to T, masked_fill(bias == 0, -inf): causal."""

    def __init__(self, block: int = 32) -> None:
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones(block, block)).view(1, 1, block, block))

    def forward(self, q, k, v):
        t = q.size(-2)
        att = (q @ k.transpose(-2, -1)) * SCALE
        att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
        return F.softmax(att, dim=-1) @ v


class TriuBuffer(nn.Module):
    """A boolean triu(diagonal=1) buffer marking the future: causal."""

    def __init__(self, block: int = 32) -> None:
        super().__init__()
        self.register_buffer("future", torch.triu(torch.ones(block, block, dtype=torch.bool), diagonal=1))

    def forward(self, q, k, v):
        t = q.size(-2)
        att = (q @ k.transpose(-2, -1)) * SCALE
        att = att.masked_fill(self.future[:t, :t], float("-inf"))
        return att.softmax(-1) @ v


class InlineCausal(nn.Module):
    """A causal mask built in forward from arange (Hugging Face style): folds to a constant, causal."""

    def forward(self, q, k, v):
        t = q.size(-2)
        pos = torch.arange(t)
        allowed = pos[None, :] <= pos[:, None]
        bias = torch.where(allowed, 0.0, torch.finfo(q.dtype).min)[None, None]
        att = q @ k.transpose(-2, -1) * SCALE + bias
        return att.softmax(-1) @ v


class BandMask(nn.Module):
    """A constant sliding-window mask: not causal, passed as attn_mask."""

    def __init__(self, window: int = 4) -> None:
        super().__init__()
        self.window = window

    def forward(self, q, k, v):
        t = q.size(-2)
        pos = torch.arange(t)
        keep = (pos[None, :] <= pos[:, None]) & (pos[:, None] - pos[None, :] < self.window)
        att = (q @ k.transpose(-2, -1) * SCALE).masked_fill(~keep, float("-inf"))
        return att.softmax(-1) @ v


# --- casts, dropout, GQA -----------------------------------------------------------------------


class Float32Softmax(nn.Module):
    """Softmax in float32, then cast back to the inputs' dtype (Llama style)."""

    def forward(self, q, k, v):
        att = q @ k.transpose(-2, -1) * SCALE
        return F.softmax(att, dim=-1, dtype=torch.float32).to(q.dtype) @ v


class UpcastScores(nn.Module):
    """Scores upcast with .float() before the softmax, cast back after."""

    def forward(self, q, k, v):
        att = (q @ k.transpose(-2, -1) * SCALE).float()
        return att.softmax(-1).type_as(v) @ v


class EvalDropout(nn.Module):
    """nn.Dropout on the attention weights (inactive in eval mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.1)

    def forward(self, q, k, v):
        return self.drop((q @ k.transpose(-2, -1) * SCALE).softmax(-1)) @ v


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """transformers' repeat_kv: (b, kv, s, d) -> (b, kv * n_rep, s, d)."""
    b, kv, s, d = x.shape
    return x[:, :, None, :, :].expand(b, kv, n_rep, s, d).reshape(b, kv * n_rep, s, d)


class RepeatKV(nn.Module):
    """Grouped-query attention with repeat_kv (expand + reshape)."""

    def forward(self, q, k, v):
        n_rep = q.size(1) // k.size(1)
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        return (q @ k.transpose(2, 3) * SCALE).softmax(-1) @ v


class RepeatInterleave(nn.Module):
    """Grouped-query attention with torch.repeat_interleave over the heads."""

    def forward(self, q, k, v):
        n_rep = q.size(1) // k.size(1)
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
        return (q @ k.transpose(2, 3) * SCALE).softmax(-1) @ v


# --- near misses -----------------------------------------------------------------------------


class SoftmaxOverQueries(nn.Module):
    def forward(self, q, k, v):
        return (q @ k.transpose(-2, -1) * SCALE).softmax(dim=2) @ v


class ReturnsWeights(nn.Module):
    """output_attentions: the weights are returned too."""

    def forward(self, q, k, v):
        p = (q @ k.transpose(-2, -1) * SCALE).softmax(-1)
        return p @ v, p


class LearnedBias(nn.Module):
    """A learned relative-position bias added to the scores."""

    def __init__(self) -> None:
        super().__init__()
        self.rel = nn.Parameter(torch.randn(H, T, T) * 0.1)

    def forward(self, q, k, v):
        return (q @ k.transpose(-2, -1) * SCALE + self.rel).softmax(-1) @ v


class LearnedBiasPadded(LearnedBias):
    """A learned bias plus a padding mask (T5's encoder): one float attn_mask."""

    def forward(self, q, k, v, keep):
        att = (q @ k.transpose(-2, -1) * SCALE + self.rel).masked_fill(~keep, float("-inf"))
        return att.softmax(-1) @ v


class LearnedBiasCausal(LearnedBias):
    """A learned bias plus a causal tril buffer: the causal part goes into the same float mask."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("tril", torch.ones(T, T).tril())

    def forward(self, q, k, v):
        att = (q @ k.transpose(-2, -1) + self.rel) * SCALE
        return att.masked_fill(self.tril == 0, float("-inf")).softmax(-1) @ v


class LearnedTemperature(nn.Module):
    """Scores multiplied by a learned per-head temperature."""

    def __init__(self) -> None:
        super().__init__()
        self.temperature = nn.Parameter(torch.rand(H, 1, 1) + 0.5)

    def forward(self, q, k, v):
        return ((q @ k.transpose(-2, -1)) * self.temperature).softmax(-1) @ v


class ActiveDropout(nn.Module):
    """Dropout that stays on in eval mode (training=True written out)."""

    def forward(self, q, k, v):
        p = F.dropout((q @ k.transpose(-2, -1) * SCALE).softmax(-1), p=0.5, training=True)
        return p @ v


class Classifier(nn.Module):
    """A softmax over logits of a linear layer: not attention."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(D, 10)

    def forward(self, q, k, v):
        return self.fc(q).softmax(-1)


# --- helpers ----------------------------------------------------------------------------------


def fuse(model: nn.Module, args: tuple, **options) -> graphopt.OptimizeResult:
    """graphopt.optimize with only the attention pass (numerics verified)."""
    return graphopt.optimize(model, args, passes=[FuseAttention()], **options)


def sdpa_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    sdpa = aten.scaled_dot_product_attention.default
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == sdpa]


def softmax_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function"
            and n.target in (aten.softmax.int, aten._softmax.default, aten._safe_softmax.default)]


def rel_l2(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.detach().double(), out.detach().double()
    return float((ref - out).norm() / ref.norm())


class SubtractedPenalty(nn.Module):
    """Old-style mask: scores - 10000 * (1 - keep), keep a 0/1 float input."""

    def forward(self, q, k, v, keep):
        att = q @ k.transpose(-2, -1) * SCALE - 10000.0 * (1.0 - keep)
        return att.softmax(-1) @ v
