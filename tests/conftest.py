"""Test layers: tests/unit (no root), tests/kernel (real programs), tests/lab (end to end).

Each folder's tests get the folder's marker, so `pytest -m unit` runs the pure layer alone.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

_LAYER_MARKERS = {"unit": "unit", "kernel": "bpf", "lab": "lab"}


def sweep_dead_labs(write: Callable[[str], object]) -> None:
    """Remove labs an interrupted run left (their owner process is gone), saying what went:
    without this a killed `make test` fails the next one until someone runs `kvroute lab
    clean`. Live labs, another run's included, are left alone."""
    if os.geteuid() != 0:
        return  # an unprivileged run builds no lab, and could remove none
    import lab.netns
    try:
        lines = lab.netns.sweep().lines()
    except Exception as exc:  # a host without what labs need: their tests skip, say why
        lines = [f"could not look for dead labs: {exc}"]
    for line in lines:
        write(f"kvroute: {line}")


def pytest_sessionstart(session: pytest.Session) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    sweep_dead_labs(reporter.write_line if reporter is not None else print)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = Path(__file__).parent
    for item in items:
        rel = Path(str(item.fspath)).relative_to(root)
        marker = _LAYER_MARKERS.get(rel.parts[0]) if len(rel.parts) > 1 else None
        if marker:
            item.add_marker(marker)
