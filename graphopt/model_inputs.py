"""What :func:`graphopt.optimize` captures when it is given no example inputs, and its dynamic axes.

For a Hugging Face transformers model (a ``PreTrainedModel``) the example is
built from its config, the task read from the model class:

* causal LM (GPT-2, Llama, ...: a model type transformers lists for causal
  LM and not for masked LM): ``input_ids`` of shape (2, 16);
* encoder-decoder (``config.is_encoder_decoder``: T5, BART):
  ``input_ids``, ``attention_mask``, ``decoder_input_ids``;
* image models (``main_input_name == "pixel_values"``): ``pixel_values`` of
  (2, num_channels, image_size, image_size);
* text-and-image models (a ``vision_config`` and a forward taking
  ``pixel_values``: CLIP): ``input_ids``, ``attention_mask`` and ``pixel_values``;
* speech models (``main_input_name``): Whisper-style ``input_features``
  (batch, num_mel_bins, 2 x max_source_positions) or raw ``input_values``
  (batch, samples), with ``decoder_input_ids`` for an encoder-decoder;
* everything else (masked LM, sequence classification, encoders):
  ``input_ids`` and ``attention_mask`` (all ones); a model whose main input is
  another name is refused (BadInput) rather than given token ids it cannot take.

Token ids are drawn below ``config.vocab_size`` (``text_config``'s where the
config has none) from a fixed seed. Batch and sequence are 2 and 16, not 1:
``torch.export`` specialises a size-1 axis.

The captured forward gets ``use_cache=False`` when it takes that argument
(:func:`without_cache`): the model is called through a shallow copy whose
``forward`` binds it, so neither the model nor its config is changed and the
result is called like the model.

Dynamic axes (``dynamic=``): ``"batch,seq"``, ``"batch"``, a sequence of
those names, a dict ``{"batch": (lo, hi), "seq": (lo, hi)}`` or False / ""
(static). The default (None) is ``"batch,seq"`` when graphopt built the
inputs and static when the caller gave them. Default ranges: batch
1..:data:`MAX_BATCH`, seq 1..``config.max_position_embeddings`` (unbounded
when the config has none). Decoder inputs (``decoder_*``) get their own
sequence axis.
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.export import dynamic_shapes as export_shapes
from torch.fx.experimental.symbolic_shapes import is_concrete_int
from torch.utils import _pytree as pytree

from graphopt.errors import BadInput

#: the example graphopt builds: (batch, seq); neither is 1 (export specialises size 1)
EXAMPLE_BATCH, EXAMPLE_SEQ = 2, 16
#: the largest batch a default dynamic batch axis accepts
MAX_BATCH = 1024
#: the seed token ids are drawn from
SEED = 0

#: axis names ``dynamic=`` understands
DYNAMIC_AXES = ("batch", "seq")

NO_INPUTS_HINT = ("optimize() needs example inputs for this model: pass them, e.g. "
                  "graphopt.optimize(model, (x,)); only Hugging Face transformers models get built ones")


def parse_dynamic(dynamic: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"batch,seq"`` -> ``("batch", "seq")``; None or "" -> ``()``."""
    if not dynamic:
        return ()
    names = [n.strip() for n in dynamic.split(",")] if isinstance(dynamic, str) else [str(n) for n in dynamic]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in DYNAMIC_AXES]
    if unknown:
        raise ValueError(f"unknown dynamic axis {unknown[0]!r}; name batch and/or seq, e.g. 'batch,seq'")
    return tuple(dict.fromkeys(names))


def axes_of_input(x: Any, axes: Sequence[str]) -> dict[int, str]:
    """Which axes of one input tensor are dynamic.

    ``batch``: axis 0 of every tensor input. ``seq``: axis 1 of integer/bool
    inputs of rank >= 2 (token ids, attention masks, position ids) and of float
    inputs of rank 3 ((batch, seq, hidden) embeddings); never of images or
    (batch, features) inputs.
    """
    if not isinstance(x, torch.Tensor):
        return {}
    out: dict[int, str] = {}
    if "batch" in axes and x.ndim >= 1:
        out[0] = "batch"
    if "seq" in axes and x.ndim >= 2 and (not x.dtype.is_floating_point or x.ndim == 3):
        out[1] = "seq"
    return out


def widen_for_dynamic(args: Sequence[Any], kwargs: dict[str, Any] | None,
                      dynamic: str | Sequence[str] | None) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Repeat inputs whose dynamic axis has size 1 to size 2.

    ``torch.export`` specialises a size-1 dimension to the constant 1, so a
    batch-1 example cannot give a dynamic batch axis.
    """
    axes = parse_dynamic(dynamic)

    def widen(x: Any) -> Any:
        for axis in axes_of_input(x, axes):
            if x.shape[axis] == 1:
                reps = [1] * x.ndim
                reps[axis] = 2
                x = x.repeat(*reps)
        return x

    args2, kwargs2 = pytree.tree_map(widen, (tuple(args), dict(kwargs or {})))
    return tuple(args2), dict(kwargs2)


def is_transformers_model(model: torch.nn.Module) -> bool:
    """True for a transformers ``PreTrainedModel`` (without importing transformers when it is not loaded)."""
    transformers = sys.modules.get("transformers")
    base = getattr(transformers, "PreTrainedModel", None) if transformers is not None else None
    return base is not None and isinstance(model, base)


def task_of(model: torch.nn.Module) -> str:
    """``"causal-lm"``, ``"seq2seq"``, ``"image"`` or ``"encoder"``, from the model class and its config."""
    config = model.config
    if getattr(model, "main_input_name", "input_ids") == "pixel_values":
        return "image"
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    from transformers.models.auto import modeling_auto as auto  # transformers is loaded: the model is one

    name = type(model).__name__
    causal = auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    masked = auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES
    if name in set(causal.values()) or (config.model_type in causal and config.model_type not in masked):
        return "causal-lm"
    return "encoder"


def built_inputs(model: torch.nn.Module) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Example ``(args, kwargs)`` for a transformers model, built from its config (see the module doc)."""
    if not is_transformers_model(model):
        raise BadInput(f"no example inputs given for {type(model).__name__}: {NO_INPUTS_HINT}")
    config, task = model.config, task_of(model)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    gen = torch.Generator().manual_seed(SEED)
    if task == "image":
        return (_pixels(config, gen).to(device, _float_dtype(model)),), {}
    text = text_config(config)
    vocab = int(getattr(text, "vocab_size", None) or 1000)
    seq = min(EXAMPLE_SEQ, max_positions(text) or EXAMPLE_SEQ)
    main = getattr(model, "main_input_name", "input_ids")
    if main in ("input_features", "input_values"):  # speech: the audio, then the decoder's tokens where it has one
        kwargs = {main: _audio(model, main, gen).to(device, _float_dtype(model))}
        if task == "seq2seq":
            kwargs["decoder_input_ids"] = torch.randint(0, vocab, (EXAMPLE_BATCH, seq), generator=gen).to(device)
        return (), kwargs
    if main != "input_ids":
        raise BadInput(f"no example inputs given, and graphopt does not build them for {type(model).__name__} "
                       f"(its main input is {main!r}): {NO_INPUTS_HINT}")
    ids = torch.randint(0, vocab, (EXAMPLE_BATCH, seq), generator=gen).to(device)
    if task == "causal-lm":
        return (ids,), {}
    kwargs: dict[str, Any] = {"attention_mask": torch.ones_like(ids)}
    if task == "seq2seq":
        kwargs["decoder_input_ids"] = torch.randint(0, vocab, (EXAMPLE_BATCH, seq), generator=gen).to(device)
    vision = getattr(config, "vision_config", None)
    if vision is not None and "pixel_values" in inspect.signature(model.forward).parameters:  # text and image
        kwargs["pixel_values"] = _pixels(vision, gen).to(device, _float_dtype(model))
    return (ids,), kwargs


def _float_dtype(model: torch.nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _pixels(config: Any, gen: torch.Generator) -> torch.Tensor:
    """``(EXAMPLE_BATCH, num_channels, image_size, image_size)`` pixels for an image config."""
    size = getattr(config, "image_size", 224)
    size = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))
    return torch.randn(EXAMPLE_BATCH, int(getattr(config, "num_channels", 3)), *size, generator=gen)


def _audio(model: torch.nn.Module, main: str, gen: torch.Generator) -> torch.Tensor:
    """A speech model's input: Whisper-style log-mel ``input_features`` (batch, mel bins, 2 x encoder
    positions), or raw ``input_values`` (batch, samples) long enough for a few frames of its convolutions."""
    config = model.config
    if main == "input_values":
        strides = getattr(config, "conv_stride", None) or (320,)
        kernels = getattr(config, "conv_kernel", None) or (400,)
        return torch.randn(EXAMPLE_BATCH, math.prod(strides) * EXAMPLE_SEQ + sum(kernels), generator=gen)
    mels, frames = getattr(config, "num_mel_bins", None), getattr(config, "max_source_positions", None)
    if not isinstance(mels, int) or not isinstance(frames, int):
        raise BadInput(f"no example inputs given, and graphopt does not build input_features for "
                       f"{type(model).__name__} (only Whisper-style num_mel_bins x max_source_positions): "
                       f"{NO_INPUTS_HINT}")
    return torch.randn(EXAMPLE_BATCH, mels, 2 * frames, generator=gen)


def text_config(config: Any) -> Any:
    """The config of the model's text part: ``config`` itself, or a text-and-image model's ``text_config``."""
    if getattr(config, "vocab_size", None) is None and getattr(config, "text_config", None) is not None:
        return config.text_config
    return config


def max_positions(config: Any) -> int | None:
    """The model's position table length, under any of the names configs give it (None: no table)."""
    known = [int(v) for name in ("max_position_embeddings", "n_positions", "n_ctx")
             if isinstance(v := getattr(config, name, None), int) and v > 0]
    return min(known) if known else None


def is_causal_lm(model: torch.nn.Module) -> bool:
    """A transformers decoder-only model that generates (``PreTrainedModel`` and ``GenerationMixin``)."""
    transformers = sys.modules.get("transformers")
    mixin = getattr(transformers, "GenerationMixin", None) if transformers is not None else None
    return (is_transformers_model(model) and mixin is not None and isinstance(model, mixin)
            and not getattr(model.config, "is_encoder_decoder", False))


def without_cache(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` called with ``use_cache=False`` when its forward takes it, else ``model`` itself.

    A shallow copy with a bound ``forward``: it shares the parameters, buffers
    and submodules (same names), and neither the model nor its config changes.
    """
    if not is_transformers_model(model) or not getattr(model.config, "use_cache", False):
        return model
    params = inspect.signature(model.forward).parameters
    takes = "use_cache" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if not takes or "forward" in vars(model):
        return model
    bound = copy.copy(model)
    bound.forward = functools.partial(type(model).forward, bound, use_cache=False)
    return bound


def dynamic_ranges(dynamic: Any, model: torch.nn.Module, built: bool) -> dict[str, tuple[int, int | None]]:
    """``dynamic=`` as ``{axis: (lo, hi)}`` (empty: static); see the module doc for what it accepts."""
    if dynamic is None:
        dynamic = "batch,seq" if built else False
    if dynamic is True:
        dynamic = "batch,seq"
    if dynamic is False or (not isinstance(dynamic, Mapping) and not dynamic):
        return {}
    config = getattr(model, "config", None)
    defaults = {"batch": (1, MAX_BATCH), "seq": (1, max_positions(text_config(config)) if config is not None else None)}
    if isinstance(dynamic, Mapping):
        names = parse_dynamic(list(dynamic))
        ranges = {n: _range(n, dynamic[n], defaults[n]) for n in names}
    else:
        ranges = {n: defaults[n] for n in parse_dynamic(dynamic)}
    return ranges


def _range(name: str, value: Any, default: tuple[int, int | None]) -> tuple[int, int | None]:
    if value is None or value is True:
        return default
    try:
        lo, hi = value
        lo, hi = int(lo), (None if hi is None else int(hi))
    except (TypeError, ValueError):
        raise BadInput(f"dynamic[{name!r}]={value!r}: give a (min, max) pair, e.g. (1, 512)") from None
    if lo < 1 or (hi is not None and hi < max(lo, 2)):
        raise BadInput(f"dynamic[{name!r}]={value!r}: need 1 <= min and max >= 2 (and >= min)")
    return lo, hi


def dynamic_shapes_for_ranges(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                              ranges: Mapping[str, tuple[int, int | None]]) -> Any:
    """``torch.export`` dynamic shapes with an explicit ``Dim`` per axis (decoder inputs: their own seq).

    Axes as :func:`graphopt.onnx.dynamic.axes_of_input` finds them. Raises
    :class:`BadInput` when an asked axis fits no input.
    """
    dims: dict[str, Any] = {}

    def dim(name: str) -> Any:
        if name not in dims:
            lo, hi = ranges[name.removeprefix("decoder_")]
            dims[name] = torch.export.Dim(name, min=lo, max=hi) if hi is not None else torch.export.Dim(name, min=lo)
        return dims[name]

    collection = torch.export.ShapesCollection()
    used: set[str] = set()
    leaves = [(None, a) for a in args] + list(kwargs.items())
    for key, value in leaves:
        prefix = "decoder_" if isinstance(key, str) and key.startswith("decoder_") else ""
        for leaf in pytree.tree_leaves(value):
            spec = axes_of_input(leaf, tuple(ranges))
            if spec:
                collection[leaf] = {axis: dim(prefix + name if name == "seq" else name) for axis, name in spec.items()}
                used.update(spec.values())
    missing = [a for a in ranges if a not in used]
    if missing:
        raise BadInput(f"dynamic={missing[0]!r}: no input has that axis (seq: axis 1 of integer inputs or of "
                       f"(batch, seq, hidden) float inputs); leave it out of dynamic")
    return collection.dynamic_shapes(module, args, kwargs)


#: what ``torch.export.Dim(name, ...)`` makes: a ``Dim`` instance in torch 2.13, a class of metaclass ``_Dim`` before
_DIM_TYPES = tuple(t for t in (getattr(export_shapes, "_Dim", None), getattr(export_shapes, "Dim", None))
                   if isinstance(t, type))


def relaxed_dynamic_shapes(dynamic_shapes: Any) -> Any:
    """``dynamic_shapes`` with each ``Dim`` as ``Dim.AUTO`` over the same range.

    An explicit ``Dim`` makes ``torch.export`` fail where the model fixes the
    axis (a Mamba's scan length) or excludes a value (GPT-Neo's local attention
    at exactly its window); ``Dim.AUTO`` keeps the axis dynamic where the model
    allows it and fixes or narrows it where not, which :func:`dynamic_axis_names`
    then reads off the graph.
    """
    if isinstance(dynamic_shapes, dict):
        return {k: relaxed_dynamic_shapes(v) for k, v in dynamic_shapes.items()}
    if isinstance(dynamic_shapes, (list, tuple)):
        return type(dynamic_shapes)(relaxed_dynamic_shapes(v) for v in dynamic_shapes)
    if isinstance(dynamic_shapes, _DIM_TYPES):
        return torch.export.Dim.AUTO(min=dynamic_shapes.min, max=dynamic_shapes.max)
    return dynamic_shapes


def dynamic_axis_names(gm: torch.fx.GraphModule, names: Sequence[str]) -> set[str]:
    """Which of the axes ``names`` (batch, seq) some input of ``gm`` has dynamic (a symbolic size)."""
    found: set[str] = set()
    for node in gm.graph.find_nodes(op="placeholder"):
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor):
            found |= {name for axis, name in axes_of_input(value, names).items()
                      if not is_concrete_int(value.shape[axis])}  # a size fixed by a guard is concrete
    return found


def prepare(model: torch.nn.Module, example_inputs: Any, example_kwargs: dict[str, Any] | None,
            dynamic: Any, dynamic_shapes: Any) -> tuple[torch.nn.Module, tuple, dict, Any, tuple[str, ...]]:
    """What optimize captures: ``(model to call, args, kwargs, dynamic_shapes, default axes)``.

    Builds the inputs when none are given (:func:`built_inputs`), binds
    ``use_cache=False`` (:func:`without_cache`), and turns ``dynamic`` into
    ``dynamic_shapes`` (widening size-1 axes to 2) unless ``dynamic_shapes``
    is given, which wins. The default axes are those made dynamic by default
    (built inputs, ``dynamic`` not given): the ones the capture may fix where
    the model does not run at every size (:func:`relaxed_dynamic_shapes`).
    """
    built = example_inputs is None and not example_kwargs
    if built:
        args, kwargs = built_inputs(model)
    else:
        if example_inputs is None:
            example_inputs = ()
        if isinstance(example_inputs, torch.Tensor) or not isinstance(example_inputs, (tuple, list)):
            example_inputs = (example_inputs,)
        args, kwargs = tuple(example_inputs), dict(example_kwargs or {})
    target = without_cache(model)
    if dynamic_shapes is not None:
        return target, args, kwargs, dynamic_shapes, ()
    ranges = dynamic_ranges(dynamic, model, built)
    if built and (dynamic is None or dynamic is True):  # default axes no built input has (an image's seq)
        leaves = pytree.tree_leaves((args, kwargs))
        ranges = {n: r for n, r in ranges.items() if any(axes_of_input(x, (n,)) for x in leaves)}
    if not ranges:
        return target, args, kwargs, None, ()
    args, kwargs = widen_for_dynamic(args, kwargs, tuple(ranges))
    default_axes = tuple(ranges) if built and dynamic is None else ()
    return target, args, kwargs, dynamic_shapes_for_ranges(target, args, kwargs, ranges), default_axes


__all__ = ["DYNAMIC_AXES", "built_inputs", "dynamic_axis_names", "dynamic_ranges", "prepare", "relaxed_dynamic_shapes",
           "task_of", "without_cache"]
