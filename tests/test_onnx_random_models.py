"""export_onnx on random models (tests/strategies.py): onnx.checker, then onnxruntime against the model.

Every random model is optimized with the default pipeline, exported (target
onnxruntime) and checked by export_onnx itself; the test then runs the file in
onnxruntime on inputs graphopt never saw and compares with the user's model.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import onnx
import torch
from hypothesis import given

import graphopt
from tests.support.onnx_support import rel_l2, run_onnx, torch_leaves
from tests.support.strategies import Recipe, build_model, differential_settings, make_inputs, model_recipes


@differential_settings(max_examples=int(os.environ.get("GRAPHOPT_ONNX_EXAMPLES", "12")), shrink=False)
@given(recipe=model_recipes())
def test_random_models_export_and_match_in_onnxruntime(recipe: Recipe) -> None:
    model, args, kwargs = build_model(recipe)
    result = graphopt.optimize(model, args, kwargs)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.onnx")
        info = graphopt.export_onnx(result, path, n_random_inputs=1)
        onnx.checker.check_model(path, full_check=True)
        assert info.numerics.ok, (recipe, info.numerics.reason)
        fresh_args, fresh_kwargs = make_inputs(recipe, 20_000)
        with torch.no_grad():
            expected = torch_leaves(model(*fresh_args, **fresh_kwargs))
        got = run_onnx(path, [x for x in list(fresh_args) + list(fresh_kwargs.values())
                              if isinstance(x, torch.Tensor)])
        assert len(got) == len(expected), recipe
        for e, g in zip(expected, got):
            assert g.shape == e.shape, recipe
            if np.issubdtype(e.dtype, np.floating) and np.linalg.norm(e) > 0:
                assert rel_l2(e, g) <= 1e-4, recipe
            else:
                np.testing.assert_allclose(g, e, atol=1e-6)
