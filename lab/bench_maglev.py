"""Maglev table build benchmark (the issue's acceptance numbers).

``run()`` times, best of ``repeat`` runs each (wall clock, ``time.perf_counter``):

* ``build`` of one service with 10, 100 and 1,000 backends at M=16381 and M=65537, with
  equal weights (the baseline) and with weights spread 1..1000 as a load-driven policy
  makes them; the target is <= 50 ms at M=65537 x 1,000;
* ``build_many`` of 10,000 services x 10 backends at M=1021 (best of ``repeat``;
  weights all 100, and mixed 50..200)
  and, with ``large_repeat``, at M=16381 (one run takes about a minute).

Run alone with ``python -m lab.bench_maglev``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from controller import policy
from dataplane import maglev


def _best(fn: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _backend(service: int, backend: int) -> str:
    return f"10.{service // 250 % 250}.{service % 250}.{backend + 1}:8000/tcp"


WEIGHTED_SIZES = (16381, 65537)
WEIGHTED_BACKENDS = (10, 100, 1000)


def spread_weights(n: int) -> list[int]:
    """The controller's weights for n engines at loads spread over all 16 of its bands
    (controller.policy: the busiest band gets 1/16 of an idle engine's weight)."""
    levels = policy.PolicyConfig().levels
    return [policy.weight_for(i % levels, levels) for i in range(n)]


def weighted(repeat: int) -> list[dict[str, Any]]:
    """One service's table at each size and backend count: equal weights, then spread
    weights with their ratio to the equal-weight build of the same run."""
    rows: list[dict[str, Any]] = []
    for size in WEIGHTED_SIZES:
        for n in WEIGHTED_BACKENDS:
            ids = [_backend(i, 0) for i in range(n)]

            def table(weights: list[int], ids: list[str] = ids, size: int = size) -> object:
                return maglev.build(ids, weights, size, 1)

            equal = _best(lambda: table([100] * n), repeat)  # noqa: B023 - called at once
            spread = spread_weights(n)
            took = _best(lambda: table(spread), repeat)  # noqa: B023 - called at once
            row: dict[str, Any] = {
                "name": f"maglev.build {n} backends M={size} weighted", "seconds": took,
                "equal_weights_seconds": equal, "ratio_to_equal": round(took / equal, 3),
                "runs": repeat, "backends": n, "size": size}
            if n == 1000 and size == 65537:
                row["target_seconds"] = 0.050
            rows.append(row)
    return rows


def run(repeat: int = 5, services: int = 10_000, large_repeat: int = 0,
        quick: bool = False) -> list[dict[str, Any]]:
    """Return one row per benchmark: name, seconds (best of N runs) and its parameters;
    the M=16381 batch only with ``large_repeat`` runs. ``quick``: 3 runs each, 1,000
    services."""
    if quick:
        repeat, services = 3, 1_000
    rows = weighted(repeat)
    groups = [([_backend(s, b) for b in range(10)], [100] * 10) for s in range(services)]
    mixed = [
        (ids, [(50, 100, 150, 200)[(s + b) % 4] for b in range(10)])
        for s, (ids, _) in enumerate(groups)
    ]
    cases = (
        ("", groups, 1021, repeat),
        (" mixed weights", mixed, 1021, repeat),
        # at M=16381 the batch took a minute idle (5 under load): only when asked
        *((("", groups, 16381, large_repeat),) if large_repeat else ()),
    )
    for label, gs, size, runs in cases:

        def many(gs: list[tuple[list[str], list[int]]] = gs, size: int = size) -> object:
            return maglev.build_many(gs, size, 1)

        rows.append(
            {
                "name": f"maglev.build_many {services}x10 M={size}{label}",
                "seconds": _best(many, runs),
                "runs": runs,
                "services": services,
                "backends": 10,
                "size": size,
            }
        )
    return rows


if __name__ == "__main__":
    for row in run():
        print(json.dumps(row))
