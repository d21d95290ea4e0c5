"""ONNX export of a causal LM with a KV cache, and a greedy generation loop in onnxruntime.

The graph follows optimum / onnxruntime-genai naming (see
:mod:`graphopt.onnx.kv_step`): one graph for prefill (past length 0) and decode,
batch, token count and past length all dynamic.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from graphopt.generate.loop import GenerationTimes, prompt_positions
from graphopt.generate.step import read_cache_layout
from graphopt.onnx.moe import grouped_mm_translations
from graphopt.onnx.kv_step import PastPresentStep, kv_input_names, kv_output_names

log = logging.getLogger(__name__)


def export_kv_onnx(model: torch.nn.Module, path: str | Path, opset: int | None = None) -> Path:
    """Write ``model`` (a transformers causal LM in eval mode) as ONNX with past/present KV inputs and outputs."""
    layout = read_cache_layout(model)
    step = PastPresentStep(model).eval()
    batch, tokens, past_len = 2, 3, 4
    ids = torch.zeros(batch, tokens, dtype=torch.long)
    mask = torch.ones(batch, past_len + tokens, dtype=torch.long)
    pos = torch.arange(past_len, past_len + tokens)[None].expand(batch, tokens).contiguous()
    past = []
    for (kh, kd), (vh, vd) in zip(layout.keys, layout.values):
        past += [torch.zeros(batch, kh, past_len, kd, dtype=layout.dtype),
                 torch.zeros(batch, vh, past_len, vd, dtype=layout.dtype)]
    dyn = torch.export.Dim.DYNAMIC
    shapes = {"input_ids": {0: dyn, 1: dyn}, "attention_mask": {0: dyn, 1: dyn}, "position_ids": {0: dyn, 1: dyn},
              "past": tuple({0: dyn, 2: dyn} for _ in past)}
    with torch.no_grad():
        ep = torch.export.export(step, (ids, mask, pos, *past), dynamic_shapes=shapes, strict=False)
    program = torch.onnx.export(ep, dynamo=True, opset_version=opset,
                                custom_translation_table=grouped_mm_translations(),  # MoE experts
                                input_names=["input_ids", "attention_mask", "position_ids", *kv_input_names(layout.layers)],
                                output_names=["logits", *kv_output_names(layout.layers)])
    path = Path(path)
    program.save(str(path))
    log.info("wrote %s with a KV cache of %d layers", path, layout.layers)
    return path


@dataclass
class OrtGeneration:
    """Tokens a greedy onnxruntime run produced, and its timings (the clock torch's generation loop keeps)."""

    tokens: np.ndarray
    times: GenerationTimes = field(default_factory=GenerationTimes)

    @property
    def decode_tokens_per_s(self) -> float:
        """Decode steps per second (each step gives one token per batch row)."""
        return self.times.decode_tokens_per_s


class OrtKVGenerator:
    """Greedy generation with an onnxruntime session over a graph :func:`export_kv_onnx` wrote."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self._past = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self._outputs = [o.name for o in self.session.get_outputs()]

    def generate(self, input_ids: np.ndarray, attention_mask: np.ndarray, new_tokens: int) -> OrtGeneration:
        """``new_tokens`` greedy tokens after a left-padded prompt ``[batch, prompt]``."""
        ids = np.asarray(input_ids, dtype=np.int64)
        mask = np.asarray(attention_mask, dtype=np.int64)
        batch = ids.shape[0]
        feed = {p.name: np.zeros((batch, p.shape[1], 0, p.shape[3]), dtype=np.float32) for p in self._past}
        pos = prompt_positions(torch.from_numpy(mask)).numpy()
        result = OrtGeneration(np.zeros((batch, new_tokens), dtype=np.int64))
        for n in range(new_tokens):
            start = time.perf_counter()
            outs = self.session.run(self._outputs, {"input_ids": ids, "attention_mask": mask,
                                                    "position_ids": pos, **feed})
            nxt = outs[0][:, -1, :].argmax(-1)
            result.tokens[:, n] = nxt
            feed = {p.name: o for p, o in zip(self._past, outs[1:])}
            ids, pos = nxt[:, None], pos[:, -1:] + 1
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
            took = time.perf_counter() - start
            if n == 0:
                result.times.prefill_s = took
            else:
                result.times.decode_s.append(took)
        return result
