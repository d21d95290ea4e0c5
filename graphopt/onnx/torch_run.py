"""The torch side of an export: arguments as a tuple, a user's module in eval mode, tensors for onnxruntime."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from graphopt.capture import eval_mode
from graphopt.onnx.result import OnnxExportError


def as_tuple(x: Any) -> tuple[Any, ...]:
    """``x`` as a tuple of positional arguments (a single argument becomes a 1-tuple)."""
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def inference(module: Any) -> contextlib.AbstractContextManager[Any]:
    """Eval mode for a user's module; exported GraphModules have no train/eval switch."""
    if isinstance(module, torch.nn.Module) and not isinstance(module, torch.fx.GraphModule):
        return eval_mode(module)
    return contextlib.nullcontext()


def to_numpy(x: torch.Tensor) -> Any:
    """A tensor as the numpy array onnxruntime is fed (bfloat16 has no numpy dtype: refused)."""
    if x.dtype == torch.bfloat16:
        raise OnnxExportError("bfloat16 inputs cannot be fed to onnxruntime from numpy; give float32 inputs")
    return x.detach().cpu().contiguous().numpy()
