"""graphopt: a computation-graph optimizer and rewriter for PyTorch models.

>>> import torch, graphopt
>>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
>>> result = graphopt.optimize(model, (torch.randn(2, 8),))
>>> out = result.module(torch.randn(2, 8))     # called like the original
>>> print(result.report)                        # doctest: +SKIP
"""

from __future__ import annotations

from graphopt import ops  # noqa: F401  (registers torch.ops.graphopt.*)
from graphopt.analysis import Analysis, analyze
from graphopt.capture import CaptureError, Captured, capture
from graphopt.errors import GraphoptError, OptionError
from graphopt.generate import GenerationGraphs, prepare_generation
from graphopt.loading import load
from graphopt.onnx import OnnxExport, OnnxExportError, OnnxMismatchError, export_onnx, record_onnx_export
from graphopt.optimize import OptimizeResult, optimize
from graphopt.pass_infra import (
    AnalysisPass,
    FunctionPass,
    Instrument,
    OptimizeContext,
    Option,
    Pass,
    PassManager,
    PassResult,
)
from graphopt.program_file import UnsafeProgramFile
from graphopt.report import Declined, Report
from graphopt.saved import LoadedModel, NotASavedModel
from graphopt.verify import ErrorBudget
from graphopt.viz import visualize

__version__ = "0.1.0"

__all__ = [
    "Analysis",
    "AnalysisPass",
    "analyze",
    "CaptureError",
    "Captured",
    "Declined",
    "ErrorBudget",
    "FunctionPass",
    "GenerationGraphs",
    "GraphoptError",
    "Instrument",
    "LoadedModel",
    "NotASavedModel",
    "OnnxExport",
    "OnnxExportError",
    "OnnxMismatchError",
    "OptimizeContext",
    "OptimizeResult",
    "Option",
    "OptionError",
    "Pass",
    "PassManager",
    "PassResult",
    "Report",
    "UnsafeProgramFile",
    "capture",
    "export_onnx",
    "load",
    "optimize",
    "prepare_generation",
    "record_onnx_export",
    "visualize",
]
