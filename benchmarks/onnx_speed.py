"""onnxruntime latency: the plain torch.onnx export of the original model vs graphopt's export.

All ONNX models of a row run in this one process, in onnxruntime sessions with
the same session options (all graph optimizations; --threads sets the intra-op
thread count, default onnxruntime's), runs interleaved round by round
(graphopt.onnx.speed.compare_latency); the figure is the median of --runs
runs (>= 10). "vs plain" = plain median / model median.

Rows (batch 1, --seq tokens, default 1024):

* ``gpt2``: GPT-2 from a transformers config (random weights, eager
  attention, 2 layers, d=256, 4 heads, LM head). Models: the plain export of
  the original; graphopt's export of the original (``graphopt.optimize`` with
  the default pipeline, then ``graphopt.export_onnx``) -- its speed-up comes
  from the attention fusion pass turning eager attention into
  ``scaled_dot_product_attention``, the "attention in ONNX" column says
  whether it happened; and graphopt's export of the same GPT-2 whose attention
  calls ``F.scaled_dot_product_attention(is_causal=True)`` (what attention
  fusion produces; the path measured before the pass landed).
* ``gpt2-base``: the same without the LM head (GPT2Model): the LM head's
  1024 x 256 x 50257 matmul is ~26 of the ~31 GFLOP of ``gpt2`` and dilutes
  every other difference.
* ``nanogpt-sdpa``: graphopt's nanoGPT (same sizes, vocab 512) with its
  attention patched to SDPA, through graphopt, against the plain export of the
  original (eager) nanoGPT; plus the plain export of the patched model, to
  show what graphopt's ONNX-side rewrite adds to SDPA alone.

    .venv/bin/python benchmarks/onnx_speed.py [--seq 1024] [--runs 10] [--threads N] [--rows gpt2,...]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from collections import Counter

import torch
import torch.nn.functional as F

import graphopt
from graphopt.examples_models import nanogpt, use_sdpa_attention
from graphopt.onnx import export_plain
from graphopt.onnx.speed import compare_latency, describe_session_options, session_options


def gpt2(seq: int, attn: str = "eager", head: bool = True) -> tuple[torch.nn.Module, tuple[torch.Tensor]]:
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=256, n_head=4, n_positions=max(1024, seq), use_cache=False)
    cls = GPT2LMHeadModel if head else GPT2Model
    model = cls._from_config(config, attn_implementation=attn).eval()
    ids = torch.randint(0, config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(1))
    return model, (ids,)


def register_causal_sdpa() -> str:
    """A transformers attention function calling SDPA with is_causal=True (no mask): attention fusion's output."""
    from transformers import AttentionInterface

    def causal_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register("graphopt_causal_sdpa", causal_sdpa)
    return "graphopt_causal_sdpa"


def nanogpt_pair(seq: int) -> tuple[torch.nn.Module, torch.nn.Module, tuple[torch.Tensor]]:
    eager, args = nanogpt(n_layer=2, n_head=4, n_embd=256, block_size=max(1024, seq), seq=seq)
    patched, _ = nanogpt(n_layer=2, n_head=4, n_embd=256, block_size=max(1024, seq), seq=seq)
    return eager, use_sdpa_attention(patched), args


def graphopt_export(model: torch.nn.Module, args: tuple, path: str) -> dict[str, int]:
    result = graphopt.optimize(model, args)
    info = graphopt.export_onnx(result, path)
    return info.op_counts


def attention_form(ops: dict[str, int]) -> str:
    if ops.get("com.microsoft.GroupQueryAttention"):
        return f"GroupQueryAttention x{ops['com.microsoft.GroupQueryAttention']}"
    if ops.get("Attention"):
        return f"Attention x{ops['Attention']}"
    return f"MatMul/Softmax (Softmax x{ops.get('Softmax', 0)})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: onnxruntime's)")
    parser.add_argument("--rows", default="gpt2,gpt2-base,nanogpt-sdpa")
    a = parser.parse_args()
    if a.runs < 10:
        parser.error("--runs must be at least 10 (median of >= 10 runs)")
    logging.basicConfig(level=logging.WARNING)
    rows = [r.strip() for r in a.rows.split(",") if r.strip()]
    so = session_options(a.threads)
    print(f"torch {torch.__version__}, onnxruntime {__import__('onnxruntime').__version__}, "
          f"{os.cpu_count()} CPUs visible; session options {describe_session_options(so)}")
    print(f"seq {a.seq}, batch 1, median of {a.runs} interleaved runs\n")
    tmp = tempfile.mkdtemp(prefix="graphopt-onnx-speed-")
    header = f"{'row':24s} {'model':44s} {'attention in ONNX':28s} {'median ms':>10s} {'min ms':>8s} {'vs plain':>9s}"
    print(header)
    print("-" * len(header))
    for row in rows:
        models, forms = {}, {}
        if row in ("gpt2", "gpt2-base"):
            head = row == "gpt2"
            model, args = gpt2(a.seq, head=head)
            fused, _ = gpt2(a.seq, attn=register_causal_sdpa(), head=head)
            models["plain export (original)"] = os.path.join(tmp, f"{row}_plain.onnx")
            forms["plain export (original)"] = attention_form(_ops(export_plain(model, args, path=models["plain export (original)"])))
            models["graphopt"] = os.path.join(tmp, f"{row}_graphopt.onnx")
            forms["graphopt"] = attention_form(graphopt_export(model, args, models["graphopt"]))
            models["graphopt (fused attention)"] = os.path.join(tmp, f"{row}_graphopt_fused.onnx")
            forms["graphopt (fused attention)"] = attention_form(graphopt_export(fused, args, models["graphopt (fused attention)"]))
        elif row == "nanogpt-sdpa":
            eager, patched, args = nanogpt_pair(a.seq)
            models["plain export (original)"] = os.path.join(tmp, "nano_plain.onnx")
            forms["plain export (original)"] = attention_form(_ops(export_plain(eager, args, path=models["plain export (original)"])))
            models["plain export (sdpa-patched)"] = os.path.join(tmp, "nano_plain_sdpa.onnx")
            forms["plain export (sdpa-patched)"] = attention_form(_ops(export_plain(patched, args, path=models["plain export (sdpa-patched)"])))
            models["graphopt (sdpa-patched)"] = os.path.join(tmp, "nano_graphopt.onnx")
            forms["graphopt (sdpa-patched)"] = attention_form(graphopt_export(patched, args, models["graphopt (sdpa-patched)"]))
        else:
            print(f"unknown row {row!r}", file=sys.stderr)
            return 2
        feed = [x.numpy() for x in args]
        stats = compare_latency(models, feed, runs=a.runs, so=so)
        base = stats["plain export (original)"].median_ms
        for name, s in stats.items():
            print(f"{row:24s} {name:44s} {forms[name]:28s} {s.median_ms:10.1f} {s.min_ms:8.1f} "
                  f"{base / s.median_ms:8.2f}x", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


def _ops(program) -> dict[str, int]:
    return dict(Counter((f"{n.domain}." if n.domain else "") + n.op_type for n in program.model.graph))


if __name__ == "__main__":
    sys.exit(main())
