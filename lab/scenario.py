"""The fleet scenario, over any topology: the netns lab (:class:`lab.fleet.Fleet`) and
the multi-node VM lab (``make vagrant-test``) run this same code.

1. every node's agent follows the controller and has applied its latest snapshot;
2. tagged sessions, a few turns each, through the VIP from the client: every session
   keeps its engine on every turn, and every engine gets sessions;
3. the engine holding the most sessions crashes: at most ``fail_k`` connects fail (the
   kernel trips it), then its sessions have moved and the others' stayed put.

``connect(sessions)`` opens one tagged connection per session from the client node
and returns the engine that answered each (``address:port``), or ``error:...``.
"""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import Callable, Sequence

import httpx
from prometheus_client.parser import text_string_to_metric_families

from lab import topology

Connect = Callable[[Sequence[str]], list[str]]


class ScenarioError(AssertionError):
    """A step of the scenario did not hold; the message says which and what was seen."""


def converged(topo: topology.Topology) -> bool:
    """Every node's agent watches the controller and applied its latest snapshot."""
    try:
        text = httpx.get(f"{topo.controller_url}/metrics", timeout=2, trust_env=False).text
    except httpx.HTTPError:
        return False
    nodes: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in ("kvroute_controller_agent_watching",
                               "kvroute_controller_agent_converged"):
                node = _node_of(topo, sample.labels["agent"])
                if node is not None:
                    nodes.setdefault(node, {})[sample.name] = sample.value
    return set(nodes) >= set(topo.nodes) and all(
        nodes[n].get("kvroute_controller_agent_watching") == 1
        and nodes[n].get("kvroute_controller_agent_converged") == 1 for n in topo.nodes)


def _node_of(topo: topology.Topology, agent: str) -> str | None:
    """The node an agent id names (ids are NODE or NODE-..., as the controller checks)."""
    matches = [n for n in topo.nodes if agent == n or agent.startswith(n + "-")]
    return max(matches, key=len) if matches else None


def _answers(engine: str) -> bool:
    """Does the engine at ``engine`` (address:port) still accept a connection?"""
    try:
        httpx.get(f"http://{engine}/health", timeout=0.5, trust_env=False)
    except httpx.HTTPError:
        return False
    return True


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` seconds pass; its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def run(topo: topology.Topology, connect: Connect, sessions: int = 200, turns: int = 3,
        fail_k: int = 3, crash: bool = True, say: Callable[[str], None] = print,
        timeout: float = 60) -> None:
    """Run the steps in order; raise ScenarioError at the first that does not hold."""
    if not wait_for(lambda: converged(topo), timeout, 0.25):
        raise ScenarioError(f"agents of {sorted(topo.nodes)} did not converge in {timeout} s")
    say(f"1. {len(topo.nodes)} agents follow the controller at {topo.controller_target}")

    names = [f"scenario-{i}" for i in range(sessions)]
    first = connect(names)
    errors = [e for e in first if e.startswith("error")]
    if errors:
        raise ScenarioError(f"connects failed: {collections.Counter(errors)}")
    for turn in range(2, turns + 1):
        again = connect(names)
        moved = sum(a != b for a, b in zip(first, again, strict=True))
        if moved:
            raise ScenarioError(f"turn {turn}: {moved} of {sessions} sessions changed engine")
    spread = collections.Counter(first)
    missing = {e.identity for e in topo.engines} - set(spread)
    if missing:
        raise ScenarioError(f"no session reached {sorted(missing)}: {dict(spread)}")
    say(f"2. {sessions} sessions x {turns} turns kept their engines: {dict(spread)}")

    if not crash:
        return
    victim = spread.most_common(1)[0][0]
    with contextlib.suppress(httpx.HTTPError):  # a crash may cut the answer short
        httpx.post(f"http://{victim}/admin/faults", json={"crash": True}, timeout=2,
                   trust_env=False)
    # Until the engine is gone, a connect may still be accepted and its request cut
    # short: a failure the client sees but the kernel counts as a connect that worked
    # (it resets the trip count). The bound is about refused connects, so wait for those.
    if not wait_for(lambda: not _answers(victim), 10, 0.05):
        raise ScenarioError(f"{victim} still answers 10 s after it was told to crash")
    after = connect(names)
    failures = [e for e in after if e.startswith("error")]
    if len(failures) > fail_k:
        raise ScenarioError(f"after {victim} crashed, {len(failures)} connects failed "
                            f"(the kernel trips it after {fail_k})")
    settled = connect(names)
    for before, now in zip(first, settled, strict=True):
        if now.startswith("error") or now == victim:
            raise ScenarioError(f"after the crash a session still got {now}")
        if before != victim and now != before:
            raise ScenarioError(f"a session on {before} moved to {now} though its engine lives")
    say(f"3. {victim} crashed: {len(failures)} connects failed, its "
        f"{spread[victim]} sessions moved, the others stayed")
