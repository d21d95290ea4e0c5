"""Small models shared by the precision and ONNX int8 tests."""

from __future__ import annotations

import torch
import torch.nn as nn

from graphopt.ops import fp8_linear, int8_linear


class Encoderish(nn.Module):
    """Pre-norm block: LayerNorm -> attention-like matmuls + softmax -> MLP, residual stream."""

    def __init__(self, d: int = 64, hidden: int = 128, layers: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            self.blocks.append(nn.ModuleDict({
                "ln1": nn.LayerNorm(d), "qkv": nn.Linear(d, 3 * d), "proj": nn.Linear(d, d),
                "ln2": nn.LayerNorm(d), "fc1": nn.Linear(d, hidden), "fc2": nn.Linear(hidden, d)}))
        self.head = nn.Linear(d, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            q, k, v = b["qkv"](b["ln1"](x)).chunk(3, dim=-1)
            att = torch.softmax(q @ k.transpose(-2, -1) / 8.0, dim=-1)
            x = x + b["proj"](att @ v)
            x = x + b["fc2"](torch.nn.functional.gelu(b["fc1"](b["ln2"](x))))
        return self.head(x)


def encoderish_model(seed: int = 0, **kw):
    torch.manual_seed(seed)
    return Encoderish(**kw).eval(), (torch.randn(4, 16, 64),)


class QuantModule(torch.nn.Module):
    def __init__(self, w, b, scheme, shift=None):
        super().__init__()
        q, s = int8_linear.quantize_weight(w, pair_safe=scheme in int8_linear.PAIR_SAFE_SCHEMES)
        self.register_buffer("q", q)
        self.register_buffer("s", s)
        self.register_buffer("b", b if shift is None else b + w @ shift)
        self.register_buffer("shift", shift)
        fq, fs = fp8_linear.quantize_weight(w)
        self.register_buffer("fq", fq)
        self.register_buffer("fs", fs)
        self.scheme = scheme

    def forward(self, x):
        h = torch.ops.graphopt.int8_linear(x, self.q, self.s, self.b, self.scheme, self.shift)
        return h, torch.ops.graphopt.fp8_linear(x, self.fq, self.fs, None)


class FakeTimer:
    """Timings injected per precision: each candidate op costs ``cost[precision]``; whole graphs ``graph``; auto's
    per-node plan (``"auto"``) against the rivals run alone: 0.5 against 1.0 (the per-node plan is kept)."""

    def __init__(self, cost: dict[str, float], graph: dict[str, float] | None = None) -> None:
        self.cost, self.graph = cost, graph or {"fp32": 1.0, "plan": 0.5}
        self.calls: list[set[str]] = []

    def __call__(self, fns, **_kw):
        self.calls.append(set(fns))
        if set(fns) == {"fp32", "plan"}:
            return dict(self.graph)
        if "auto" in fns:
            return {k: 0.5 if k == "auto" else 1.0 for k in fns}
        return {k: self.cost[k] for k in fns}
