"""One forward step of a causal LM over a static KV cache that the caller owns.

``CausalLMStep`` is what graphopt captures twice for generation: as the
prefill graph (a prompt of any length) and as the decode graph (one token).
Its KV cache is a list of plain tensors, **inputs** of the step, written in
place (``index_copy_``) at ``cache_position``; the step returns the logits of
the last position only.

Why not transformers' own export wrapper (``transformers.integrations.executorch``)?
It keeps the cache as module buffers of one fixed batch size and takes no
attention mask, so a left-padded batch cannot be generated and every batch
size would need its own graph. Here the cache length and the batch are
dynamic axes of one graph, and the padding mask is an input. Inside, the step
still uses transformers' ``StaticCache`` and the model's own mask code, so
every architecture's attention (GQA, MQA, sliding windows within the cache)
is the model's.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

from graphopt.errors import BadInput


@dataclass(frozen=True)
class CacheLayout:
    """The KV cache of a causal LM: per layer, the key and value tensors' (heads, head_dim).

    Read from one eager forward of the model (so MQA, GQA and unusual head
    dims come out as the model makes them). A cache for ``batch`` rows and
    ``length`` positions is ``2 * layers`` tensors ``[batch, heads, length, dim]``,
    keys and values interleaved.
    """

    keys: tuple[tuple[int, int], ...]
    values: tuple[tuple[int, int], ...]
    dtype: torch.dtype
    sliding_window: int | None = None

    @property
    def layers(self) -> int:
        return len(self.keys)

    def allocate(self, batch: int, length: int, device: torch.device | str = "cpu") -> list[torch.Tensor]:
        """A zeroed cache: ``[k0, v0, k1, v1, ...]``, each ``[batch, heads, length, dim]``."""
        out: list[torch.Tensor] = []
        for (kh, kd), (vh, vd) in zip(self.keys, self.values):
            out.append(torch.zeros(batch, kh, length, kd, dtype=self.dtype, device=device))
            out.append(torch.zeros(batch, vh, length, vd, dtype=self.dtype, device=device))
        return out

    def bytes_per_position(self, batch: int = 1) -> int:
        per = sum(h * d for h, d in self.keys) + sum(h * d for h, d in self.values)
        return per * batch * torch.empty((), dtype=self.dtype).element_size()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CacheLayout:
        """The layout :meth:`to_dict` wrote (a bundle's ``graphopt.json``)."""
        dtype = getattr(torch, str(data["dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown cache dtype {data['dtype']!r}")
        window = data.get("sliding_window")
        return cls(tuple((int(h), int(d)) for h, d in data["keys"]), tuple((int(h), int(d)) for h, d in data["values"]),
                   dtype, int(window) if window else None)

    def to_dict(self) -> dict[str, Any]:
        return {"keys": [list(k) for k in self.keys], "values": [list(v) for v in self.values],
                "dtype": str(self.dtype).replace("torch.", ""), "sliding_window": self.sliding_window}


def cache_argument(model: torch.nn.Module) -> str:
    """The name the model's forward takes its KV cache under (``cache`` in newer transformers)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def takes_logits_to_keep(model: torch.nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def read_cache_layout(model: torch.nn.Module) -> CacheLayout:
    """Run the model once on two tokens with a dynamic cache and read the cache's shapes."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    ids = torch.zeros(1, 2, dtype=torch.long, device=device)
    cache = DynamicCache(config=model.config)
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=True, **{cache_argument(model): cache})
    except Exception as e:  # the model's own code fails: say so, not where in graphopt it surfaced
        raise BadInput(f"{type(model).__name__} fails on a 2-token prompt with a KV cache ({type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''}); check that model(input_ids, use_cache=True) "
                       "runs on its config") from e
    keys, values, dtype = [], [], None
    from transformers import cache_utils

    # a recurrent state (Mamba) has no keys; a hybrid layer (Falcon-H1) has keys beside a convolution state
    recurrent = getattr(cache_utils, "LinearAttentionCacheLayerMixin", ())
    other = next((layer for layer in cache.layers if isinstance(layer, recurrent)
                  or not isinstance(getattr(layer, "keys", None), torch.Tensor)
                  or not isinstance(getattr(layer, "values", None), torch.Tensor)), None)
    if other is not None:
        raise BadInput(f"{type(model).__name__} keeps a {type(other).__name__} in its cache (a recurrent or "
                       "state-space state, not only attention keys and values); graphopt's generation graphs are built "
                       "on a KV cache only: generate it with model.generate, or optimize its forward with "
                       "graphopt.optimize")
    for layer in cache.layers:
        k, v = layer.keys, layer.values
        keys.append((int(k.shape[1]), int(k.shape[3])))
        values.append((int(v.shape[1]), int(v.shape[3])))
        dtype = k.dtype
    if not keys:
        raise ValueError(f"{type(model).__name__} filled no KV cache layers; it cannot be generated with a cache")
    window = attention_window(model.config)
    return CacheLayout(tuple(keys), tuple(values), dtype, window)


#: the names configs give a local-attention window (Mistral, Gemma 2/3, Qwen2 ...: sliding_window; GPT-Neo:
#: window_size; RecurrentGemma: attention_window_size)
WINDOW_NAMES = ("sliding_window", "window_size", "attention_window_size")


def attention_window(config: Any) -> int | None:
    """The smallest local-attention window the config names (None: no window).

    Within its window a local layer over a static cache is a full one (what
    the step relies on); past it transformers' layers differ (GPT-Neo's
    local mask is taken at the cache's allocated length), so generation is
    capped at the window.
    """
    windows = [int(v) for name in WINDOW_NAMES
               if isinstance(v := getattr(config, name, None), int) and not isinstance(v, bool) and v > 0]
    return min(windows) if windows else None


class CausalLMStep(torch.nn.Module):
    """``step(input_ids, attention_mask, position_ids, cache_position, cache) -> last logits``.

    * ``input_ids`` ``[batch, tokens]`` -- the prompt (prefill) or one token per row (decode);
    * ``attention_mask`` ``[batch, cache_len]`` -- 1 where a cache position holds a real token
      (the new ones included), 0 for padding and for positions not written yet;
    * ``position_ids`` ``[batch, tokens]`` -- each token's position in its own sequence;
    * ``cache_position`` -- a 0-d int64 tensor: the cache index the first new token is written at;
    * ``cache`` -- the list :meth:`CacheLayout.allocate` returns; written in place.

    Returns logits ``[batch, 1, vocab]`` for the last token.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self._cache_arg = cache_argument(model)
        self._keep = takes_logits_to_keep(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                cache_position: torch.Tensor, cache: list[torch.Tensor]) -> torch.Tensor:
        static = self._static_cache(cache, cache_position)
        kwargs: dict[str, Any] = {self._cache_arg: static, "use_cache": True}
        if self._keep:
            kwargs["logits_to_keep"] = 1
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        logits = out.logits if hasattr(out, "logits") else out[0]
        return logits[:, -1:, :]

    def _static_cache(self, cache: list[torch.Tensor], cache_position: torch.Tensor) -> Any:
        from transformers import StaticCache
        from transformers.cache_utils import StaticLayer

        length = cache[0].shape[2]
        static = StaticCache(config=self.model.config, max_cache_len=length)
        layers = []
        for i in range(len(cache) // 2):
            layer = StaticLayer(max_cache_len=length)  # within the window a sliding layer is a full one
            layer.keys, layer.values = cache[2 * i], cache[2 * i + 1]
            layer.device = cache[2 * i].device
            layer.cumulative_length = cache_position.clone()  # the layer advances its own copy
            layer.is_initialized = True
            layers.append(layer)
        static.layers = layers
        return static
