"""The differential check on fresh random models: a new seed each day, thousands of models.

``tests/test_differential.py`` checks the same derandomized models on every CI
run (fast, repeatable). This script draws *fresh* ones: hypothesis seeded with
``--seed`` (default: today's date as YYYYMMDD, UTC), ``--count`` models (default
2,000) through the default pipeline with the speed-chosen rewrites forced and
graphopt's own verification off, each checked as the CI test checks it
(:func:`tests.support.strategies.check_recipe`: outputs against the model on the
example and a fresh input, no new aliasing of an input, a weight or another output).

    python benchmarks/differential_fresh.py --seed 20261206 --count 2000

Prints the seed, the count and how many were wrong (numerics or structure),
aliasing, or raised, with the first failing recipes; exits 1 when any failed.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: tests.support is the generator

from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402

from tests.support.strategies import Recipe, check_recipe, model_recipes  # noqa: E402

#: what tests/test_differential.py forces, so the rewrites themselves are tested
ALWAYS_REWRITE = {"merge_matmuls_policy": "always", "weight_layout_policy": "always"}


def classify(message: str) -> str:
    """A failed check's kind, from check_recipe's assertion: aliasing, raised or wrong."""
    if "now alias" in message:
        return "aliasing"
    if message.startswith("pass raised"):
        return "raised"
    return "wrong"


def run(seed_value: int, count: int, show: int) -> tuple[int, Counter, list[tuple[str, str]]]:
    """Check ``count`` models drawn with ``seed_value``; (models run, failures by kind, first failures)."""
    kinds: Counter = Counter()
    failures: list[tuple[str, str]] = []
    ran = [0]

    @seed(seed_value)
    @settings(max_examples=count, deadline=None, derandomize=False, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), print_blob=False)
    @given(recipe=model_recipes())
    def check(recipe: Recipe) -> None:
        ran[0] += 1
        try:
            check_recipe(recipe, options=ALWAYS_REWRITE)
        except AssertionError as exc:
            kind = classify(str(exc))
            kinds[kind] += 1
            if len(failures) < show:
                failures.append((kind, f"{str(exc).splitlines()[0][:300]}\n  {recipe!r}"))
        except Exception as exc:  # noqa: BLE001 - graphopt raising on a valid model is a failure to count
            kinds["raised"] += 1
            if len(failures) < show:
                failures.append(("raised", f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}\n  {recipe!r}"))

    check()
    return ran[0], kinds, failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=int(datetime.datetime.now(datetime.UTC).strftime("%Y%m%d")))
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--show", type=int, default=10, help="failing recipes to print")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)  # rolled-back and declined notes of thousands of models
    start = time.perf_counter()
    ran, kinds, failures = run(args.seed, args.count, args.show)
    print(f"seed {args.seed}: {ran} models, {kinds['wrong']} wrong, {kinds['aliasing']} aliasing, "
          f"{kinds['raised']} raised ({time.perf_counter() - start:.0f} s)")
    for kind, text in failures:
        print(f"- {kind}: {text}")
    return 1 if sum(kinds.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
