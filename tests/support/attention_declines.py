"""One minimal model per reason fuse_attention declines a softmax (docs/attention.md, *Near misses*).

``CASES``: (name, model, example arguments, options, the reason's words). The
reason is what ``sdpa_decline`` returns and the report lists; each names the
construct in the model (a mask, a bias, a soft-cap, a projection, the softmax
dim, dropout in training, ...).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.support import attention_cases as C

SCALE = C.SCALE


def _scores(q, k):
    return q @ k.transpose(-2, -1) * SCALE


class VectorSoftmax(nn.Module):
    def forward(self, q, k, v):
        return q.flatten().softmax(0)


class WeightsSummed(nn.Module):
    def forward(self, q, k, v):
        return _scores(q, k).softmax(-1).sum(-1)


class ScoresReturned(nn.Module):
    def forward(self, q, k, v):
        s = _scores(q, k)
        return s.softmax(-1) @ v, s


class ScoreDropout(nn.Module):
    def forward(self, q, k, v):
        return F.dropout(_scores(q, k), p=0.5, training=True).softmax(-1) @ v


class NotAProduct(nn.Module):
    def forward(self, q, k, v):
        return (q + k).softmax(-1) @ v.transpose(-2, -1)


class SoftCap(nn.Module):
    """Gemma 2: scores = cap * tanh(scores / cap), then the mask."""

    def __init__(self, cap: float = 50.0) -> None:
        super().__init__()
        self.cap = cap
        self.register_buffer("tril", torch.ones(C.T, C.T).tril())

    def forward(self, q, k, v):
        s = torch.tanh(_scores(q, k) / self.cap) * self.cap
        return s.masked_fill(self.tril == 0, float("-inf")).softmax(-1) @ v


class OtherOp(nn.Module):
    def forward(self, q, k, v):
        return _scores(q, k).abs().softmax(-1) @ v


class TwoScoreMatrices(nn.Module):
    def forward(self, q, k, v):
        return (_scores(q, k) + _scores(k, q)).softmax(-1) @ v


class NumberAdded(nn.Module):
    def forward(self, q, k, v):
        return torch.add(_scores(q, k), 1.0).softmax(-1) @ v


class FilledWithATensor(nn.Module):
    def forward(self, q, k, v, keep):
        return torch.where(keep, _scores(q, k), q[..., :1]).softmax(-1) @ v


class IntegerBias(nn.Module):
    def forward(self, q, k, v, positions):
        return (_scores(q, k) + positions).softmax(-1) @ v


class BroadcastKeys(nn.Module):
    def forward(self, q, k, v):
        return _scores(q, k[:1]).softmax(-1) @ v[:1]


class MixedDtypes(nn.Module):
    def forward(self, q, k, v):
        return _scores(q, k).softmax(-1).double() @ v.double()


class Case(NamedTuple):
    name: str
    model: Callable[[], nn.Module]
    args: Callable[[], tuple]
    options: dict[str, Any]
    reason: str


def _qkv() -> tuple:
    return C.qkv()


CASES = [
    Case("softmax dim", C.SoftmaxOverQueries, _qkv, {}, "softmax over dim 2, not the key dim"),
    Case("vector", VectorSoftmax, _qkv, {}, "softmax over a vector, not a score matrix"),
    Case("weights returned", C.ReturnsWeights, _qkv, {}, "the attention probabilities are used elsewhere"),
    Case("weights reduced", WeightsSummed, _qkv, {}, "the attention weights feed aten.sum"),
    Case("scores returned", ScoresReturned, _qkv, {}, "are also used by"),
    Case("learned temperature", C.LearnedTemperature, _qkv, {}, "the scores are multiplied by a tensor"),
    Case("score dropout", ScoreDropout, _qkv, {}, "dropout on the scores is active (training mode)"),
    Case("weight dropout", C.ActiveDropout, _qkv, {}, "dropout on the attention weights is active (training mode)"),
    Case("projection", C.Classifier, _qkv, {}, "(a learned projection, not Q @ K^T)"),
    Case("no product", NotAProduct, _qkv, {}, "the softmax input is not computed from a product of two activations"),
    Case("soft-cap", SoftCap, _qkv, {}, "tanh soft-cap (cap 50.0): SDPA cannot apply it"),
    Case("other op", OtherOp, _qkv, {}, "between Q @ K^T and the softmax is not a scale or a mask"),
    Case("two score matrices", TwoScoreMatrices, _qkv, {}, "adds two score matrices"),
    Case("number added", NumberAdded, _qkv, {}, "adds a number to the scores"),
    Case("tensor fill", FilledWithATensor, lambda: C.qkv() + (C.padding_mask(),), {},
         "selects between the scores and a tensor that is not a constant"),
    Case("integer bias", IntegerBias, lambda: C.qkv() + (torch.arange(C.T).repeat(C.T, 1),), {},
         "adds a non-floating tensor to the scores"),
    Case("learned bias, blocked pass", C.LearnedBias, _qkv, {"block_q": 8},
         "scores biased by a learned tensor: left for blocked attention"),
    Case("broadcast", BroadcastKeys, _qkv, {}, "query, key and value batch shapes differ"),
    Case("dtypes", MixedDtypes, _qkv, {}, "query, key, value and output dtypes differ"),
]
