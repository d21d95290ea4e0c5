"""The generation loop: prefill the prompt into a static KV cache, then decode one token per step.

Works with any pair of callables shaped like :class:`~graphopt.generate.step.CausalLMStep`
(the eager step, the optimized graphs, or graphs loaded from a bundle), so the
same loop serves the reference run and the optimized one.
"""

from __future__ import annotations

import logging
import operator
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from graphopt.errors import BadInput
from graphopt.generate.sampling import Sampling
from graphopt.generate.step import CacheLayout

log = logging.getLogger(__name__)

Step = Callable[..., torch.Tensor]


@dataclass
class GenerationTimes:
    """Wall time of the last generate call: prefill, and each decode step."""

    prefill_s: float = 0.0
    decode_s: list[float] = field(default_factory=list)

    @property
    def decode_tokens_per_s(self) -> float:
        return len(self.decode_s) / sum(self.decode_s) if self.decode_s else 0.0


def prompt_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded prompt, as transformers computes them (pads get position 1)."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


def weights_device(module: Any) -> torch.device | None:
    """The device of ``module``'s first parameter or buffer (None: it holds none, or is not a module)."""
    if not isinstance(module, torch.nn.Module):
        return None
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return None


def check_ids_device(input_ids: torch.Tensor, device: torch.device | None) -> None:
    """BadInput when ``input_ids`` are not on ``device`` (the graphs' weights; None: unchecked)."""
    if device is None or input_ids.device.type == device.type and (
            input_ids.device.index is None or device.index is None or input_ids.device.index == device.index):
        return
    raise BadInput(f"input_ids are on {input_ids.device} but the model's weights on {device}; "
                   f"move them with input_ids.to({str(device)!r}) (and the attention_mask with them)")


def check_prompt(input_ids: Any, attention_mask: Any,
                 vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt and its mask, checked: 2-D integer ids (within ``[0, vocab_size)`` when given), a 0/1 mask of
    the same shape, padding on the left."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype.is_floating_point:
        raise BadInput("input_ids must be an integer tensor of token ids, shaped (batch, prompt_length)")
    if input_ids.device.type == "meta":
        raise BadInput("input_ids are on the meta device (shapes without values); give real token ids")
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise BadInput(f"input_ids must be shaped (batch, prompt_length) with a non-empty prompt; "
                       f"got {tuple(input_ids.shape)}")
    if vocab_size is not None and bool(((input_ids < 0) | (input_ids >= vocab_size)).any()):
        bad = input_ids[(input_ids < 0) | (input_ids >= vocab_size)]
        raise BadInput(f"input_ids hold {bad.numel()} token id(s) outside the model's vocabulary [0, {vocab_size}) "
                       f"(e.g. {int(bad[0])}); check that the tokenizer is the model's")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if not isinstance(attention_mask, torch.Tensor):
        raise BadInput("attention_mask must be a tensor of 0 (padding) and 1 (token), shaped like input_ids")
    if attention_mask.device != input_ids.device:
        raise BadInput(f"attention_mask is on {attention_mask.device} but input_ids on {input_ids.device}; "
                       "put both on the device the model runs on")
    if attention_mask.ndim == 1:
        attention_mask = attention_mask[None]
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise BadInput(f"attention_mask {tuple(attention_mask.shape)} must have input_ids' shape "
                       f"{tuple(input_ids.shape)}")
    mask = attention_mask.long()
    if bool(((mask != 0) & (mask != 1)).any()):
        raise BadInput("attention_mask must hold only 0 (padding) and 1 (token)")
    if bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise BadInput("the prompt is padded on the right; pad on the left for generation "
                       "(tokenizer.padding_side = 'left')")
    if bool((mask.sum(-1) == 0).any()):
        raise BadInput("a row of the batch has no token (its attention_mask is all 0)")
    return input_ids, mask


#: the shortest cache the prefill graph takes (its ``cache_len`` axis starts there)
MIN_CACHE_VIEW = 4


def prefill_view(cache: list[torch.Tensor], mask: torch.Tensor,
                 prompt: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The cache and mask the prefill reads: only the prompt's positions (views, written through).

    Positions after the prompt are empty during prefill; attending over the
    whole allocated cache (prompt + every token still to come) with a mask
    costs time that grows with ``max_new_tokens``. The views share storage
    with ``cache``, so the prefill's in-place writes land in the full cache.
    """
    length = min(max(prompt, MIN_CACHE_VIEW), mask.shape[1])
    return [c[:, :, :length] for c in cache], mask[:, :length]


class _StepInputs:
    """Each decode step's mask, positions and cache position, made before the loop.

    Between two decode calls the loop runs only a few small ops; after a
    step that streamed the weights through the caches each costs about 10 us
    on CPU (2-3 us when warm), so the per-step tensors are made up front:
    one 0-d cache position and one ``[batch, 1]`` position column per step,
    and a view of each mask column, filled in place (``fill_``) as the step
    reaches it. Measured on the benchmark Llama (int8 weight-only, decode
    compiled ahead of time): 0.17 of 1.67 ms between tokens were outside the
    decode call before.
    """

    def __init__(self, last_positions: torch.Tensor, mask: torch.Tensor, prompt: int, steps: int) -> None:
        device = mask.device
        self.mask = mask
        offsets = torch.arange(1, steps + 1, device=device)
        self.positions = (last_positions + offsets).T.contiguous()[:, :, None].unbind(0)
        self.cache_positions = torch.arange(prompt, prompt + steps, device=device).unbind(0)
        self.columns = mask[:, prompt:prompt + steps].unbind(1)

    def at(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Step ``i``'s ``(mask, positions, cache_position)``, its new token's mask column set."""
        self.columns[i].fill_(1)
        return self.mask, self.positions[i], self.cache_positions[i]


def _eos_set(eos_token_id: int | Sequence[int] | None) -> torch.Tensor | None:
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return torch.tensor(ids, dtype=torch.long) if ids else None


def _stream(streamer: Any, tokens: torch.Tensor) -> None:
    if streamer is None:
        return
    if hasattr(streamer, "put"):  # transformers' streamers
        streamer.put(tokens.cpu())
    else:
        streamer(tokens)


def _token_count(max_new_tokens: Any) -> int:
    """``max_new_tokens`` as an int >= 1 (an integral number of any kind); BadInput otherwise."""
    try:
        count = operator.index(max_new_tokens) if not isinstance(max_new_tokens, bool) else None
    except TypeError:
        count = None
    if count is None or count < 1:
        raise BadInput(f"max_new_tokens must be a whole number >= 1 (got {max_new_tokens!r})")
    return count


def run_generation(
    prefill: Step, decode: Step, layout: CacheLayout, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
    *, max_new_tokens: int, sampling: Sampling, eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None, streamer: Any = None, generator: torch.Generator | None = None,
    max_length: int | None = None, max_batch: int | None = None, vocab_size: int | None = None,
    times: GenerationTimes | None = None, device: torch.device | None = None,
) -> torch.Tensor:
    """Generate up to ``max_new_tokens`` after each prompt; returns ``[batch, prompt + generated]``.

    Rows that reach an end token keep going with ``pad_token_id`` (the end
    token when none is given) until every row has ended, as transformers does.
    ``max_length``, ``max_batch``, ``vocab_size`` and ``device`` (where the
    graphs' weights are) are the graphs' limits when given, checked before any work.
    """
    input_ids, mask = check_prompt(input_ids, attention_mask, vocab_size)
    check_ids_device(input_ids, device)
    max_new_tokens = _token_count(max_new_tokens)
    batch, prompt = input_ids.shape
    if max_batch is not None and batch > max_batch:
        raise BadInput(f"a batch of {batch} rows exceeds the {max_batch} this model was prepared for; "
                       f"prepare it with max_batch={batch} (or more), or generate in smaller batches")
    length = prompt + max_new_tokens
    if max_length is not None and length > max_length:
        raise BadInput(f"prompt {prompt} + max_new_tokens {max_new_tokens} = {length} tokens exceeds the "
                       f"{max_length} this model was prepared for; shorten the prompt or generate fewer tokens")
    device = input_ids.device
    eos = _eos_set(eos_token_id)
    pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if eos is not None else 0)
    # a decode step that owns its caches (CUDA graphs replay fixed addresses) allocates them; it may round up
    allocate = getattr(decode, "allocate", None) or layout.allocate
    cache = allocate(batch, length, device)
    full_mask = torch.zeros(batch, cache[0].shape[2], dtype=torch.long, device=device)
    full_mask[:, :prompt] = mask
    times = times if times is not None else GenerationTimes()
    times.prefill_s, times.decode_s = 0.0, []
    if streamer is not None and hasattr(streamer, "put"):
        streamer.put(input_ids.cpu())
    t0 = time.perf_counter()
    with torch.no_grad():
        view = prefill_view(cache, full_mask, prompt)
        logits = prefill(input_ids, view[1], prompt_positions(mask), torch.tensor(0, device=device), view[0])
    times.prefill_s = time.perf_counter() - t0
    steps = _StepInputs(prompt_positions(mask)[:, -1:], full_mask, prompt, max_new_tokens - 1)
    unfinished = torch.ones(batch, 1, dtype=torch.bool, device=device)
    pad_column = torch.full((batch, 1), pad, dtype=torch.long, device=device)
    eos = eos.to(device) if eos is not None else None
    out = [input_ids]
    seen = sampling.seen_tokens(input_ids, mask, logits.shape[-1])  # None without a repetition penalty
    with torch.no_grad():
        for i in range(max_new_tokens):
            if logits.shape[1] != 1:  # a step that returns every position's logits
                logits = logits[:, -1:]
            token = sampling.next_tokens(logits, generator, seen)  # [batch, 1]
            if eos is not None:
                token = torch.where(unfinished, token, pad_column)
            out.append(token)
            if seen is not None:
                seen.scatter_(1, token, True)
            if streamer is not None:
                _stream(streamer, token[:, 0])
            if eos is not None:
                unfinished &= ~torch.isin(token, eos)
                if not bool(unfinished.any()):
                    break
            if i == max_new_tokens - 1:
                break
            step_mask, positions, cache_position = steps.at(i)
            t0 = time.perf_counter()
            logits = decode(token, step_mask, positions, cache_position, cache)
            times.decode_s.append(time.perf_counter() - t0)
    if streamer is not None and hasattr(streamer, "end"):
        streamer.end()
    return torch.cat(out, dim=1)
