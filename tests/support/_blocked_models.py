"""Small models the blocked-operator tests share (hand-written and from transformers configs)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class BiasedAttention(nn.Module):
    """Single attention layer with an ALiBi-style or learned (T x T) bias, plus an optional causal mask."""

    def __init__(self, d: int = 32, heads: int = 4, bias: str = "alibi", causal: bool = False,
                 max_len: int = 64, return_weights: bool = False) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.heads, self.d, self.bias_kind, self.causal = heads, d, bias, causal
        self.return_weights = return_weights
        slopes = torch.tensor([2.0 ** (-8 * (i + 1) / heads) for i in range(heads)])
        self.register_buffer("slopes", slopes.view(1, heads, 1, 1))
        self.learned = nn.Parameter(torch.randn(1, heads, max_len, max_len) * 0.1)

    def forward(self, x: torch.Tensor):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        s = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        if self.bias_kind == "alibi":
            s = s + self.slopes * torch.arange(t, device=x.device).view(1, 1, 1, t)
        elif self.bias_kind == "learned":
            s = s + self.learned[:, :, :t, :t]
        if self.causal:
            mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
            s = s.masked_fill(mask, float("-inf"))
        p = F.softmax(s, dim=-1)
        out = self.proj((p @ v).transpose(1, 2).reshape(b, t, self.d))
        return (out, p) if self.return_weights else out


class FFNStack(nn.Module):
    """x + W2(act(W1(LN(x)))) (or a gated SwiGLU) repeated."""

    def __init__(self, d: int = 32, hidden: int = 128, layers: int = 2, gated: bool = False) -> None:
        super().__init__()
        self.gated = gated
        self.norms = nn.ModuleList([nn.LayerNorm(d) for _ in range(layers)])
        self.up = nn.ModuleList([nn.Linear(d, hidden) for _ in range(layers)])
        self.gate = nn.ModuleList([nn.Linear(d, hidden, bias=False) for _ in range(layers)])
        self.down = nn.ModuleList([nn.Linear(hidden, d) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm, up, gate, down in zip(self.norms, self.up, self.gate, self.down):
            h = norm(x)
            x = x + down(F.silu(gate(h)) * up(h) if self.gated else F.gelu(up(h)))
        return x


class LMHeadReductions(nn.Module):
    """An LM head whose logits only feed reductions: label log-probs, greedy tokens, top-k."""

    def __init__(self, d: int = 16, vocab: int = 100, reduction: str = "gather") -> None:
        super().__init__()
        self.head = nn.Linear(d, vocab)
        self.reduction = reduction

    def forward(self, h: torch.Tensor, labels: torch.Tensor):
        logits = self.head(h)
        if self.reduction == "gather":
            return torch.log_softmax(logits.float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        if self.reduction == "argmax":
            return logits.argmax(-1)
        values, indices = torch.softmax(logits, -1).topk(3, dim=-1)
        return values, indices


def t5_encoder(seq: int = 64, layers: int = 2, heads: int = 4, d_model: int = 64, gated: bool = False):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    cfg = T5Config(d_model=d_model, d_kv=d_model // heads, d_ff=4 * d_model, num_layers=layers, num_heads=heads,
                   vocab_size=100, feed_forward_proj="gated-gelu" if gated else "relu",
                   attn_implementation="eager", use_cache=False)
    return T5EncoderModel(cfg).eval(), (torch.randint(0, 100, (1, seq)),)


def gpt2(seq: int = 16):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=64, attn_implementation="eager",
                     use_cache=False, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval(), (torch.randint(0, 64, (1, seq)),)


def llama(seq: int = 16):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=96, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, attn_implementation="eager", use_cache=False)
    return LlamaForCausalLM(cfg).eval(), (torch.randint(0, 64, (1, seq)),)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))
