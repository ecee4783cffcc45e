"""The multi-node lab's fleet scenario (lab/scenario.py, what `make vagrant-test` runs
across VMs) over the netns lab: the same code, with the nodes as cgroups on one
machine and the topology built from the namespaces (Fleet.topology)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from lab import fleet, scenario
from tests.lab import conftest

pytestmark = pytest.mark.timeout(240)


def test_the_scenario_fails_when_sessions_do_not_stick(fl: fleet.Fleet) -> None:
    # A client whose sessions land elsewhere on every turn: the scenario must say so.
    engines = sorted(fl.engine_id(n) for n in fl.engines)
    turn = iter(range(1000))

    def shuffling(names: Sequence[str]) -> list[str]:
        t = next(turn)
        return [engines[(i + t) % len(engines)] for i in range(len(names))]

    with pytest.raises(scenario.ScenarioError, match="changed engine"):
        scenario.run(fl.topology(), shuffling, sessions=30, crash=False, say=lambda _: None)


def test_the_vm_labs_scenario_passes_over_namespaces(fl: fleet.Fleet) -> None:
    conftest.recover(fl)
    topo = fl.topology()
    assert set(topo.nodes) == {n.name for n in fl.nodes}
    assert {e.identity for e in topo.engines} == {fl.engine_id(n) for n in fl.engines}
    said: list[str] = []

    def connect(names: Sequence[str]) -> list[str]:
        return fl.sessions(0, list(names))

    scenario.run(topo, connect, sessions=150, fail_k=fl.fail_k, say=said.append)
    assert [line[:2] for line in said] == ["1.", "2.", "3."]
