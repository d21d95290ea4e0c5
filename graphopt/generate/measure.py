"""Timing a generate call the same way for any implementation: a streamer that notes when each token arrives.

transformers' ``model.generate`` and graphopt's ``generate`` both hand the
prompt, then each new token column, to a streamer's ``put``. The time from the
prompt to the first new token is the prefill (with the first token's
sampling); the mean gap between later tokens is one decode step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


class TimingStreamer:
    """A transformers-style streamer (``put`` / ``end``) that records arrival times."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@dataclass(frozen=True)
class GenerationFigures:
    """One timed generate call: prefill ms, decode ms per step, decode tokens/s (per row), the tokens."""

    prefill_ms: float
    decode_ms: float
    new_tokens: int
    batch: int
    tokens: torch.Tensor

    @property
    def decode_tokens_per_s(self) -> float:
        """Decode steps per second (each step gives every row one token)."""
        return 1e3 / self.decode_ms if self.decode_ms > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"prefill_ms": round(self.prefill_ms, 3), "decode_ms_per_token": round(self.decode_ms, 3),
                "decode_tokens_per_s": round(self.decode_tokens_per_s, 2), "new_tokens": self.new_tokens,
                "batch": self.batch}


def time_generation(generate: Callable[..., torch.Tensor], input_ids: torch.Tensor,
                    attention_mask: torch.Tensor | None, new_tokens: int, **kwargs: Any) -> GenerationFigures:
    """Run ``generate(input_ids, attention_mask=..., max_new_tokens=..., streamer=...)`` once, timed per token.

    ``generate`` is either ``model.generate`` (transformers) or graphopt's;
    ``kwargs`` go to it (``do_sample=False``, ``eos_token_id=None`` ...).
    """
    streamer = TimingStreamer()
    with torch.no_grad():
        tokens = generate(input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens, streamer=streamer,
                          **kwargs)
    times = streamer.times
    if len(times) < 3:
        raise ValueError("too few tokens to time a decode step; generate at least 2 new tokens without an end token")
    prefill = (times[1] - times[0]) * 1e3
    decode = (times[-1] - times[1]) * 1e3 / (len(times) - 2)
    return GenerationFigures(prefill, decode, len(times) - 1, int(input_ids.shape[0]), tokens)
