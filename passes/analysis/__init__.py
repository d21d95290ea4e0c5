"""Analysis passes: they return a typed result (``ctx.analysis(TheClass, gm)``), annotate ``node.meta``
(keys in :mod:`graphopt.meta`) and never modify the graph."""
