"""Maglev table build benchmark (the issue's acceptance numbers).

``run()`` times, best of ``repeat`` runs each (wall clock, ``time.perf_counter``):

* ``build`` of one service with 1000 backends at M=65537 (target: <= 50 ms);
* ``build_many`` of 10,000 services x 10 backends at M=1021 (best of ``repeat``;
  weights all 100, and mixed 50..200)
  and at M=16381 (best of ``large_repeat``: one run takes about a minute).

Run alone with ``python -m lab.bench_maglev``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

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


def run(repeat: int = 5, services: int = 10_000, large_repeat: int = 1) -> list[dict[str, Any]]:
    """Return one row per benchmark: name, seconds (best of N runs) and its parameters."""
    rows: list[dict[str, Any]] = []
    ids = [_backend(i, 0) for i in range(1000)]
    weights = [100] * len(ids)
    rows.append(
        {
            "name": "maglev.build 1000 backends M=65537",
            "seconds": _best(lambda: maglev.build(ids, weights, 65537, 1), repeat),
            "runs": repeat,
            "backends": 1000,
            "size": 65537,
            "target_seconds": 0.050,
        }
    )
    groups = [([_backend(s, b) for b in range(10)], [100] * 10) for s in range(services)]
    mixed = [
        (ids, [(50, 100, 150, 200)[(s + b) % 4] for b in range(10)])
        for s, (ids, _) in enumerate(groups)
    ]
    cases = (
        ("", groups, 1021, repeat),
        (" mixed weights", mixed, 1021, repeat),
        ("", groups, 16381, large_repeat),
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
