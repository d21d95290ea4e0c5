"""A functional KV-cache step of a causal LM, for ONNX export: past tensors in, present tensors out.

ONNX has no in-place mutation, so :class:`~graphopt.generate.step.CausalLMStep`'s
static cache written with ``index_copy_`` would come out of export as extra
outputs anyway. This step instead follows the optimum / onnxruntime-genai
convention: inputs ``input_ids, attention_mask, position_ids,
past_key_values.{i}.key/value`` (``[batch, heads, past_len, dim]``), outputs
``logits, present.{i}.key/value`` (``[batch, heads, past_len + tokens, dim]``).
One graph serves prefill (``past_len`` 0) and decode. Inside, the past is
wrapped in transformers' ``DynamicCache`` so attention, GQA and masking are the
model's own.
"""

from __future__ import annotations

from typing import Any

import torch

from graphopt.generate.step import cache_argument


def kv_input_names(layers: int) -> list[str]:
    """``past_key_values.{i}.key``, ``past_key_values.{i}.value`` for each layer, interleaved."""
    return [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def kv_output_names(layers: int) -> list[str]:
    """``present.{i}.key``, ``present.{i}.value`` for each layer, interleaved."""
    return [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


class PastPresentStep(torch.nn.Module):
    """``step(input_ids, attention_mask, position_ids, *past) -> (logits, *present)``.

    ``attention_mask`` is ``[batch, past_len + tokens]`` (1 for real tokens, 0 for
    left padding); ``past`` is ``[k0, v0, k1, v1, ...]``. Logits are for every
    new position, ``[batch, tokens, vocab]``, as optimum's exports give them.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self._cache_arg = cache_argument(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(len(past) // 2):
            cache.update(past[2 * i], past[2 * i + 1], i)
        kwargs: dict[str, Any] = {self._cache_arg: cache, "use_cache": True}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        present: list[torch.Tensor] = []
        for layer in cache.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)
