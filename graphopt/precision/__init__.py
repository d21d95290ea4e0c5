"""Building blocks of the reduced-precision pass (``graphopt.passes.precision``).

* :mod:`.target` -- what the target runs fast: int8 scheme, fp8, float dtypes.
* :mod:`.ops_classes` -- which ATen ops compute (matmuls, convolutions,
  attention), which must stay fp32 (softmax, norms, reductions, exp/log) and
  which follow their inputs' precision.
* :mod:`.calibrate` -- one fp32 run recording each candidate's inputs and
  every value's range.
* :mod:`.quantize` -- the int8 input shift and the pair-safe weight check (the
  quantized linear rewrite itself, built on the site layer, is
  ``graphopt.passes.precision.quantized_linears``).
* :mod:`.lower_float` -- bf16/fp16 regions with fp32 islands, casts at their
  borders, fp16 overflow scaling, redundant cast pairs removed.
* :mod:`.speed` -- microbenchmarks and the measured decision
  (:func:`.speed.choose_precision`).
* :mod:`.search` -- the error-budget search that keeps the most error-costly
  nodes in fp32.
"""
