"""The controller, agents and engines together, in the lab: breakers driven by
engine health and the kernel, load-aware weights, identical tables on every
node, and static stability when the controller goes away."""

from __future__ import annotations

import collections
import signal
import threading
import time
from collections.abc import Iterator

import pytest

from lab import fleet

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def fl() -> Iterator[fleet.Fleet]:
    reason = fleet.env_ok()
    if reason:
        pytest.skip(reason)
    with fleet.Fleet(subnet="10.77.95.0/24", engines=3, nodes=2) as f:
        yield f


def _all_active(f: fleet.Fleet, node: int) -> bool:
    view = f.backends(node)
    return len(view) == len(f.engines) and all(b["state"] == "active" for b in view.values())


def _recover(f: fleet.Fleet) -> None:
    """Undo whatever a test did to the engines; wait for every node to see them active."""
    for name, proc in f.engine_procs.items():
        if proc.poll() is not None:
            f.start_engine(name)
        else:
            f.fault(name, latency_ms=0, error_rate=0, hang=False, refuse=False)
    for n in range(len(f.nodes)):
        assert fleet.wait_for(lambda n=n: _all_active(f, n), 30), f.backends(n)


def test_two_nodes_pick_the_same_engine_for_a_session(fl: fleet.Fleet) -> None:
    _recover(fl)
    sessions = [f"two-{i}" for i in range(200)]
    a = fl.sessions(0, sessions)
    b = fl.sessions(1, sessions)
    assert not [e for e in a + b if e.startswith("error")]
    assert a == b
    assert len(set(a)) == 3


def test_engine_crash_opens_its_breaker_and_its_sessions_move_and_stay(fl: fleet.Fleet) -> None:
    _recover(fl)
    sessions = [f"crash-{i}" for i in range(150)]
    before = fl.sessions(0, sessions)
    victim_id = collections.Counter(before).most_common(1)[0][0]
    victim = next(n for n in fl.engines if fl.engine_id(n) == victim_id)
    fl.fault(victim, crash=True)
    crashed_at = time.monotonic()
    # Every node keeps connecting while the breakers react.
    after0 = fl.sessions(0, sessions)
    after1 = fl.sessions(1, sessions)
    failures = [e for e in after0 + after1 if e.startswith("error")]
    assert len(failures) <= 3, collections.Counter(failures)
    assert fleet.wait_for(lambda: all(fl.backends(n)[victim_id]["state"] == "open"
                                      for n in range(2)), 10)
    opened_after = time.monotonic() - crashed_at
    # Sessions that were elsewhere stayed; the victim's moved, and stay where they went.
    again = fl.sessions(0, sessions)
    for b, a, r in zip(before, after0, again, strict=True):
        if a.startswith("error"):
            continue
        assert a != victim_id
        if b != victim_id:
            assert a == b
        assert r == a
    print(f"breaker open on every node {opened_after * 1000:.0f} ms after the crash "
          "(upper bound: includes the connect loops)")
    # The engine comes back: half-open (probing), then closed (active) again.
    fl.start_engine(victim)
    assert fleet.wait_for(lambda: fl.backends(0)[victim_id]["state"] in ("probing", "active"),
                          20), fl.backends(0)[victim_id]
    assert fleet.wait_for(lambda: fl.backends(0)[victim_id]["state"] == "active", 20)
    assert not fl.backends(0)[victim_id]["kernel_tripped"]


def test_loaded_engine_gets_a_smaller_share_of_new_sessions(fl: fleet.Fleet) -> None:
    _recover(fl)
    hot = "gpu1"
    hot_id = fl.engine_id(hot)
    stop = threading.Event()

    def hammer() -> None:
        import httpx
        body = {"model": "kvroute/tiny-sim", "prompt": "x " * 200, "max_tokens": 400}
        with httpx.Client(base_url=f"http://{hot_id}", timeout=30, trust_env=False) as c:
            while not stop.is_set():
                try:
                    c.post("/v1/completions", json=body)
                except httpx.HTTPError:
                    time.sleep(0.05)

    # A shrunken KV cache and a queue of long requests sent straight to the pod.
    fl.fault(hot, kv_blocks=64)
    threads = [threading.Thread(target=hammer, daemon=True) for _ in range(12)]
    for t in threads:
        t.start()
    try:
        assert fleet.wait_for(lambda: fl.backends(0)[hot_id]["load"] > 0, 10)
        time.sleep(1.0)  # a few controller ticks: weights follow the load
        new = fl.sessions(0, [f"hot-{i}" for i in range(600)])
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        fl.fault(hot, kv_blocks=4096)
    counts = collections.Counter(new)
    others = [counts[fl.engine_id(n)] for n in fl.engines if n != hot]
    assert counts[hot_id] < min(others) / 2, counts


def test_controller_death_changes_no_route_and_a_restart_converges(fl: fleet.Fleet) -> None:
    _recover(fl)
    sessions = [f"static-{i}" for i in range(200)]
    before = fl.sessions(0, sessions)
    fl.stop_controller(signal.SIGKILL)
    time.sleep(1.0)
    during = fl.sessions(0, sessions)
    assert during == before
    assert fl.sessions(1, sessions) == before
    fl.start_controller()
    assert fleet.wait_for(lambda: all(_all_active(fl, n) for n in range(2)), 30)
    assert fl.sessions(0, sessions) == before


def test_load_reaches_every_agent_within_a_few_scrapes(fl: fleet.Fleet) -> None:
    _recover(fl)
    target = "gpu2"
    target_id = fl.engine_id(target)
    fl.fault(target, kv_blocks=16)
    import httpx
    started = time.monotonic()
    stop = threading.Event()

    def one() -> None:
        with httpx.Client(base_url=f"http://{target_id}", timeout=30, trust_env=False) as c:
            while not stop.is_set():
                try:
                    c.post("/v1/completions", json={"model": "kvroute/tiny-sim",
                                                    "prompt": "y " * 100, "max_tokens": 300})
                except httpx.HTTPError:
                    time.sleep(0.05)

    t = threading.Thread(target=one, daemon=True)
    t.start()
    try:
        assert fleet.wait_for(lambda: all(fl.backends(n)[target_id]["load"] > 0
                                          for n in range(2)), 5, interval=0.005)
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        t.join(10)
        fl.fault(target, kv_blocks=4096)
    print(f"engine load change visible in the kernel on every agent after {elapsed * 1000:.0f} ms "
          f"(scrape interval {fl.scrape_interval * 1000:.0f} ms)")
    assert elapsed < 2.0
