"""fold_conv_bn: eval BatchNorm after Conv / Linear folds into new weights; unsafe pairs are declined."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from graphopt.examples_models import randomize_batchnorm
from graphopt.passes.cleanup.fold_conv_bn import FoldConvBatchNorm
from tests.support.helpers import assert_outputs_close, call, capture_for_pass, op_targets, run_pass, snapshot_state, \
    assert_state_unchanged


class ConvBN(nn.Module):
    def __init__(self, conv_bias: bool = True, affine: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=conv_bias)
        self.bn = nn.BatchNorm2d(8, affine=affine)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


def _model(module: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return randomize_batchnorm(module, seed=1).eval()


def _check_numerics(model, out, shape):
    for seed in range(3):
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
        assert_outputs_close(call(model, (x,)), call(out, (x,)))


def test_golden_ops_and_idempotence():
    torch.manual_seed(0)
    model = _model(ConvBN())
    gm, ctx = capture_for_pass(model, (torch.randn(2, 3, 8, 8),))
    assert op_targets(gm) == ["aten.conv2d", "aten.batch_norm", "aten.relu"]
    first = run_pass(FoldConvBatchNorm(), gm, ctx)
    assert first.modified and first.notes == ["folded 1 batch norms into conv/linear weights"]
    assert op_targets(first.module) == ["aten.conv2d", "aten.relu"]
    assert first.nodes_involved == ["conv2d"]
    second = run_pass(FoldConvBatchNorm(), first.module, ctx)
    assert not second.modified


@pytest.mark.parametrize("conv_bias,affine", [(True, True), (False, True), (True, False), (False, False)])
def test_numerics_and_users_weights_untouched(conv_bias, affine):
    model = _model(ConvBN(conv_bias, affine))
    before = snapshot_state(model)
    gm, ctx = capture_for_pass(model, (torch.randn(2, 3, 8, 8),))
    out = run_pass(FoldConvBatchNorm(), gm, ctx).module
    assert op_targets(out) == ["aten.conv2d", "aten.relu"]
    _check_numerics(model, out, (2, 3, 8, 8))
    assert_state_unchanged(model, before)


def test_conv1d_and_linear_batchnorm_fold():
    class Conv1dLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv1d(4, 6, 3), nn.BatchNorm1d(6)
            self.fc, self.bn_fc = nn.Linear(6 * 6, 5), nn.BatchNorm1d(5)

        def forward(self, x):
            h = self.bn(self.conv(x)).flatten(1)
            return self.bn_fc(self.fc(h))

    model = _model(Conv1dLinear())
    gm, ctx = capture_for_pass(model, (torch.randn(3, 4, 8),))
    out = run_pass(FoldConvBatchNorm(), gm, ctx).module
    assert op_targets(out) == ["aten.conv1d", "aten.flatten", "aten.linear"]
    _check_numerics(model, out, (3, 4, 8))


def test_declines_conv_with_a_second_user():
    class ConvUsedTwice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y  # the unnormalised y is needed too

    model = _model(ConvUsedTwice())
    gm, ctx = capture_for_pass(model, (torch.randn(1, 3, 8, 8),))
    result = run_pass(FoldConvBatchNorm(), gm, ctx)
    assert not result.modified
    assert [(d.site, d.reason) for d in result.declined] == [
        ("batch_norm", "conv2d has other users besides the batch norm")]


def test_declines_batchnorm_in_training_mode():
    class ExplicitTrainingBN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):  # batch statistics even in eval mode
            return F.batch_norm(self.conv(x), None, None, self.bn.weight, self.bn.bias, training=True)

    gm, ctx = capture_for_pass(_model(ExplicitTrainingBN()), (torch.randn(2, 3, 8, 8),))
    result = run_pass(FoldConvBatchNorm(), gm, ctx)
    assert not result.modified
    assert [d.reason for d in result.declined] == ["batch norm in training mode"]


def test_declines_linear_whose_features_are_not_the_normalized_dim():
    """BatchNorm1d on (N, C, L) normalizes C; a Linear acts on L. With C == L shapes even fit,
    but folding would scale the wrong axis (relative L2 0.4 before this was declined)."""
    class LinearThenBN3d(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.bn = nn.Linear(6, 6), nn.BatchNorm1d(6)

        def forward(self, x):
            return self.bn(self.fc(x))

    model = _model(LinearThenBN3d())
    gm, ctx = capture_for_pass(model, (torch.randn(3, 6, 6),))
    result = run_pass(FoldConvBatchNorm(), gm, ctx)
    assert not result.modified
    assert len(result.declined) == 1 and "normalizes dim 1" in result.declined[0].reason
    _check_numerics(model, result.module, (3, 6, 6))
