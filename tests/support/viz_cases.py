"""Models and pipelines the viewer tests share (data and browser)."""

from __future__ import annotations

import torch
from torch import nn

from graphopt.passes import default_pipeline

EVIL = "<script>alert(1)</script>"


class Evil(nn.Module):
    """A model whose submodule is named like an HTML script element."""

    def __init__(self) -> None:
        super().__init__()
        self.add_module(EVIL, nn.Linear(4, 4))
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(getattr(self, EVIL)(x)))


def unfused_pipeline() -> list:
    """The default pipeline without attention fusion: the viewer tests look at the softmax and mask nodes."""
    return [p for p in default_pipeline() if p.name != "fuse_attention"]
