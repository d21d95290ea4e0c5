"""Built-in example models, used by the quick start, the examples and the tests.

* ``nanogpt``: a nanoGPT-style decoder written by hand (causal self-attention
  with a ``tril`` buffer and ``masked_fill``, GELU MLP, pre-LayerNorm);
  ``split_qkv=1`` gives it separate q/k/v linears instead of one ``c_attn``.
* ``cnn``: the classic CIFAR-10 network: (Conv-BN-ReLU-Pool) x 2, then
  Linear-ReLU-Linear.
* ``mlp``: Linear-GELU-Linear.
* ``dlrm``: a DLRM-style recommender: one ``EmbeddingBag`` per sparse
  feature, read through flat indices and per-bag offsets; a bottom MLP on the
  dense features, pairwise dot interaction, a top MLP.

``BUILDERS`` maps each name to its factory; the spec ``examples:nanogpt?n_layer=2&seq=64``
(:func:`graphopt.specs.load_spec`) calls it with the query's keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class NanoGPTConfig:
    vocab_size: int = 512
    block_size: int = 256
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    split_qkv: bool = False  # separate q/k/v linears instead of one c_attn


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: NanoGPTConfig) -> None:
        super().__init__()
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.attn_dropout = nn.Dropout(cfg.dropout)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.n_head, self.n_embd = cfg.n_head, cfg.n_embd
        self.register_buffer(
            "bias", torch.tril(torch.ones(cfg.block_size, cfg.block_size)).view(1, 1, cfg.block_size, cfg.block_size)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        att = self.attn_dropout(att)
        y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class SdpaCausalSelfAttention(CausalSelfAttention):
    """nanoGPT attention calling ``F.scaled_dot_product_attention(is_causal=True)``: what attention fusion produces."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


def use_sdpa_attention(model: nn.Module) -> nn.Module:
    """Switch every nanoGPT attention block of ``model`` to :class:`SdpaCausalSelfAttention` (same weights)."""
    for module in model.modules():
        if type(module) is CausalSelfAttention:
            module.__class__ = SdpaCausalSelfAttention
    return model


class SplitQKVSelfAttention(CausalSelfAttention):
    """The same attention with separate q/k/v projections (as Llama-style code writes it)."""

    def __init__(self, cfg: NanoGPTConfig) -> None:
        super().__init__(cfg)
        del self.c_attn
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q = self.q_proj(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        y = self.attn_dropout(F.softmax(att, dim=-1)) @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, n_embd: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.c_fc = nn.Linear(n_embd, hidden)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(hidden, n_embd)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: NanoGPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = SplitQKVSelfAttention(cfg) if cfg.split_qkv else CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg.n_embd, 4 * cfg.n_embd, cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """A nanoGPT-style language model (Karpathy's nanoGPT, inference path)."""

    def __init__(self, cfg: NanoGPTConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or NanoGPTConfig()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        _, t = idx.size()
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class CifarCNN(nn.Module):
    """Conv-BN-ReLU-Pool twice, then Linear-ReLU-Linear (classic CIFAR-10 example)."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(2 * width * 8 * 8, 64)
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        x = self.pool(F.relu(self.bn2(self.conv2(x))))
        x = torch.flatten(x, 1)
        return self.fc2(F.relu(self.fc1(x)))


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics, as a trained model would have."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model


class TinyMLP(nn.Module):
    def __init__(self, d: int = 64, hidden: int = 256) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def nanogpt(n_layer: int = 2, n_head: int = 4, n_embd: int = 128, vocab_size: int = 512,
            block_size: int = 256, batch: int = 1, seq: int = 64, seed: int = 0,
            split_qkv: bool = False) -> tuple[nn.Module, tuple]:
    torch.manual_seed(seed)
    cfg = NanoGPTConfig(vocab_size, max(block_size, seq), n_layer, n_head, n_embd, split_qkv=split_qkv)
    model = NanoGPT(cfg).eval()
    return model, (torch.randint(0, vocab_size, (batch, seq)),)


def cnn(batch: int = 4, width: int = 16, seed: int = 0) -> tuple[nn.Module, tuple]:
    torch.manual_seed(seed)
    model = randomize_batchnorm(CifarCNN(width=width), seed).eval()
    return model, (torch.randn(batch, 3, 32, 32),)


def mlp(batch: int = 8, d: int = 64, hidden: int = 256, seed: int = 0) -> tuple[nn.Module, tuple]:
    torch.manual_seed(seed)
    return TinyMLP(d, hidden).eval(), (torch.randn(batch, d),)


class DLRM(nn.Module):
    """DLRM-style recommender: ``forward(dense, indices, offsets)``, one ``(indices, offsets)`` pair per table.

    ``indices[t]`` holds the row ids of table ``t``'s bags one after another,
    ``offsets[t]`` where each bag starts (sorted, ``offsets[t][0] == 0``), as
    ``nn.EmbeddingBag`` takes them.
    """

    def __init__(self, n_dense: int = 8, n_tables: int = 3, rows: int = 50, dim: int = 16,
                 bottom: int = 32, top: int = 32) -> None:
        super().__init__()
        self.tables = nn.ModuleList(nn.EmbeddingBag(rows, dim, mode="sum") for _ in range(n_tables))
        self.bottom = nn.Sequential(nn.Linear(n_dense, bottom), nn.ReLU(), nn.Linear(bottom, dim), nn.ReLU())
        n_feat = n_tables + 1
        pairs = torch.triu_indices(n_feat, n_feat, offset=1)
        self.register_buffer("pair_rows", pairs[0], persistent=False)
        self.register_buffer("pair_cols", pairs[1], persistent=False)
        self.top = nn.Sequential(nn.Linear(dim + pairs.shape[1], top), nn.ReLU(), nn.Linear(top, 1))

    def forward(self, dense: torch.Tensor, indices: list[torch.Tensor], offsets: list[torch.Tensor]) -> torch.Tensor:
        x = self.bottom(dense)
        feats = torch.stack([x] + [t(i, o) for t, i, o in zip(self.tables, indices, offsets)], dim=1)
        dots = torch.bmm(feats, feats.transpose(1, 2))[:, self.pair_rows, self.pair_cols]
        return torch.sigmoid(self.top(torch.cat([x, dots], dim=1)))


def dlrm_inputs(batch: int, n_dense: int, n_tables: int, rows: int, bag: int,
                generator: torch.Generator) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Dense features and, per table, bags of 1..``bag`` row ids (flat indices, offsets from 0)."""
    indices, offsets = [], []
    for _ in range(n_tables):
        sizes = torch.randint(1, bag + 1, (batch,), generator=generator)
        offsets.append(torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)[:-1]]))
        indices.append(torch.randint(0, rows, (int(sizes.sum()),), generator=generator))
    return torch.randn(batch, n_dense, generator=generator), indices, offsets


def dlrm(batch: int = 4, n_dense: int = 8, n_tables: int = 3, rows: int = 50, dim: int = 16, bag: int = 3,
         seed: int = 0) -> tuple[nn.Module, tuple]:
    torch.manual_seed(seed)
    model = DLRM(n_dense, n_tables, rows, dim).eval()
    return model, dlrm_inputs(batch, n_dense, n_tables, rows, bag, torch.Generator().manual_seed(seed))


BUILDERS = {"nanogpt": nanogpt, "cnn": cnn, "mlp": mlp, "dlrm": dlrm}
