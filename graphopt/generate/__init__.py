"""Generation for causal LMs: a static KV cache, prefill and decode graphs, the generation loop.

* :mod:`.step` -- the step graphopt captures (:class:`CausalLMStep`) and the cache layout;
* :mod:`.build` -- the two graphs through graphopt's pipeline, checked (:func:`prepare_generation`);
* :mod:`.end_to_end` -- the pair against its budget end to end: the re-plan rule, the notes;
* :mod:`.loop` -- prefill then decode, greedy or sampled, left-padded batches (:func:`run_generation`);
* :mod:`.sampling` -- temperature / top-k / top-p.
"""

from graphopt.generate.build import (
    GenerationCheckError,
    GenerationGraphs,
    StepCheck,
    check_steps,
    is_causal_lm,
    prepare_generation,
)
from graphopt.generate.loop import GenerationTimes, run_generation
from graphopt.generate.sampling import Sampling
from graphopt.generate.step import CacheLayout, CausalLMStep, read_cache_layout

__all__ = [
    "CacheLayout",
    "CausalLMStep",
    "GenerationCheckError",
    "GenerationGraphs",
    "GenerationTimes",
    "Sampling",
    "StepCheck",
    "check_steps",
    "is_causal_lm",
    "prepare_generation",
    "read_cache_layout",
    "run_generation",
]
