"""Helpers shared by the ONNX tests: an independent onnxruntime runner and a nanoGPT that calls SDPA."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree

from graphopt.examples_models import SdpaCausalSelfAttention, use_sdpa_attention  # noqa: F401 (re-exported)
from onnxscript import opset18 as op


def run_onnx(path: str, tensors: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """Run an ONNX file in onnxruntime (CPU, default options), inputs fed by position."""
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert len(names) == len(tensors), (names, [t.shape for t in tensors])
    return session.run(None, {n: t.numpy() for n, t in zip(names, tensors)})


def torch_leaves(out: Any) -> list[np.ndarray]:
    return [x.detach().numpy() for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]


def rel_l2(reference: np.ndarray, candidate: np.ndarray) -> float:
    reference, candidate = reference.astype(np.float64), candidate.astype(np.float64)
    return float(np.linalg.norm(reference - candidate) / np.linalg.norm(reference))


class GQACausalAttention(torch.nn.Module):
    """Grouped-query causal self-attention through SDPA (enable_gqa): 4 query heads, 2 key/value heads."""

    def __init__(self, d: int = 64, heads: int = 4, kv_heads: int = 2) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head = heads, kv_heads, d // heads
        self.q = torch.nn.Linear(d, d)
        self.kv = torch.nn.Linear(d, 2 * kv_heads * self.head)
        self.o = torch.nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.heads, self.head).transpose(1, 2)
        k, v = self.kv(x).view(B, T, 2 * self.kv_heads, self.head).transpose(1, 2).split(self.kv_heads, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o(y.transpose(1, 2).reshape(B, T, -1))


class MaskedAttention(torch.nn.Module):
    """Non-causal SDPA with an additive mask input: the onnxruntime rewrite must decline it."""

    def __init__(self, d: int = 32, heads: int = 2) -> None:
        super().__init__()
        self.heads, self.head = heads, d // heads
        self.qkv = torch.nn.Linear(d, 3 * d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, self.head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1 / math.sqrt(self.head))
        return y.transpose(1, 2).reshape(B, T, C)


@torch.library.custom_op("graphopt_test::scaled_relu", mutates_args=())
def scaled_relu(x: torch.Tensor, scale: float) -> torch.Tensor:
    """A stand-in for a graphopt operator (none exist yet): relu(x) * scale."""
    return torch.relu(x) * scale


@scaled_relu.register_fake
def _(x: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.empty_like(x)


def scaled_relu_onnx(x, scale: float):
    return op.Mul(op.Relu(x), op.CastLike(scale, x))


def scaled_relu_onnx_wrong(x, scale: float):  # forgets the scale: onnxruntime must disagree
    return op.Relu(x)


class UsesCustomOp(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.graphopt_test.scaled_relu(self.fc(x), 3.0)


def custom_op_model() -> tuple[torch.nn.Module, tuple[torch.Tensor]]:
    """Factory for CLI specs (``tests.support.onnx_support:custom_op_model``)."""
    torch.manual_seed(0)
    return UsesCustomOp().eval(), (torch.randn(4, 8),)


def register_translation(monkeypatch: Any, translation: Any) -> None:
    """Make ``graphopt.ops.onnx_translations()`` return ``translation`` for the test op."""
    import types

    import graphopt.ops
    from graphopt.ops.declare import OpDeclaration

    module = types.SimpleNamespace(DECLARATIONS=(OpDeclaration(torch.ops.graphopt_test.scaled_relu.default,
                                                              onnx=translation),))
    monkeypatch.setattr(graphopt.ops, "OP_MODULES", [module])
