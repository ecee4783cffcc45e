"""The fan-out bench end to end at toy size: the real gRPC server and agents on loopback."""

from __future__ import annotations

import pytest

from lab import bench_fanout

pytestmark = [pytest.mark.unit, pytest.mark.timeout(120)]


def test_a_small_run_times_every_probe_at_every_agent() -> None:
    rows, settings = bench_fanout.run(agents=6, engines=12, phases=((0, 0), (10, 3)),
                                      seconds=2.5, procs=2)
    idle, busy = rows
    assert settings["agent_processes"] == 2 and settings["entry_bytes"] > 10
    assert idle["changes_per_s"] == 0 and idle["bytes_per_agent_s"] == 0
    assert busy["engines_per_report"] == 3 and busy["changes_per_s"] > 0
    # the probes reached all six agents, after they were reported (the last one may
    # land after the run's grace second on a loaded machine)
    assert busy["probes_sent"] >= 20 and busy["probes"] >= busy["probes_sent"] - 1
    assert 0 < busy["first_agent_p50_ms"] <= busy["fanout_p50_ms"] <= busy["fanout_p99_ms"]
    assert busy["bytes_per_agent_s"] > 0 and busy["controller_cpu"] > 0


def test_bad_phases_are_refused_before_anything_starts() -> None:
    with pytest.raises(ValueError, match="idle baseline"):
        bench_fanout.run(agents=2, engines=4, phases=((10, 1),))
    with pytest.raises(ValueError, match="engines a report"):
        bench_fanout.run(agents=2, engines=4, phases=((0, 0), (10, 9)))
    with pytest.raises(ValueError, match="whole seconds"):
        bench_fanout.run(agents=2, engines=4, seconds=1)
