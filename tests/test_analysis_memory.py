"""Liveness peak memory on small hand-checked graphs, and the measured peak beside it."""

from __future__ import annotations

import torch
import torch.nn as nn

import graphopt
from graphopt.memory import peak_memory
from graphopt.target import measure_peak

F32 = 4


def _gm(module: nn.Module, *args):
    return graphopt.capture(module, args).module


class Chain(nn.Module):
    """x -> linear(64->256) -> relu -> linear(256->64)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(64, 256), nn.Linear(256, 64)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_chain_peak_is_two_hidden_tensors():
    gm = _gm(Chain(), torch.randn(32, 64))
    mp = peak_memory(gm)
    hidden = 32 * 256 * F32
    # while relu runs, linear's output (its input) and relu's output are both live
    assert mp.peak_bytes == 2 * hidden
    assert mp.peak_node.target is torch.ops.aten.relu.default
    assert {n.name for n in mp.live_at_peak} == {mp.peak_node.name, mp.peak_node.args[0].name}
    # parameters are reported apart, inputs too
    assert mp.parameter_bytes == sum(p.numel() for p in Chain().parameters()) * F32
    assert mp.input_bytes == 32 * 64 * F32
    assert len(mp.timeline) == len(gm.graph.nodes)


class Views(nn.Module):
    def forward(self, x):
        y = x * 2                      # 1 allocation (N bytes)
        z = y.view(16, 64).transpose(0, 1)   # views: no new storage
        w = z.contiguous()             # a copy: N bytes
        return w + 1                   # N bytes; y dead after contiguous


def test_views_share_their_base():
    x = torch.randn(1024)
    gm = _gm(Views(), x)
    mp = peak_memory(gm)
    n = 1024 * F32
    # at contiguous: y (through its views) and w are live -> 2N; at add: w and the result -> 2N
    assert mp.peak_bytes == 2 * n
    assert max(mp.timeline) == 2 * n


class Split(nn.Module):
    def forward(self, x):
        h = x * 3                      # N
        a, b = h.split(512)            # views of h
        return a.relu() + b            # relu: N/2, add: N/2 (h alive until add)


def test_split_getitems_alias_the_split_tensor():
    gm = _gm(Split(), torch.randn(1024))
    mp = peak_memory(gm)
    n = 1024 * F32
    assert mp.peak_bytes == n + n // 2 + n // 2


class KeepsOutput(nn.Module):
    def forward(self, x):
        a = x * 2
        b = a * 3
        c = b * 4
        return a, c                    # a stays live to the end


def test_outputs_stay_live_to_the_end():
    gm = _gm(KeepsOutput(), torch.randn(256))
    mp = peak_memory(gm)
    n = 256 * F32
    assert mp.peak_bytes == 3 * n  # a, b and c while c is computed
    assert mp.timeline[-1] == 2 * n  # a and c at the output


class UsesParamView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(128, 128))

    def forward(self, x):
        return x @ self.w.t()


def test_views_of_parameters_cost_nothing():
    gm = _gm(UsesParamView(), torch.randn(8, 128))
    mp = peak_memory(gm)
    assert mp.peak_bytes == 8 * 128 * F32
    assert mp.parameter_bytes == 128 * 128 * F32


def test_measured_peak_matches_prediction_on_a_chain():
    x = torch.randn(256, 64)
    gm = _gm(Chain(), x)
    predicted = peak_memory(gm).peak_bytes
    peak = measure_peak(gm, (x,), warmup=True)
    measured, method = peak.bytes, peak.method
    assert measured is not None, method
    assert abs(measured - predicted) / predicted < 0.25, (measured, predicted, method)
