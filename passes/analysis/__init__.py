"""Analysis passes: they annotate ``node.meta`` and ``ctx.cache`` and never modify the graph."""
