"""Random small models for differential testing, as hypothesis strategies.

:func:`model_recipes` draws a :class:`Recipe`: an input kind (float sequence,
token ids, image; optionally a 0/1 padding mask passed as a keyword) and a
chain of steps that keep track of the running shape. :func:`build_model`
turns a recipe into an ``nn.Module`` in eval mode with its example inputs;
:func:`make_inputs` draws fresh inputs of the same kind.

Steps cover what graphopt's passes rewrite:

* linear (with/without bias, residual), matmul with a weight (``x @ W``,
  ``x @ W.t()``), a Gram-style activation matmul;
* attention written by hand: ``softmax(q @ k^T * scale [+ mask]) @ v`` with
  fused or separate q/k/v projections, one or several heads, grouped-query
  heads (``repeat_interleave``), the scale as a multiply, a divide or folded
  into q; masks: none, causal from a ``tril`` buffer + ``masked_fill``,
  causal built in forward (``torch.tril(torch.ones(...))``, constant-foldable),
  boolean ``torch.where``, additive padding mask from the input, padding +
  causal; attention dropout; and ``F.scaled_dot_product_attention``;
* elementwise ops, no-op arithmetic (``x * 1 + 0``);
* LayerNorm, hand-written RMSNorm, BatchNorm (eval, random statistics);
* reshapes/permutes/views/casts that undo themselves, and ones that do not;
* Conv1d / Conv2d (plain, depthwise, without bias) with optional BatchNorm
  (fold_conv_bn), Linear + BatchNorm1d, pooling;
* dropout (eval), duplicated subexpressions (cse), constant subgraphs
  (constant_folding); tuple and dict outputs.

Models are tiny (sizes <= 16, <= 5 steps) so hundreds run in CI on two cores.

To run *your* pass on these models::

    from tests.support.strategies import run_differential
    run_differential(lambda: [MyPass()], max_examples=100)

(``tests`` is a package: import these as ``tests.support.strategies``.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import graphopt
from graphopt.pass_infra import Pass
from tests.support.helpers import FP32_REL_L2, aliasing, assert_as_accurate_as_model, call


# --------------------------------------------------------------------------- recipes


@dataclass(frozen=True)
class Step:
    kind: str
    params: tuple[tuple[str, Any], ...] = ()

    def get(self, key: str, default: Any = None) -> Any:
        return dict(self.params).get(key, default)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params)
        return f"{self.kind}({args})"


@dataclass(frozen=True)
class Recipe:
    """What :func:`build_model` builds: inputs, steps, output structure, weight seed."""

    input_kind: str  # "seq", "tokens", "image"
    shape: tuple[int, ...]  # (B, S, D) / (B, S) + vocab in params / (B, C, H, W)
    steps: tuple[Step, ...]
    with_mask: bool = False
    output: str = "tensor"  # "tensor", "tuple", "dict"
    vocab: int = 0
    seed: int = 0

    def __repr__(self) -> str:
        steps = "\n    ".join(repr(s) for s in self.steps)
        return (f"Recipe({self.input_kind} {self.shape}, mask={self.with_mask}, out={self.output}, "
                f"seed={self.seed}):\n    {steps}")


def _step(kind: str, **params: Any) -> Step:
    return Step(kind, tuple(params.items()))


ELEMENTWISE = ("relu", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid", "swish", "add_const", "mul_const",
               "neutral", "leaky_relu", "abs_neg_exp")
ATTN_MASKS = ("none", "causal_buffer", "causal_tril", "causal_where", "padding", "padding_causal")
ATTN_SCALES = ("mul", "div", "prescale_q", "sdpa")
RESHAPES = ("heads_roundtrip", "transpose_roundtrip", "permute_roundtrip", "flatten_unflatten", "view_same",
            "contiguous", "to_same", "clone", "detach", "slice_full", "split_last")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def _seq_step(draw: st.DrawFn, state: list[int], with_mask: bool) -> Step:
    """One step on a (B, S, D) activation; updates ``state`` [S, D] in place."""
    s, d = state
    kind = draw(st.sampled_from(["linear", "matmul_weight", "attention", "attention", "elementwise", "norm",
                                 "reshape", "conv1d", "linear_bn", "dropout", "duplicate", "const_branch",
                                 "gram"]))
    if kind == "linear":
        d_out = draw(st.sampled_from([4, 8, 12, 16]))
        residual = d_out == d and draw(st.booleans())
        state[1] = d_out
        return _step("linear", d_in=d, d_out=d_out, bias=draw(st.booleans()), residual=residual)
    if kind == "matmul_weight":
        d_out = draw(st.sampled_from([4, 8, d]))
        state[1] = d_out
        return _step("matmul_weight", d_in=d, d_out=d_out, transposed=draw(st.booleans()))
    if kind == "attention":
        heads = draw(st.sampled_from([h for h in _divisors(d) if h <= 4]))
        kv_heads = draw(st.sampled_from([k for k in _divisors(heads)]))
        masks = [m for m in ATTN_MASKS if with_mask or "padding" not in m]
        return _step("attention", d=d, heads=heads, kv_heads=kv_heads, mask=draw(st.sampled_from(masks)),
                     scale=draw(st.sampled_from(ATTN_SCALES)), fused_qkv=draw(st.booleans()) and kv_heads == heads,
                     dropout=draw(st.sampled_from([0.0, 0.1])), out_proj=draw(st.booleans()),
                     residual=draw(st.booleans()))
    if kind == "elementwise":
        return _step("elementwise", op=draw(st.sampled_from(ELEMENTWISE)))
    if kind == "norm":
        return _step("norm", d=d, norm=draw(st.sampled_from(["layernorm", "layernorm_no_affine", "rmsnorm",
                                                              "batchnorm"])))
    if kind == "reshape":
        options = [r for r in RESHAPES if r != "split_last" or d % 2 == 0]
        op = draw(st.sampled_from(options))
        heads = draw(st.sampled_from(_divisors(d)))
        if op == "split_last":
            state[0], state[1] = s * 2, d // 2
        return _step("reshape", op=op, s=s, d=d, heads=heads)
    if kind == "conv1d":
        d_out = draw(st.sampled_from([4, 8, d]))
        k = draw(st.sampled_from([1, 3]))
        state[1] = d_out
        return _step("conv1d", d_in=d, d_out=d_out, k=k, bias=draw(st.booleans()), bn=draw(st.booleans()),
                     depthwise=d_out == d and draw(st.booleans()))
    if kind == "linear_bn":
        d_out = draw(st.sampled_from([4, 8, d]))
        state[1] = d_out
        return _step("linear_bn", d_in=d, d_out=d_out, bias=draw(st.booleans()))
    if kind == "dropout":
        return _step("dropout", p=draw(st.sampled_from([0.0, 0.1, 0.5])))
    if kind == "duplicate":
        return _step("duplicate", d=d, op=draw(st.sampled_from(["linear", "relu", "softmax", "norm"])))
    if kind == "const_branch":
        return _step("const_branch", d=d, op=draw(st.sampled_from(["scaled_weight_sum", "arange_ramp", "ones_like"])))
    return _step("gram", d=d)


@st.composite
def _image_step(draw: st.DrawFn, state: list[int]) -> Step:
    """One step on a (B, C, H, W) activation; updates ``state`` [C, H, W] in place."""
    c, h, w = state
    kinds = ["conv2d", "conv2d", "elementwise", "batchnorm2d", "dropout"] + (["pool"] if min(h, w) >= 2 else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "conv2d":
        c_out = draw(st.sampled_from([2, 4, c]))
        k = draw(st.sampled_from([1, 3]))
        state[0] = c_out
        return _step("conv2d", c_in=c, c_out=c_out, k=k, bias=draw(st.booleans()), bn=draw(st.booleans()),
                     depthwise=c_out == c and c > 1 and draw(st.booleans()), relu=draw(st.booleans()))
    if kind == "pool":
        state[1], state[2] = h // 2, w // 2
        return _step("pool", op=draw(st.sampled_from(["max", "avg"])))
    if kind == "batchnorm2d":
        return _step("batchnorm2d", c=c)
    if kind == "dropout":
        return _step("dropout", p=draw(st.sampled_from([0.0, 0.2])))
    return _step("elementwise", op=draw(st.sampled_from(ELEMENTWISE)))


@st.composite
def model_recipes(draw: st.DrawFn, max_steps: int = 5) -> Recipe:
    """A hypothesis strategy of :class:`Recipe` (tiny models; see the module docstring)."""
    input_kind = draw(st.sampled_from(["seq", "seq", "tokens", "image"]))
    batch = draw(st.integers(1, 2))
    steps: list[Step] = []
    with_mask = False
    vocab = 0
    n_steps = draw(st.integers(1, max_steps))
    if input_kind == "image":
        c, h, w = draw(st.integers(1, 4)), draw(st.integers(2, 6)), draw(st.integers(2, 6))
        shape: tuple[int, ...] = (batch, c, h, w)
        img = [c, h, w]
        n_image = draw(st.integers(1, n_steps))
        for _ in range(n_image):
            steps.append(draw(_image_step(img)))
        steps.append(_step("to_seq"))
        seq = [img[1] * img[2], img[0]]
        n_steps -= n_image
    else:
        s, d = draw(st.integers(1, 6)), draw(st.sampled_from([4, 6, 8, 12, 16]))
        with_mask = draw(st.booleans())
        if input_kind == "tokens":
            vocab = draw(st.sampled_from([11, 32]))
            steps.append(_step("embedding", vocab=vocab, d=d))
            shape = (batch, s)
        else:
            shape = (batch, s, d)
        seq = [s, d]
    for _ in range(n_steps):
        steps.append(draw(_seq_step(seq, with_mask)))
    output = draw(st.sampled_from(["tensor", "tensor", "tuple", "dict"]))
    return Recipe(input_kind, shape, tuple(steps), with_mask, output, vocab, draw(st.integers(0, 2**16)))


# --------------------------------------------------------------------------- modules


class Embedding(nn.Module):
    def __init__(self, vocab: int, d: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)

    def forward(self, x, mask):
        return self.emb(x)


class Linear(nn.Module):
    def __init__(self, d_in: int, d_out: int, bias: bool, residual: bool) -> None:
        super().__init__()
        self.proj, self.residual = nn.Linear(d_in, d_out, bias=bias), residual

    def forward(self, x, mask):
        y = self.proj(x)
        return x + y if self.residual else y


class MatmulWeight(nn.Module):
    def __init__(self, d_in: int, d_out: int, transposed: bool) -> None:
        super().__init__()
        self.transposed = transposed
        shape = (d_out, d_in) if transposed else (d_in, d_out)
        self.w = nn.Parameter(torch.randn(shape) / math.sqrt(d_in))

    def forward(self, x, mask):
        return x @ self.w.t() if self.transposed else torch.matmul(x, self.w)


class Attention(nn.Module):
    """Hand-written multi-head / grouped-query attention in the usual variants."""

    def __init__(self, d: int, heads: int, kv_heads: int, mask: str, scale: str, fused_qkv: bool, dropout: float,
                 out_proj: bool, residual: bool) -> None:
        super().__init__()
        self.d, self.heads, self.kv_heads, self.hd = d, heads, kv_heads, d // heads
        self.mask_kind, self.scale_kind, self.fused, self.residual = mask, scale, fused_qkv, residual
        kv_d = kv_heads * self.hd
        if fused_qkv:
            self.qkv = nn.Linear(d, 3 * d)
        else:
            self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, kv_d, bias=False), nn.Linear(d, kv_d)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(d, d) if out_proj else nn.Identity()
        self.register_buffer("causal", torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64))

    def forward(self, x, mask):
        b, s, _ = x.shape
        if self.fused:
            q, k, v = self.qkv(x).split(self.d, dim=2)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        q = q.view(b, s, self.heads, self.hd).transpose(1, 2)
        k = k.view(b, s, self.kv_heads, self.hd).transpose(1, 2)
        v = v.view(b, s, self.kv_heads, self.hd).transpose(1, 2)
        if self.kv_heads != self.heads:
            rep = self.heads // self.kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scale = 1.0 / math.sqrt(self.hd)
        if self.scale_kind == "sdpa":
            y = self._sdpa(q, k, v, mask, s)
        else:
            if self.scale_kind == "prescale_q":
                att = (q * scale) @ k.transpose(-2, -1)
            elif self.scale_kind == "div":
                att = q @ k.transpose(-2, -1) / math.sqrt(self.hd)
            else:
                att = torch.matmul(q, k.transpose(-2, -1)) * scale
            att = self._mask(att, mask, s)
            att = self.drop(F.softmax(att, dim=-1))
            y = att @ v
        y = self.out(y.transpose(1, 2).contiguous().view(b, s, self.d))
        return x + y if self.residual else y

    def _mask(self, att, mask, s):
        kind = self.mask_kind
        if kind in ("causal_buffer", "padding_causal"):
            att = att.masked_fill(self.causal[:, :, :s, :s] == 0, float("-inf"))
        elif kind == "causal_tril":
            att = att + torch.triu(torch.full((s, s), float("-inf")), diagonal=1)
        elif kind == "causal_where":
            keep = torch.tril(torch.ones(s, s, dtype=torch.bool))
            att = torch.where(keep, att, torch.tensor(float("-inf")))
        if kind in ("padding", "padding_causal"):
            att = att + (1.0 - mask[:, None, None, :].to(att.dtype)) * -1e9
        return att

    def _sdpa(self, q, k, v, mask, s):
        kind = self.mask_kind
        if kind == "none":
            return F.scaled_dot_product_attention(q, k, v)
        if kind in ("padding", "padding_causal"):
            keep = mask[:, None, None, :].bool()
            if kind == "padding_causal":
                keep = keep & torch.ones(s, s, dtype=torch.bool).tril()
            return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class Elementwise(nn.Module):
    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op

    def forward(self, x, mask):
        op = self.op
        if op == "relu":
            return torch.relu(x)
        if op == "gelu":
            return F.gelu(x)
        if op == "gelu_tanh":
            return F.gelu(x, approximate="tanh")
        if op == "silu":
            return F.silu(x)
        if op == "tanh":
            return torch.tanh(x)
        if op == "sigmoid":
            return torch.sigmoid(x)
        if op == "swish":
            return x * torch.sigmoid(x)
        if op == "add_const":
            return x + 0.5
        if op == "mul_const":
            return x * 1.5
        if op == "neutral":
            return (x * 1 + 0) / 1
        if op == "leaky_relu":
            return F.leaky_relu(x, 0.1)
        return torch.exp(-x.abs())


class Norm(nn.Module):
    def __init__(self, d: int, norm: str) -> None:
        super().__init__()
        self.kind = norm
        if norm == "layernorm":
            self.norm = nn.LayerNorm(d)
        elif norm == "layernorm_no_affine":
            self.norm = nn.LayerNorm(d, elementwise_affine=False)
        elif norm == "batchnorm":
            self.norm = nn.BatchNorm1d(d)
        else:
            self.weight = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x, mask):
        if self.kind == "rmsnorm":
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight
        if self.kind == "batchnorm":  # normalizes features: (B, S, D) -> (B, D, S) and back
            return self.norm(x.transpose(1, 2)).transpose(1, 2)
        return self.norm(x)


class Reshape(nn.Module):
    def __init__(self, op: str, s: int, d: int, heads: int) -> None:
        super().__init__()
        self.op, self.s, self.d, self.heads = op, s, d, heads

    def forward(self, x, mask):
        b = x.shape[0]
        op, s, d = self.op, self.s, self.d
        if op == "heads_roundtrip":
            y = x.view(b, s, self.heads, d // self.heads).transpose(1, 2)
            return y.transpose(1, 2).reshape(b, s, d)
        if op == "transpose_roundtrip":
            return x.transpose(1, 2).transpose(1, 2)
        if op == "permute_roundtrip":
            return x.permute(2, 0, 1).permute(1, 2, 0)
        if op == "flatten_unflatten":
            return x.flatten(1).view(b, s, d)
        if op == "view_same":
            return x.view(b, s, d)
        if op == "contiguous":
            return x.contiguous()
        if op == "to_same":
            return x.to(torch.float32)
        if op == "clone":
            return x.clone()
        if op == "detach":
            return x.detach()
        if op == "slice_full":
            return x[:, :s]
        return x.reshape(b, s * 2, d // 2)  # split_last


class Conv1d(nn.Module):
    def __init__(self, d_in: int, d_out: int, k: int, bias: bool, bn: bool, depthwise: bool) -> None:
        super().__init__()
        self.conv = nn.Conv1d(d_in, d_out, k, padding=k // 2, bias=bias, groups=d_in if depthwise else 1)
        self.bn = nn.BatchNorm1d(d_out) if bn else nn.Identity()

    def forward(self, x, mask):
        return self.bn(self.conv(x.transpose(1, 2))).transpose(1, 2)


class LinearBN(nn.Module):
    def __init__(self, d_in: int, d_out: int, bias: bool) -> None:
        super().__init__()
        self.proj, self.bn = nn.Linear(d_in, d_out, bias=bias), nn.BatchNorm1d(d_out)

    def forward(self, x, mask):
        b, s, d = x.shape
        return self.bn(self.proj(x.reshape(b * s, d))).view(b, s, -1)


class Dropout(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.drop = nn.Dropout(p)

    def forward(self, x, mask):
        return self.drop(x)


class Duplicate(nn.Module):
    """f(x) + f(x): the same subexpression twice (what cse merges)."""

    def __init__(self, d: int, op: str) -> None:
        super().__init__()
        self.op = op
        self.proj = nn.Linear(d, d) if op == "linear" else None
        self.norm = nn.LayerNorm(d) if op == "norm" else None

    def forward(self, x, mask):
        if self.op == "linear":
            return self.proj(x) + self.proj(x)
        if self.op == "norm":
            return self.norm(x) - 0.5 * self.norm(x)
        if self.op == "softmax":
            return x.softmax(-1) * x.softmax(-1)
        return torch.relu(x) + torch.relu(x)


class ConstBranch(nn.Module):
    """x + something that depends on no input (what constant_folding precomputes)."""

    def __init__(self, d: int, op: str) -> None:
        super().__init__()
        self.op = op
        self.w = nn.Parameter(torch.randn(d, d) * 0.1)

    def forward(self, x, mask):
        if self.op == "scaled_weight_sum":
            return x + (self.w * 2).sum(0)
        if self.op == "arange_ramp":
            return x + torch.arange(x.shape[-1], dtype=x.dtype) * 0.01
        return x * torch.ones_like(x) + torch.zeros_like(x)


class Gram(nn.Module):
    """(x @ x^T / D) @ x: a matmul between two activations without softmax."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.d = d

    def forward(self, x, mask):
        return torch.tanh(x @ x.transpose(-1, -2) / self.d) @ x


class Conv2d(nn.Module):
    def __init__(self, c_in: int, c_out: int, k: int, bias: bool, bn: bool, depthwise: bool, relu: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=bias, groups=c_in if depthwise else 1)
        self.bn = nn.BatchNorm2d(c_out) if bn else nn.Identity()
        self.relu = relu

    def forward(self, x, mask):
        y = self.bn(self.conv(x))
        return F.relu(y) if self.relu else y


class Pool(nn.Module):
    def __init__(self, op: str) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(2) if op == "max" else nn.AvgPool2d(2)

    def forward(self, x, mask):
        return self.pool(x)


class BatchNorm2d(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x, mask):
        return self.bn(x)


class ToSeq(nn.Module):
    def forward(self, x, mask):
        return x.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C)


STEP_MODULES: dict[str, Callable[..., nn.Module]] = {
    "embedding": Embedding, "linear": Linear, "matmul_weight": MatmulWeight, "attention": Attention,
    "elementwise": Elementwise, "norm": Norm, "reshape": Reshape, "conv1d": Conv1d, "linear_bn": LinearBN,
    "dropout": Dropout, "duplicate": Duplicate, "const_branch": ConstBranch, "gram": Gram, "conv2d": Conv2d,
    "pool": Pool, "batchnorm2d": BatchNorm2d, "to_seq": ToSeq,
}


class RandomModel(nn.Module):
    """The steps of a recipe in a row; ``mask`` (a 0/1 padding mask) is an optional keyword."""

    def __init__(self, recipe: Recipe) -> None:
        super().__init__()
        self.recipe_text = repr(recipe)
        self.output_kind = recipe.output
        self.steps = nn.ModuleList(STEP_MODULES[s.kind](**dict(s.params)) for s in recipe.steps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> Any:
        for step in self.steps:
            x = step(x, mask)
        if self.output_kind == "tuple":
            return x, x.mean(-1)
        if self.output_kind == "dict":
            return {"out": x, "first": x[:, :1]}
        return x


def _randomize(model: nn.Module, seed: int) -> None:
    """Non-trivial BatchNorm statistics and affine parameters, as a trained model has."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.1)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


def make_inputs(recipe: Recipe, seed: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Fresh inputs for ``recipe``: floats ~ N(0, 1), token ids in the vocabulary, 0/1 masks
    whose first position is always 1 (no fully masked attention row)."""
    g = torch.Generator().manual_seed(seed)
    if recipe.input_kind == "tokens":
        x = torch.randint(0, recipe.vocab, recipe.shape, generator=g)
    else:
        x = torch.randn(recipe.shape, generator=g)
    kwargs: dict[str, Any] = {}
    if recipe.with_mask:
        b, s = recipe.shape[0], recipe.shape[1]
        mask = (torch.rand(b, s, generator=g) < 0.7).long()
        mask[:, 0] = 1
        kwargs["mask"] = mask
    return (x,), kwargs


def build_model(recipe: Recipe) -> tuple[RandomModel, tuple[Any, ...], dict[str, Any]]:
    """The eval-mode model for ``recipe`` and its example inputs."""
    torch.manual_seed(recipe.seed)
    model = RandomModel(recipe)
    _randomize(model, recipe.seed)
    args, kwargs = make_inputs(recipe, recipe.seed)
    return model.eval(), args, kwargs


# --------------------------------------------------------------------------- the check

PassesArg = Sequence[Pass] | Callable[[], Sequence[Pass]] | None


def check_recipe(recipe: Recipe, passes: PassesArg = None, *, options: dict[str, Any] | None = None,
                 tol: float = FP32_REL_L2, n_fresh: int = 1, allow_errors: bool = False) -> graphopt.OptimizeResult:
    """Optimize the recipe's model with ``passes`` *without* graphopt's own verification (so a
    wrong rewrite is not rolled back but caught here) and compare with the model on the example
    and ``n_fresh`` fresh inputs. ``passes``: a list, a factory returning one, or None for
    :func:`graphopt.passes.default_pipeline`. A pass that raises fails the check unless
    ``allow_errors``."""
    model, args, kwargs = build_model(recipe)
    chosen = passes() if callable(passes) else passes
    result = graphopt.optimize(model, args, kwargs, passes=chosen, verify=False, **(options or {}))
    if not allow_errors:
        errors = [f"{r.name}: {r.error}" for r in result.report.passes if r.status == "error"]
        assert not errors, f"pass raised on {recipe!r}: {errors}"
    inputs = [(args, kwargs)] + [make_inputs(recipe, 10_000 + i) for i in range(n_fresh)]
    for a, kw in inputs:  # within tol, or as accurate as the model against fp64 where it is ill-conditioned
        assert_as_accurate_as_model(model, result.module, a, kw, tol)
        expected, got = call(model, a, kw), call(result.module, a, kw)
    # no output may share memory with an input, a weight or another output unless it did before
    added = aliasing(got, (a, kw), model, result.module) - aliasing(expected, (a, kw), model)
    assert not added, f"outputs now alias {sorted(added)} on {recipe!r}"
    return result


def differential_settings(max_examples: int = 200, shrink: bool = True) -> settings:
    phases = [Phase.explicit, Phase.generate] + ([Phase.shrink] if shrink else [])
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None, phases=phases,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], print_blob=False)


def run_differential(passes: PassesArg = None, *, max_examples: int = 200, options: dict[str, Any] | None = None,
                     tol: float = FP32_REL_L2, allow_errors: bool = False, shrink: bool = True,
                     recipes: st.SearchStrategy[Recipe] | None = None) -> None:
    """Run ``passes`` on ``max_examples`` random models; raise on the first whose outputs differ.

    Use it from your pass's tests::

        def test_my_pass_on_random_models():
            run_differential(lambda: [MyPass()], max_examples=100)

    Hypothesis shrinks a failure to a small recipe and prints it (``shrink=False``
    reports the first failing model as drawn, faster). ``tol`` is the relative L2
    per output (fp32 default); ``options`` go to :func:`graphopt.optimize`.
    """

    @differential_settings(max_examples, shrink)
    @given(recipe=recipes if recipes is not None else model_recipes())
    def check(recipe: Recipe) -> None:
        check_recipe(recipe, passes, options=options, tol=tol, allow_errors=allow_errors)

    check()


__all__ = ["Recipe", "Step", "build_model", "check_recipe", "differential_settings", "make_inputs",
           "model_recipes", "run_differential"]
