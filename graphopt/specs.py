"""Model specs: how every CLI command names the model to work on.

Three forms:

* ``path/to/model.pt2`` -- an ExportedProgram saved with ``torch.export.save``;
  its example inputs are the ones saved with it.
* ``package.module:factory`` (or ``path/to/file.py:factory``) -- a callable
  returning ``(model, example_args)`` or ``(model, example_args, example_kwargs)``.
* ``hf:<model_type>?key=value&...`` -- a Hugging Face transformers model built
  from its config with random weights (never a download). Keys override the
  config (``n_layer=2``); ``batch=`` and ``seq=`` size the example input
  (default 1 x 64); ``task=`` picks the head (``causal-lm``, ``masked-lm``,
  ``base``, default: causal-lm where the family has one and is not an
  encoder, else base); ``mask=1`` adds an all-ones ``attention_mask``;
  ``seed=`` the weight seed. Eager attention and no KV cache by default.

Also built in: ``examples:<name>`` for graphopt's own example models
(``nanogpt``, ``cnn``, ``mlp``) -- see :mod:`graphopt.examples_models`.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import inspect
import logging
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import torch

from graphopt import examples_models
from graphopt.errors import BadInput
from graphopt.program_file import UnsafeProgramFile, load_exported_program

log = logging.getLogger(__name__)


class SpecError(BadInput, ValueError):
    """A model spec that cannot be read or built; the message says what to do."""


@dataclass
class ModelSpec:
    """A model with its example inputs, built from a spec string."""

    name: str
    model: torch.nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    exported_program: torch.export.ExportedProgram | None = None


def parse_value(text: str) -> Any:
    """A ``key=value`` option's value: a bool, None, an int, a float, or the text itself."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _hf(spec: str) -> ModelSpec:
    body = spec[3:]
    model_type, _, query = body.partition("?")
    if not model_type:
        raise SpecError(f"{spec!r}: name a model type after 'hf:', e.g. 'hf:gpt2?n_layer=2'")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError as exc:
        raise SpecError(f"{spec!r}: malformed options after '?' ({exc}); write them as key=value&key=value") from exc
    opts = {k: parse_value(v) for k, v in pairs}
    try:
        import transformers
    except ImportError as exc:
        raise SpecError("hf: specs need transformers; install it with `pip install transformers`") from exc
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    seq_given = "seq" in opts
    batch, seq = _positive(spec, opts, "batch", 1), _positive(spec, opts, "seq", 64)
    task = str(opts.pop("task", "auto"))
    with_mask = bool(opts.pop("mask", False))
    seed = _positive(spec, opts, "seed", 0, minimum=0)
    opts.setdefault("use_cache", False)
    attn = opts.pop("attn_implementation", "eager")
    try:
        config = AutoConfig.for_model(model_type, **opts)
    except ValueError as exc:
        if model_type in str(exc) and "Unrecognized" in str(exc):
            known = ", ".join(sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)[:12])
            raise SpecError(f"unknown transformers model type {model_type!r}; try one of {known}, ...") from exc
        raise SpecError(f"{spec!r}: invalid config ({exc})") from exc
    except Exception as exc:  # transformers' strict dataclass validation (wrong value types)
        detail = " ".join(str(exc).split())
        raise SpecError(f"{spec!r}: invalid config value ({detail}); fix the value after '?'") from exc
    seq = _check_config(spec, config, opts, seq, seq_given)
    _fit_head_count(config, opts)
    if task == "auto":
        task = ("causal-lm" if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
                and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES else "base")
    factories = {"causal-lm": AutoModelForCausalLM, "masked-lm": AutoModelForMaskedLM, "base": AutoModel}
    if task not in factories:
        raise SpecError(f"{spec!r}: task={task!r} is not one of {sorted(factories)}")
    torch.manual_seed(seed)
    try:
        model = factories[task].from_config(config, attn_implementation=attn)
    except Exception as exc:
        raise SpecError(f"could not build {model_type!r} ({task}) from its config: {exc}") from exc
    model.eval()
    vocab = int(getattr(config, "vocab_size", 1000) or 1000)
    gen = torch.Generator().manual_seed(seed + 1)
    kwargs: dict[str, Any] = {}
    if with_mask:
        kwargs["attention_mask"] = torch.ones(batch, seq, dtype=torch.long)
    args = (torch.randint(0, vocab, (batch, seq), generator=gen),)
    _ = transformers
    return ModelSpec(f"{type(model).__name__}({model_type})", model, args, kwargs)


def _positive(spec: str, opts: dict[str, Any], key: str, default: int, minimum: int = 1) -> int:
    """Pop ``key`` from ``opts`` as an integer >= ``minimum``, or raise a one-line SpecError."""
    value = opts.pop(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SpecError(f"{spec!r}: {key}={value!r} must be an integer >= {minimum}")
    return value


def _check_config(spec: str, config: Any, opts: dict[str, Any], seq: int, seq_given: bool) -> int:
    """Refuse unknown config keys (with a close match), non-positive sizes and a given seq beyond max positions;
    the sequence length (the default one capped at the model's max positions)."""
    default = type(config)()  # a default config: the instance keeps unknown kwargs as attributes
    known = set(default.to_dict()) | set(getattr(config, "attribute_map", {})) | _init_keywords(type(config))
    for key, value in opts.items():
        if key not in known and key not in ("use_cache",):
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "; see the model's config class for valid keys"
            raise SpecError(f"{spec!r}: unknown config key {key!r}{hint}")
        if isinstance(value, str) and isinstance(getattr(default, key, None), (int, float)):
            raise SpecError(f"{spec!r}: {key}={value!r} must be a number")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0 and (
                key.startswith(("n_", "num_", "vocab", "hidden", "d_", "max_", "intermediate"))):
            raise SpecError(f"{spec!r}: {key}={value!r} must be > 0")
    limit = next((getattr(config, k) for k in ("n_positions", "max_position_embeddings")
                  if isinstance(getattr(config, k, None), int)), None)
    if limit is not None and seq > limit:
        if not seq_given:
            return limit
        raise SpecError(f"{spec!r}: seq={seq} exceeds the model's max positions ({limit}); lower seq")
    return seq


def _init_keywords(config_class: type) -> set[str]:
    """The keyword arguments a config class and its bases accept (``num_labels`` is one, not kept in to_dict)."""
    names: set[str] = set()
    for cls in config_class.__mro__:
        names |= {k for k, v in cls.__dict__.items() if isinstance(v, property) and v.fset is not None}
        init = cls.__dict__.get("__init__")
        with contextlib.suppress(TypeError, ValueError):
            names |= {p for p in inspect.signature(init).parameters if p not in ("self", "kwargs")} if init else set()
    return names


_HEAD_KEYS = (("n_embd", "n_head"), ("hidden_size", "num_attention_heads"), ("d_model", "num_heads"))


def _fit_head_count(config: Any, opts: dict[str, Any]) -> None:
    """When only the width was overridden, pick a head count that divides it.

    ``hf:gpt2?n_embd=128`` keeps GPT-2's 12 heads otherwise, which 128 does
    not divide; the largest divisor below the default is used and logged.
    """
    for width_key, heads_key in _HEAD_KEYS:
        width, heads = getattr(config, width_key, None), getattr(config, heads_key, None)
        if not isinstance(width, int) or not isinstance(heads, int) or heads_key in opts or width % heads == 0:
            continue
        new = max(h for h in range(1, heads + 1) if width % h == 0)
        log.warning("%s=%d is not divisible by the default %s=%d; using %s=%d",
                    width_key, width, heads_key, heads, heads_key, new)
        setattr(config, heads_key, new)
        kv = getattr(config, "num_key_value_heads", None)
        if isinstance(kv, int) and "num_key_value_heads" not in opts and new % kv:
            config.num_key_value_heads = new


def _one_line(exc: BaseException) -> str:
    """An exception as one line: a SyntaxError with its file and line, anything else its first line."""
    if isinstance(exc, SyntaxError):
        return f"{exc.msg} ({os.path.basename(exc.filename or '?')}, line {exc.lineno})"
    return (str(exc).strip().splitlines() or [""])[0][:300]


def _load_factory(spec: str) -> ModelSpec:
    target, _, attr = spec.rpartition(":")
    if target.endswith(".py"):
        if not os.path.exists(target):
            raise SpecError(f"no such file: {target}")
        mod_name = "_graphopt_spec_" + os.path.splitext(os.path.basename(target))[0]
        module_spec = importlib.util.spec_from_file_location(mod_name, target)
        module = importlib.util.module_from_spec(module_spec)  # type: ignore[arg-type]
        sys.modules[mod_name] = module
        try:
            module_spec.loader.exec_module(module)  # type: ignore[union-attr]
        except (Exception, SystemExit) as exc:  # the user's file: reported as theirs, one line
            sys.modules.pop(mod_name, None)
            raise SpecError(f"your file {target} raised {type(exc).__name__} on import: {_one_line(exc)}") from exc
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise SpecError(f"cannot import {target!r} ({exc}); is it on PYTHONPATH?") from exc
        except (Exception, SystemExit) as exc:
            raise SpecError(f"your module {target} raised {type(exc).__name__} on import: {_one_line(exc)}") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise SpecError(f"{target!r} has no callable {attr!r}; a factory returns (model, example_args[, kwargs])")
    try:
        out = fn()
    except SystemExit as exc:
        raise SpecError(f"your factory {attr!r} called sys.exit({exc.code!r}); return (model, example_args) instead") from exc
    except Exception as exc:
        raise SpecError(f"your factory {attr!r} raised {type(exc).__name__}: {_one_line(exc)}") from exc
    if not isinstance(out, tuple) or len(out) not in (2, 3) or not isinstance(out[0], torch.nn.Module):
        raise SpecError(f"{spec}: the factory must return (model, example_args[, example_kwargs])")
    model, args = out[0], out[1]
    args = tuple(args) if isinstance(args, (tuple, list)) else (args,)
    kwargs = dict(out[2]) if len(out) == 3 and out[2] else {}
    return ModelSpec(f"{attr}", model, args, kwargs)


def _load_pt2(path: str) -> ModelSpec:
    if not os.path.exists(path):
        raise SpecError(f"no such file: {path}")
    try:
        ep = load_exported_program(path)
    except BadInput:  # refused as unsafe or not a program: already one line
        raise
    except Exception as exc:
        raise SpecError(f"{path} is not a loadable torch.export program ({type(exc).__name__}: {exc})") from exc
    example = getattr(ep, "example_inputs", None)
    if not example:
        raise SpecError(f"{path} was saved without example inputs; re-export it with example inputs")
    args, kwargs = example
    return ModelSpec(os.path.basename(path), ep.module(), tuple(args), dict(kwargs or {}), ep)


def _example(text: str) -> ModelSpec:
    """Build graphopt's example ``name?key=value&...`` (:data:`graphopt.examples_models.BUILDERS`)."""
    name, _, query = text.partition("?")
    if name not in examples_models.BUILDERS:
        raise SpecError(f"unknown built-in example {name!r}; choose one of {sorted(examples_models.BUILDERS)}")
    opts = {k: parse_value(v) for k, v in parse_qsl(query)}
    try:
        model, args = examples_models.BUILDERS[name](**opts)
    except TypeError as exc:
        raise SpecError(f"examples:{name}: {exc}") from exc
    return ModelSpec(name, model, args, {})


def load_spec(spec: str) -> ModelSpec:
    """Build the model a spec names; raises :class:`SpecError` with what to do on bad input."""
    if not isinstance(spec, str) or not spec.strip():
        raise SpecError("empty model spec; give a .pt2 file, 'package.module:factory' or 'hf:<model_type>'")
    spec = spec.strip()
    if spec.startswith("hf:"):
        return _hf(spec)
    if spec.startswith("examples:"):
        return _example(spec.split(":", 1)[1])
    if spec.endswith(".pt2"):
        return _load_pt2(spec)
    if ":" in spec:
        return _load_factory(spec)
    if spec.endswith(".onnx"):
        raise SpecError(f"{spec}: this command needs a PyTorch model (a .pt2 file, 'file.py:factory', 'hf:...'); "
                        "an .onnx file can be read with `graphopt analyze model.onnx`")
    if os.path.exists(spec):
        raise SpecError(f"{spec}: unsupported file type; give a .pt2 file or 'file.py:factory'")
    raise SpecError(
        f"cannot read model spec {spec!r}; give a .pt2 file, 'package.module:factory', "
        "'hf:<model_type>?key=value' or 'examples:<name>'"
    )
