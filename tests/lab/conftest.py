"""Lab fixtures: a whole fleet (engines, controller, two agents) per test module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from lab import fleet


def running_fleet(engines: int, nodes: int = 2) -> Iterator[fleet.Fleet]:
    reason = fleet.env_ok()
    if reason:
        pytest.skip(reason)
    with fleet.Fleet(engines=engines, nodes=nodes) as f:
        yield f


@pytest.fixture(scope="module")
def fl() -> Iterator[fleet.Fleet]:
    """Three engines, two nodes: one per test module, torn down after it."""
    yield from running_fleet(engines=3)


@pytest.fixture(scope="module")
def fl4() -> Iterator[fleet.Fleet]:
    """Four engines, two nodes."""
    yield from running_fleet(engines=4)
