"""Lab fixtures: a whole fleet (engines, controller, two agents) per test module."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import httpx
import pytest

from lab import fleet


def running_fleet(engines: int, nodes: int = 2) -> Iterator[fleet.Fleet]:
    reason = fleet.env_ok()
    if reason:
        pytest.skip(reason)
    with fleet.Fleet(engines=engines, nodes=nodes) as f:
        yield f


def recover(f: fleet.Fleet) -> None:
    """Undo whatever a test did to the engines (faults off, dead ones restarted) and wait
    until every node sees every engine active and every agent has converged."""
    for name, proc in f.engine_procs.items():
        if proc.poll() is not None:
            f.start_engine(name)
        else:
            f.fault(name, latency_ms=0, error_rate=0, hang=False, stall=False,
                    spare_health=False, refuse=False)

    def all_active(n: int) -> bool:
        view = f.backends(n)
        if len(view) == len(f.engines) and all(b["state"] == "active"
                                               for b in view.values()):
            return True
        # An engine that failed on 5xx closes only on a served request (a quiet probe
        # proves nothing): serve one straight from its pod, as a client would.
        for name in f.engines:
            with contextlib.suppress(httpx.HTTPError):
                httpx.post(f"http://{f.engine_id(name)}/v1/completions", timeout=2,
                           json={"prompt": "recover", "max_tokens": 1}, trust_env=False)
        time.sleep(0.1)
        return False

    for n in range(len(f.nodes)):
        assert fleet.wait_for(lambda n=n: all_active(n), 30), f.backends(n)
    assert fleet.wait_for(f.converged, 30), f.log("controller")


@pytest.fixture(scope="module")
def fl() -> Iterator[fleet.Fleet]:
    """Three engines, two nodes: one per test module, torn down after it."""
    yield from running_fleet(engines=3)


@pytest.fixture(scope="module")
def fl4() -> Iterator[fleet.Fleet]:
    """Four engines, two nodes."""
    yield from running_fleet(engines=4)
