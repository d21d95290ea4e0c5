"""Does the static-cache step reproduce the model? Checked once, before anything is optimized.

Every generation graph is verified against :class:`~graphopt.generate.step.CausalLMStep`
run eagerly, which reads transformers' ``StaticCache``. That reference is only
as right as the architecture's support for a static cache: GPT-Neo's local
attention slices its window mask at the cache's *allocated* length, not at the
token's position, so over a cache longer than the window its decode steps
attend to the wrong keys (transformers' own ``generate(cache_implementation=
"static")`` gives other tokens than its default dynamic cache). Optimized
graphs that equal such a step would pass every later check and still generate
wrong tokens.

:func:`static_cache_error` compares the eager step, prompt then decode steps
over a cache longer than what they fill (as the generation loop allocates it),
with the model's own forward over the whole sequence without any cache: the
logits ``model.generate`` is built on. The build refuses a model where they
differ (:func:`require_static_cache`). A model with a local-attention window
is checked once more past its window (:func:`window_cap`): where it holds
there (Mistral, Gemma 2/3: transformers' mask code applies the window over a
full cache), the graphs take the whole position table; where it misses
(GPT-Neo), generation is capped at the window.
"""

from __future__ import annotations

import torch

from graphopt.errors import BadInput
from graphopt.generate.loop import prefill_view, prompt_positions
from graphopt.generate.step import CacheLayout, CausalLMStep
from graphopt.verify import REDUCED_FLOATS, REL_L2_TOLERANCE

#: decode steps the check runs after its prompt (each over the full-length cache)
CHECK_DECODE_STEPS = 8
#: rows of the check (no padding: padding is the loop's business, tested against transformers' generate)
CHECK_ROWS = 2


def exact_rel_l2(dtype: torch.dtype) -> float:
    """The relative L2 two exact runs of a generation may differ by: 10x the dtype's per-output tolerance at
    fp32 (another summation order, compounded over the steps through the cache); 3x for a bf16/fp16 model (its
    own roundings already fill most of the tolerance)."""
    return REL_L2_TOLERANCE.get(dtype, 1e-5) * (3 if dtype in REDUCED_FLOATS else 10)


def static_cache_error(model: torch.nn.Module, layout: CacheLayout, length: int, seed: int = 11) -> float:
    """Relative L2 of the static-cache step's logits against the model's forward without a cache.

    A prompt of ``length - CHECK_DECODE_STEPS`` tokens is prefilled into a
    cache of ``length`` positions, then the next tokens are decoded one at a
    time (teacher-forced); their logits are compared with those of one forward
    of all ``length`` tokens (fewer decode steps where ``length`` is under ``CHECK_DECODE_STEPS + 2``).
    """
    if length < 3:
        raise ValueError(f"length {length} is too short for the static-cache check (>= 3)")
    prompt = length - min(CHECK_DECODE_STEPS, length - 2)
    device = next(model.parameters()).device
    ids = torch.randint(0, int(model.config.vocab_size), (CHECK_ROWS, length),
                        generator=torch.Generator().manual_seed(seed)).to(device)
    step = CausalLMStep(model)
    mask = torch.zeros(CHECK_ROWS, length, dtype=torch.long, device=device)  # 1: written (the new token too)
    mask[:, :prompt] = 1
    positions = prompt_positions(torch.ones_like(mask))
    cache = layout.allocate(CHECK_ROWS, length, device)
    got = []
    with torch.no_grad():
        reference = model(input_ids=ids, use_cache=False).logits[:, prompt - 1:].float()
        view, view_mask = prefill_view(cache, mask, prompt)
        got.append(step(ids[:, :prompt], view_mask, positions[:, :prompt], torch.tensor(0, device=device), view))
        for i in range(prompt, length):
            mask[:, i] = 1
            got.append(step(ids[:, i:i + 1], mask, positions[:, i:i + 1], torch.tensor(i, device=device), cache))
    logits = torch.cat(got, dim=1).float()
    return float((logits - reference).norm() / reference.norm().clamp_min(1e-30))


def require_static_cache(model: torch.nn.Module, layout: CacheLayout, length: int) -> None:
    """Raise :class:`~graphopt.errors.BadInput` where the static-cache step misses the model's own logits at
    ``length`` positions (more than :func:`exact_rel_l2` allows)."""
    tolerance = exact_rel_l2(layout.dtype)
    error = static_cache_error(model, layout, length)
    if not error <= tolerance:
        raise BadInput(f"{type(model).__name__} over a static KV cache gives other logits than its own forward "
                       f"without a cache (relative L2 {error:.2e} > {tolerance:g} at {length} positions): "
                       "transformers' StaticCache does not reproduce this architecture's attention, so its "
                       "generation graphs would generate other tokens; generate it with model.generate, or try a "
                       "shorter max_length")


def window_cap(model: torch.nn.Module, layout: CacheLayout, length: int) -> tuple[int, str | None]:
    """``(length, None)`` where the static-cache step holds past the model's local-attention window (or it has
    none, or ``length`` is within it); ``(window, why)`` where it misses there.

    The check runs a prompt past the window and :data:`CHECK_DECODE_STEPS` decode steps after it.
    """
    window = layout.sliding_window
    if window is None or length <= window:
        return length, None
    probe = min(length, window + CHECK_DECODE_STEPS + 2)
    error = static_cache_error(model, layout, probe)
    if error <= exact_rel_l2(layout.dtype):
        return length, None
    return window, (f"prompt + generation capped at the {window}-token attention window: past it the static KV "
                    f"cache misses {type(model).__name__}'s own logits (relative L2 {error:.2e} at {probe} "
                    "positions), so longer generations would give other tokens")
