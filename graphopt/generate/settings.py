"""What one ``generate()`` call asks for, resolved the way transformers' ``model.generate`` resolves it.

Existing code calling ``model.generate(...)`` should change one line, so a
graphopt generate takes the same settings with the same precedence:

1. transformers' own defaults (:data:`TRANSFORMERS_DEFAULTS`: greedy, no
   repetition penalty, and when sampling ``temperature=1``, ``top_k=50``, ``top_p=1``);
2. the model's ``generation_config`` (kept with the graphs and in a bundle:
   a checkpoint that ships ``do_sample=True, top_p=0.9`` samples so here too);
3. a ``generation_config=`` passed to the call;
4. the call's own keyword arguments (``None`` is "not set", as in transformers).

The length: ``max_new_tokens``, else ``max_length`` (prompt included), from
the call, its ``generation_config``, then the model's; where none sets one,
:data:`DEFAULT_NEW_TOKENS` new tokens (transformers' own fallback is a total
``max_length`` of 20, which it warns about).

Applied: sampling or greedy, ``temperature``, ``top_k``, ``top_p``, ``min_p``
and ``repetition_penalty`` (:class:`~graphopt.generate.sampling.Sampling`).
transformers' settings that graphopt does not apply (beam search, n-gram and
encoder penalties, minimum lengths, score outputs: :data:`NOT_APPLIED`) are accepted
at the value that turns them off. Given another value in the call they are
refused (:class:`UnsupportedSetting`); set so in the model's generation
config they are not applied and :attr:`GenerationRequest.not_applied` says
which (the loop logs it), since refusing would break every plain call for
that model. Settings without effect here (every run uses its KV cache:
``use_cache``, ``cache_implementation``) are accepted and ignored.

Written here rather than through ``transformers.GenerationConfig`` because a
generation bundle runs where transformers is not installed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from graphopt.errors import BadInput
from graphopt.generate.sampling import Sampling

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_NEW_TOKENS", "GenerationRequest", "NOT_APPLIED", "TRANSFORMERS_DEFAULTS", "UnsupportedSetting",
           "generation_defaults", "given_settings", "prompt_length", "request_for", "resolve_request",
           "warn_not_applied"]

#: new tokens where neither the call nor a generation config sets a length
DEFAULT_NEW_TOKENS = 20
#: transformers' ``GenerationConfig`` defaults for the settings graphopt applies
TRANSFORMERS_DEFAULTS: dict[str, Any] = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
                                         "repetition_penalty": 1.0}
#: transformers' settings graphopt does not apply, each with the value(s) that turn it off
NOT_APPLIED: dict[str, tuple[Any, ...]] = {
    "num_beams": (1,), "num_beam_groups": (1,), "num_return_sequences": (1,), "penalty_alpha": (0.0,),
    "encoder_repetition_penalty": (1.0,), "no_repeat_ngram_size": (0,),
    "diversity_penalty": (0.0,), "min_length": (0,), "min_new_tokens": (0,), "typical_p": (1.0,),
    "epsilon_cutoff": (0.0,), "eta_cutoff": (0.0,), "top_h": (), "bad_words_ids": (),
    "suppress_tokens": (), "begin_suppress_tokens": (), "sequence_bias": (), "forced_bos_token_id": (),
    "forced_eos_token_id": (), "force_words_ids": (), "constraints": (), "exponential_decay_length_penalty": (),
    "output_scores": (False,), "output_logits": (False,), "output_attentions": (False,),
    "output_hidden_states": (False,), "return_dict_in_generate": (False,), "stop_strings": (),
    "logits_processor": (), "stopping_criteria": (), "prefix_allowed_tokens_fn": (), "assistant_model": (),
    "prompt_lookup_num_tokens": (), "negative_prompt_ids": (), "guidance_scale": (1.0,), "watermarking_config": (),
    "renormalize_logits": (False,), "remove_invalid_values": (False,),
}
#: accepted, without effect here: every run decodes through its own KV cache, in one sequence per row
WITHOUT_EFFECT = frozenset({"use_cache", "cache_implementation", "cache_config", "early_stopping", "length_penalty",
                            "synced_gpus", "low_memory", "bos_token_id", "decoder_start_token_id",
                            "max_time", "compile_config", "disable_compile", "tokenizer"})
_APPLIED = ("do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "max_new_tokens",
            "max_length", "eos_token_id", "pad_token_id")


class UnsupportedSetting(BadInput, ValueError):
    """A transformers generate setting graphopt does not apply, given a value that would need it."""


@dataclass(frozen=True)
class GenerationRequest:
    """One call's settings, resolved."""

    max_new_tokens: Any
    sampling: Sampling
    eos_token_id: Any = None
    pad_token_id: Any = None
    #: the model's generation-config settings this run does not apply (name=value)
    not_applied: tuple[str, ...] = ()


def given_settings(named: Mapping[str, Any], extra: Mapping[str, Any], unset: Any = None) -> dict[str, Any]:
    """The settings a call gave: its named arguments other than ``unset``, then the other keyword arguments."""
    return {**{k: v for k, v in named.items() if v is not unset}, **extra}


def generation_defaults(config: Any) -> dict[str, Any]:
    """The settings a model's ``generation_config`` (or a dict of one) sets: its non-None plain values."""
    if config is None:
        return {}
    if isinstance(config, Mapping):
        items = config.items()
    elif callable(getattr(config, "to_dict", None)):
        items = config.to_dict().items()
    else:
        raise BadInput(f"generation_config must be a transformers GenerationConfig or a dict of its settings "
                       f"(got {type(config).__name__})")
    plain = (bool, int, float, str, list, tuple)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in items
            if v is not None and isinstance(v, plain) and not k.startswith("_") and k != "transformers_version"}


def _is_off(name: str, value: Any) -> bool:
    return value is None or value in NOT_APPLIED[name] or (isinstance(value, (list, tuple, dict)) and not value)


def resolve_request(call: dict[str, Any], model_defaults: Mapping[str, Any], prompt_length: int,
                    eos_token_id: Any = None, pad_token_id: Any = None) -> GenerationRequest:
    """The call's :class:`GenerationRequest`.

    ``call``: the keyword arguments given (``generation_config`` among them; an
    ``eos_token_id`` of None there means no end token, as in transformers);
    ``model_defaults``: :func:`generation_defaults` of the model's config;
    ``eos_token_id`` / ``pad_token_id``: the model's, where the call sets none.
    Raises ``TypeError`` for a name transformers does not know either, and
    :class:`UnsupportedSetting` for a setting in the call that graphopt does not apply.
    """
    call = dict(call)
    passed = generation_defaults(call.pop("generation_config", None))
    unknown = sorted(k for k in call if k not in NOT_APPLIED and k not in WITHOUT_EFFECT and k not in _APPLIED)
    if unknown:
        raise TypeError(f"generate() got an unexpected keyword argument {unknown[0]!r}")
    for source in (passed, call):
        bad = next((k for k, v in source.items() if k in NOT_APPLIED and not _is_off(k, v)), None)
        if bad is not None:
            raise UnsupportedSetting(f"{bad}={source[bad]!r} is not applied by graphopt's generate (greedy and "
                                     "sampling with temperature, top_k, top_p, min_p and repetition_penalty "
                                     "only); leave it out, or use the "
                                     "original model's generate for it")
    not_applied = tuple(f"{k}={v!r}" for k, v in model_defaults.items() if k in NOT_APPLIED and not _is_off(k, v))
    layers = [TRANSFORMERS_DEFAULTS, model_defaults, passed, {k: v for k, v in call.items() if v is not None}]

    def setting(name: str) -> Any:
        return next((layer[name] for layer in reversed(layers) if layer.get(name) is not None), None)

    sampling = Sampling(bool(setting("do_sample")), setting("temperature"), setting("top_k"),
                        None if setting("top_p") == 1.0 else setting("top_p"), setting("repetition_penalty"),
                        setting("min_p"))
    eos = call["eos_token_id"] if "eos_token_id" in call else passed.get("eos_token_id", eos_token_id)
    pad = next((v for v in (call.get("pad_token_id"), passed.get("pad_token_id")) if v is not None), pad_token_id)
    return GenerationRequest(_new_tokens(layers[1:], prompt_length), sampling, eos, pad, not_applied)


def _new_tokens(layers: list[Mapping[str, Any]], prompt_length: int) -> Any:
    """``max_new_tokens`` from the nearest layer that sets a length (``max_length`` counts the prompt)."""
    for layer in reversed(layers):
        if layer.get("max_new_tokens") is not None:
            return layer["max_new_tokens"]
        if layer.get("max_length") is not None:
            total = layer["max_length"]
            if isinstance(total, bool) or not isinstance(total, int):
                raise BadInput(f"max_length must be a whole number (got {total!r})")
            if total <= prompt_length:
                raise BadInput(f"max_length={total} leaves no room after the {prompt_length}-token prompt; "
                               "give max_new_tokens, or a max_length above the prompt's length")
            return total - prompt_length
    return DEFAULT_NEW_TOKENS


def prompt_length(input_ids: Any) -> int:
    """The prompt's length (0 for what is not a token tensor: the loop refuses that with its own message)."""
    shape = getattr(input_ids, "shape", None)
    return int(shape[-1]) if shape is not None and len(shape) >= 1 else 0


def warn_not_applied(request: GenerationRequest, notes: list[str]) -> None:
    """Log, once per ``notes`` list (the graphs'), the model's generation-config settings a run does not apply."""
    if not request.not_applied:
        return
    note = (f"generate: the model's generation config sets {', '.join(request.not_applied)}, which graphopt's "
            "generate does not apply; tokens can differ from model.generate")
    if note not in notes:
        notes.append(note)
        log.warning("%s", note)


def request_for(owner: Any, input_ids: Any, named: Mapping[str, Any], settings: Mapping[str, Any],
                eos_token_id: Any, eos_unset: Any) -> GenerationRequest:
    """The :class:`GenerationRequest` of one ``owner.generate(...)`` call (the graphs, or a loaded bundle: their
    ``generation_defaults``, ``eos_token_id``, ``pad_token_id`` and ``notes``), its unapplied settings noted.

    ``named``: the call's named settings (None: not set); ``eos_token_id`` is set unless it is ``eos_unset``
    (None included: no end token)."""
    call = given_settings(named, settings)
    if eos_token_id is not eos_unset:
        call["eos_token_id"] = eos_token_id
    request = resolve_request(call, owner.generation_defaults, prompt_length(input_ids), owner.eos_token_id,
                              owner.pad_token_id)
    warn_not_applied(request, owner.notes)
    return request
