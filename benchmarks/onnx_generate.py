"""Decode speed in onnxruntime: the KV-cache ONNX graph against recomputing the growing sequence.

Two "no cache" sides, each re-run on the whole sequence so far (prompt + tokens
made) for every token: the plain no-cache export (``graphopt.export_onnx`` of
the model with ``use_cache=False``, dynamic batch and sequence: what a user
without a KV-cache graph has), and the KV-cache graph fed an empty past.
Random-weight GPT-2 from a config (no download).

    .venv/bin/python benchmarks/onnx_generate.py --prompt 128 --tokens 16
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from graphopt.onnx.kv_cache import OrtKVGenerator, export_kv_onnx


def _recompute_per_token(gen: OrtKVGenerator, ids: np.ndarray, tokens: int) -> float:
    batch = ids.shape[0]
    took = []
    for _ in range(tokens):
        mask = np.ones_like(ids)
        pos = np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()
        feed = {p.name: np.zeros((batch, p.shape[1], 0, p.shape[3]), dtype=np.float32) for p in gen._past}
        start = time.perf_counter()
        logits = gen.session.run(["logits"], {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **feed})[0]
        took.append(time.perf_counter() - start)
        ids = np.concatenate([ids, logits[:, -1:, :].argmax(-1)], axis=1)
    return sum(took) / len(took)


def _no_cache_export_per_token(model: GPT2LMHeadModel, ids: np.ndarray, tokens: int, folder: Path) -> float:
    """ms per token of the plain no-cache ONNX export, re-run on the growing sequence."""
    import onnxruntime as ort

    import graphopt

    config = GPT2Config(**{**model.config.to_dict(), "use_cache": False})
    plain = GPT2LMHeadModel(config).eval()
    plain.load_state_dict(model.state_dict())
    exported = graphopt.export_onnx(plain, folder / "no_cache.onnx", (torch.from_numpy(ids),), dynamic="batch,seq")
    session = ort.InferenceSession(exported.path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    session.run(None, {name: ids})  # warm-up
    took = []
    for _ in range(tokens):
        start = time.perf_counter()
        logits = session.run(None, {name: ids})[0]
        took.append(time.perf_counter() - start)
        ids = np.concatenate([ids, logits[:, -1:, :].argmax(-1)], axis=1)
    return sum(took) / len(took)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=args.layers, n_embd=args.hidden, n_head=4, vocab_size=1024)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        gen = OrtKVGenerator(export_kv_onnx(model, Path(tmp) / "kv.onnx"))
        ids = np.random.default_rng(0).integers(0, 1024, (1, args.prompt), dtype=np.int64)
        gen.generate(ids, np.ones_like(ids), 4)  # warm-up
        run = gen.generate(ids, np.ones_like(ids), args.tokens + 1)
        cached = 1.0 / run.decode_tokens_per_s
        recompute = _recompute_per_token(gen, ids, args.tokens)
        plain = _no_cache_export_per_token(model, ids, args.tokens, Path(tmp))
    print(f"prompt {args.prompt}, GPT-2 {args.layers}x{args.hidden}, batch 1, {args.tokens} tokens; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"kv-cache decode                    {cached * 1e3:8.2f} ms/token")
    print(f"no-cache export, growing sequence  {plain * 1e3:8.2f} ms/token  ({plain / cached:.1f}x the kv-cache time)")
    print(f"kv graph, empty past, growing seq  {recompute * 1e3:8.2f} ms/token  ({recompute / cached:.1f}x)")


if __name__ == "__main__":
    main()
