"""weight_layout: a matrix-vector linear multiplies with its weight stored (in, out), where faster."""

from __future__ import annotations

import torch
import torch.nn as nn

from graphopt.passes.weight_layout import MAX_MATVEC_ROWS, MatvecWeightLayout
from tests.support.helpers import assert_outputs_close, call, capture_for_pass, op_targets, run_pass


class TwoLinears(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(32, 64)
        self.down = nn.Linear(64, 16, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _always(model, args):
    return capture_for_pass(model, args, weight_layout_policy="always")


def test_golden_ops_and_idempotence():
    torch.manual_seed(0)
    gm, ctx = _always(TwoLinears().eval(), (torch.randn(2, 32),))
    first = run_pass(MatvecWeightLayout(), gm, ctx)
    assert first.modified
    assert op_targets(first.module) == ["aten.matmul", "aten.add", "aten.relu", "aten.matmul"]
    second = run_pass(MatvecWeightLayout(), first.module, ctx)
    assert not second.modified, "a second run must find no linear left"


def test_numerics_equal_and_user_weights_untouched():
    torch.manual_seed(0)
    model = TwoLinears().eval()
    before = model.up.weight.detach().clone()
    x = torch.randn(3, 32)
    gm, ctx = _always(model, (x,))
    out = run_pass(MatvecWeightLayout(), gm, ctx).module
    assert_outputs_close(call(model, (x,)), call(out, (x,)))
    assert torch.equal(model.up.weight, before) and model.up.weight.shape == (64, 32)


def test_declines_a_matrix_product_without_measuring():
    torch.manual_seed(0)
    gm, ctx = capture_for_pass(TwoLinears().eval(), (torch.randn(MAX_MATVEC_ROWS + 1, 32),))
    result = run_pass(MatvecWeightLayout(), gm, ctx)
    assert not result.modified
    assert [d.reason for d in result.declined] == [
        f"{MAX_MATVEC_ROWS + 1} activation rows > {MAX_MATVEC_ROWS}: a matrix product, where the layout "
        "does not matter"] * 2


def test_declines_with_both_timings_when_the_layout_measures_slower():
    import graphopt.passes.weight_layout as layout

    torch.manual_seed(0)
    gm, ctx = capture_for_pass(TwoLinears().eval(), (torch.randn(1, 32),))
    for rows, k, n in ((1, 32, 64), (1, 64, 16)):
        key = ("weight_layout", rows, k, n, torch.float32, "cpu", torch.get_num_threads())
        ctx.target.timings.get_or_measure(key, lambda: (1e-6, 2e-6))
    result = run_pass(MatvecWeightLayout(), gm, ctx)
    assert not result.modified
    assert result.declined[0].reason == (f"(in, out) 2.0 us vs linear 1.0 us on cpu: 0.50x < "
                                         f"{layout.LAYOUT_MIN_SPEEDUP:.2f}x")


def _seed(ctx, timings):
    for (rows, k, n), value in timings.items():
        key = ("weight_layout", rows, k, n, torch.float32, "cpu", torch.get_num_threads())
        ctx.target.timings.get_or_measure(key, lambda value=value: value)


def test_long_rows_check_keeps_the_layout_only_where_it_is_no_slower_there():
    """weight_layout_long_scale: a layout faster at the example's rows but slower at scale x rows is declined."""
    torch.manual_seed(0)
    gm, ctx = capture_for_pass(TwoLinears().eval(), (torch.randn(2, 32),), weight_layout_long_scale=8)
    # up: faster at 2 rows, slower at 16; down: faster at both
    _seed(ctx, {(2, 32, 64): (2e-6, 1e-6), (16, 32, 64): (1e-5, 2e-5), (2, 64, 16): (2e-6, 1e-6),
                (16, 64, 16): (2e-5, 1e-5)})
    result = run_pass(MatvecWeightLayout(), gm, ctx)
    assert op_targets(result.module) == ["aten.linear", "aten.relu", "aten.matmul"]
    assert [d.reason for d in result.declined] == [
        "(in, out) 1.0 us vs linear 2.0 us on cpu: 2.00x, but at 16 rows (in, out) 20.0 us vs linear 10.0 us: "
        "slower by more than 1.02x"]
    assert any("at 16 rows (in, out) 10.0 us vs linear 20.0 us" in n for n in result.notes)


def test_two_graphs_of_one_model_share_each_transposed_weight_and_a_changed_weight_gets_a_fresh_one():
    torch.manual_seed(0)
    model = TwoLinears().eval()
    first, ctx1 = _always(model, (torch.randn(2, 32),))
    second, ctx2 = _always(model, (torch.randn(3, 32),))
    a, b = run_pass(MatvecWeightLayout(), first, ctx1).module, run_pass(MatvecWeightLayout(), second, ctx2).module

    def in_out(gm):
        return {tuple(t.shape): t for name, t in gm.named_buffers() if "in_out" in name}

    shared = in_out(a)
    assert {s: t.data_ptr() for s, t in shared.items()} == {s: t.data_ptr() for s, t in in_out(b).items()}
    with torch.no_grad():
        model.up.weight.add_(1.0)  # the user changes a weight in place: a new capture must not reuse the old copy
    third, ctx3 = _always(model, (torch.randn(2, 32),))
    c = run_pass(MatvecWeightLayout(), third, ctx3).module
    x = torch.randn(2, 32)
    assert_outputs_close(call(model, (x,)), call(c, (x,)))
