"""The agent reports a write the kernel refused as a message, keeps its state, and tries
again (the applier's all-or-nothing writes are tested on real maps in
tests/kernel/test_apply_atomic.py). No kernel here: the applier is a stand-in."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, cast

import pytest

from dataplane import agent, apply, model
from dataplane.settings import Settings


class FlakyApplier:
    """Refuses the first ``failures`` applies as Applier does when a write failed."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.applied: list[model.DesiredState] = []

    def apply(self, desired: model.DesiredState) -> apply.ApplyResult:
        if self.failures:
            self.failures -= 1
            raise apply.ApplyError("writing the maps failed ([Errno 7] injected): every "
                                   "write was undone, the maps hold the previous state",
                                   rolled_back=True)
        self.applied.append(desired)
        return apply.ApplyResult({"services_put": 1}, 0.0, 0.0)


def test_a_refused_write_on_reload_is_a_message_and_the_next_poll_retries(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "kvroute.yaml"
    path.write_text("services:\n  - {name: web, vip: 10.96.0.20, port: 80,"
                    " backends: [{address: 10.0.0.5, port: 80}]}\n")
    a = agent.Agent(Settings(pin_dir=tmp_path / "pins"), tmp_path, path)
    fake = FlakyApplier(failures=1)
    a.applier = cast(Any, fake)
    a._mtime = path.stat().st_mtime  # as after a good start
    with caplog.at_level(logging.ERROR, logger="kvroute"):
        assert a.reload() is False
    (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert record.getMessage().startswith("not applied, keeping the current state: writing "
                                          "the maps failed")
    assert record.exc_info is None  # a message, not a traceback
    assert fake.applied == []
    # The file did not change, yet the next poll applies it again.
    assert a._current_mtime() != a._mtime
    assert a.reload() is True
    assert [s.name for s in fake.applied[0].services] == ["web"]
