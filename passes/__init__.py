"""graphopt's passes and the pipelines that run them, as explicit lists.

No import-time registration: a pipeline is a function returning a list of
:class:`graphopt.Pass` objects, and :func:`available` lists every pass with its
one-line summary (``graphopt passes`` prints it).

Users hand their own passes to ``graphopt.optimize(..., passes=[...])``; start
from :func:`cleanup_pipeline` or :func:`default_pipeline` and add to the list.
"""

from __future__ import annotations

from graphopt.pass_infra import OptimizeContext, Pass
from graphopt.passes.analysis.cost_annotation import CostAnnotation
from graphopt.passes.analysis.ffn_chains import FFNChains
from graphopt.passes.analysis.hot_matmuls import HotMatmuls
from graphopt.passes.analysis.repeated_blocks import RepeatedBlocks
from graphopt.passes.attention import FuseAttention
from graphopt.passes.blocked import BlockedOperators, blocked_requested
from graphopt.passes.cleanup.constant_folding import ConstantFolding
from graphopt.passes.cleanup.cse import CommonSubexpressionElimination
from graphopt.passes.cleanup.dead_code import DeadCodeElimination
from graphopt.passes.cleanup.fold_conv_bn import FoldConvBatchNorm
from graphopt.passes.cleanup.remove_noops import RemoveNoOps
from graphopt.passes.merge_matmuls import MergeMatmuls
from graphopt.passes.precision import ReducedPrecision
from graphopt.passes.sdpa_gqa import RegroupSdpaHeads
from graphopt.passes.tensor_parallel import TensorParallel
from graphopt.passes.weight_layout import MatvecWeightLayout

__all__ = ["available", "cleanup_pipeline", "default_pipeline", "all_pass_classes"]


def cleanup_pipeline() -> list[Pass]:
    """The cleanup every optimizer has, in a sensible order."""
    return [
        RemoveNoOps(),
        ConstantFolding(),
        CommonSubexpressionElimination(),
        FoldConvBatchNorm(),
        DeadCodeElimination(),
    ]


def default_pipeline(ctx: OptimizeContext | None = None) -> list[Pass]:
    """The pipeline :func:`graphopt.optimize` runs when no ``passes`` are given.

    Options in ``ctx.options`` switch on the passes that need them.
    """
    pipeline = cleanup_pipeline() + [FuseAttention(), RegroupSdpaHeads(), MergeMatmuls()] + cleanup_pipeline()
    if ctx is not None and blocked_requested(ctx):
        pipeline.append(BlockedOperators())
    if ctx is not None and "weight_layout_policy" in ctx.options:
        # asked for (generation asks for it on its decode graph): after the planners that read linear sites
        pipeline.append(MatvecWeightLayout())
    if ctx is not None and ctx.options.get("precision"):
        pipeline.append(ReducedPrecision())  # last: passes after it would be checked at fp32 tolerance
    return pipeline


def all_pass_classes() -> list[type[Pass]]:
    """Every pass graphopt ships, in pipeline order."""
    return [
        RemoveNoOps,
        ConstantFolding,
        CommonSubexpressionElimination,
        FoldConvBatchNorm,
        DeadCodeElimination,
        FuseAttention,
        RegroupSdpaHeads,
        MergeMatmuls,
        ReducedPrecision,
        TensorParallel,
        BlockedOperators,
        MatvecWeightLayout,
        CostAnnotation,
        HotMatmuls,
        FFNChains,
        RepeatedBlocks,
    ]


def available() -> list[tuple[str, str]]:
    """(name, one-line summary) of every pass graphopt ships."""
    return [(cls.name, cls.summary) for cls in all_pass_classes()]
