"""Test layers: tests/unit (no root), tests/kernel (real programs), tests/lab (end to end).

Each folder's tests get the folder's marker, so `pytest -m unit` runs the pure layer alone.
"""

from __future__ import annotations

from pathlib import Path

import pytest

_LAYER_MARKERS = {"unit": "unit", "kernel": "bpf", "lab": "lab"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = Path(__file__).parent
    for item in items:
        rel = Path(str(item.fspath)).relative_to(root)
        marker = _LAYER_MARKERS.get(rel.parts[0]) if len(rel.parts) > 1 else None
        if marker:
            item.add_marker(marker)
