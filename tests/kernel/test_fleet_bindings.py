"""Fleet-wide bindings on real sockets: the kernel's announcements on kvr_events,
bindings written by user space, no local expiry, touch throttling, placement by
residency, and the move bound (sticky until saturated)."""

from __future__ import annotations

import select
import time
from collections.abc import Iterator
from typing import Any

import pytest

from dataplane import abi, bpfsys, client, events, inspect, model
from tests.kernel.conftest import POD_PORT, Node, connect_names

VIP = "10.96.20.1"
PODS = ["gpu0", "gpu1", "gpu2", "gpu3"]


def svc(backends: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
    return {"name": "fleet", "vip": VIP, "port": 80, "backends": backends,
            "affinity": "session", **kw}


class Ring:
    """Everything the kernel put on kvr_events, drained on demand."""

    def __init__(self, node: Node) -> None:
        self.got: list[events.Event] = []
        self.reader = events.EventReader(node.maps, self.got.append)

    def drain(self) -> list[events.Event]:
        self.reader.consume()
        out, self.got[:] = list(self.got), []
        return out


@pytest.fixture
def fleet(kv: Node) -> Iterator[Node]:
    """The session's node applying in fleet mode (services with affinity get
    SVC_F_FLEET); back to plain mode afterwards."""
    kv.applier.fleet = True
    try:
        yield kv
    finally:
        kv.apply([])
        kv.applier.fleet = False


@pytest.fixture
def ring(kv: Node) -> Iterator[Ring]:
    r = Ring(kv)
    r.drain()
    yield r
    r.reader.close()


def _ids(kv: Node) -> tuple[int, dict[str, int]]:
    """The service's id and the backend id of each pod."""
    _, s = inspect.find_service(kv.maps, f"{VIP}:80")
    by_addr = {b["address"]: b["id"] for b in inspect.backends(kv.maps)}
    return s.id, {p: by_addr[f"{kv.pod(p).address}:{POD_PORT}/tcp"]
                  for p in kv.lab.pods if f"{kv.pod(p).address}:{POD_PORT}/tcp" in by_addr}


def _svc_counter(kv: Node, counter: abi.SvcCounter) -> int:
    _, s = inspect.find_service(kv.maps, f"{VIP}:80")
    values = kv.maps.percpu_sum("kvr_svc_cnt_v3", abi.ct.c_uint32(s.id), abi.SvcCounters)
    return values[counter] if values else 0


def test_fleet_flag_follows_the_applier(fleet: Node) -> None:
    fleet.apply([svc([fleet.backend(p) for p in PODS])])
    _, s = inspect.find_service(fleet.maps, f"{VIP}:80")
    assert s.flags & abi.SVC_F_FLEET
    fleet.applier.fleet = False
    fleet.apply([svc([fleet.backend(p) for p in PODS], affinity_timeout=61)])
    _, s = inspect.find_service(fleet.maps, f"{VIP}:80")
    assert not s.flags & abi.SVC_F_FLEET
    # Services without affinity have no bindings to share.
    fleet.applier.fleet = True
    fleet.apply([svc([fleet.backend(p) for p in PODS], affinity="none")])
    _, s = inspect.find_service(fleet.maps, f"{VIP}:80")
    assert not s.flags & abi.SVC_F_FLEET


@pytest.mark.kernel_matrix  # the ring buffer and the tail call, in every kernel
def test_a_new_session_is_announced_once(fleet: Node, ring: Ring) -> None:
    fleet.apply([svc([fleet.backend(p) for p in PODS])])
    svc_id, ids = _ids(fleet)
    (name,) = fleet.run(connect_names, VIP, 80, 0, ["alice"])
    assert name in PODS
    # fileno() tells an event loop that records wait.
    assert select.select([ring.reader.fileno()], [], [], 2)[0]
    assert ring.drain() == [events.Event(abi.EV_BIND, svc_id, ids[name], abi.NO_BACKEND,
                                         client.session_hash("alice"))]
    # The same session again: a hit within the touch throttle, nothing to announce.
    assert fleet.run(connect_names, VIP, 80, 0, ["alice"]) == [name]
    assert ring.drain() == []
    # The kernel counted the binding against its backend until user space says otherwise.
    assert fleet.maps.sessions().get(ids[name]) == 1
    shown = {b["id"]: b["sessions"] for b in inspect.backends(fleet.maps)}
    assert shown[ids[name]] == 1 and sum(shown.values()) == 1
    (entry,) = inspect.affinity(fleet.maps, svc_id)
    assert entry["backend"] == ids[name] and entry["reported_seconds"] <= 1


def test_bindings_written_by_user_space_are_used_and_removed(fleet: Node, ring: Ring) -> None:
    fleet.apply([svc([fleet.backend(p) for p in PODS])])
    svc_id, ids = _ids(fleet)
    key = client.session_hash("bob")
    (owner,) = fleet.run(connect_names, VIP, 80, 0, ["bob"])
    fleet.maps.delete_bindings([(svc_id, key)])
    ring.drain()
    other = next(p for p in PODS if p != owner)
    fleet.maps.write_bindings([(svc_id, key, ids[other])])
    assert fleet.run(connect_names, VIP, 80, 0, ["bob"] * 3) == [other] * 3
    assert ring.drain() == []  # a hit on a fresh binding: no BIND, no TOUCH yet
    fleet.maps.delete_bindings([(svc_id, key), (svc_id, key + 1)])  # absent keys are fine
    assert not [a for a in inspect.affinity(fleet.maps, svc_id) if a["key"] == f"{key:016x}"]
    # A new binding again; with no sessions anywhere residency ties, and ties go to
    # the first candidate: the Maglev owner.
    fleet.maps.set_sessions({be_id: 0 for be_id in ids.values()})
    assert fleet.run(connect_names, VIP, 80, 0, ["bob"]) == [owner]
    assert [(e.kind, e.be_id) for e in ring.drain()] == [(abi.EV_BIND, ids[owner])]


def _write_stale(kv: Node, svc_id: int, key: int, be_id: int, idle_s: float,
                 reported_ago_s: int = 0) -> None:
    now = time.monotonic_ns()
    bpfsys.update(kv.maps.fd("kvr_affinity"), abi.AffKey(svc_id=svc_id, key=key),
                  abi.AffVal(be_id=be_id, reported_s=now // 10**9 - reported_ago_s,
                             last_ns=now - int(idle_s * 1e9)))


@pytest.mark.parametrize("fleet_mode", [True, False])
def test_only_plain_services_expire_bindings_locally(kv: Node, fleet_mode: bool) -> None:
    kv.applier.fleet = fleet_mode
    try:
        kv.apply([svc([kv.backend(p) for p in PODS], affinity_timeout=1)])
        svc_id, ids = _ids(kv)
        key = client.session_hash("carol")
        (owner,) = kv.run(connect_names, VIP, 80, 0, ["carol"])
        other = next(p for p in PODS if p != owner)
        _write_stale(kv, svc_id, key, ids[other], idle_s=3600)
        expected = other if fleet_mode else owner
        assert kv.run(connect_names, VIP, 80, 0, ["carol"]) == [expected]
    finally:
        kv.apply([])
        kv.applier.fleet = False


def test_touches_are_throttled(fleet: Node, ring: Ring) -> None:
    fleet.apply([svc([fleet.backend(p) for p in PODS], affinity_timeout=40)])  # every 10 s
    svc_id, ids = _ids(fleet)
    key = client.session_hash("dave")
    _write_stale(fleet, svc_id, key, ids["gpu2"], idle_s=1, reported_ago_s=11)
    assert fleet.run(connect_names, VIP, 80, 0, ["dave"] * 3) == ["gpu2"] * 3
    assert ring.drain() == [events.Event(abi.EV_TOUCH, svc_id, ids["gpu2"], abi.NO_BACKEND,
                                         key)]
    # Reported 9 s ago: inside the 10 s window, nothing.
    _write_stale(fleet, svc_id, key, ids["gpu2"], idle_s=1, reported_ago_s=9)
    assert fleet.run(connect_names, VIP, 80, 0, ["dave"] * 2) == ["gpu2"] * 2
    assert ring.drain() == []


def test_new_sessions_go_where_fewest_sessions_are(fleet: Node, ring: Ring) -> None:
    fleet.apply([svc([fleet.backend(p) for p in PODS])])
    _, ids = _ids(fleet)
    fleet.maps.set_sessions({ids["gpu0"]: 5, ids["gpu1"]: 0, ids["gpu2"]: 5, ids["gpu3"]: 5})
    sessions = [f"res-{i}" for i in range(4)]
    assert fleet.run(connect_names, VIP, 80, 0, sessions) == ["gpu1"] * 4
    assert fleet.maps.sessions()[ids["gpu1"]] == 4  # +1 per bind, by the kernel
    assert [e.kind for e in ring.drain()] == [abi.EV_BIND] * 4
    # Without the flag, the Maglev owner decides: not all on one engine.
    fleet.applier.fleet = False
    fleet.apply([svc([fleet.backend(p) for p in PODS], affinity_timeout=61)])
    plain = fleet.run(connect_names, VIP, 80, 0, [f"plain-{i}" for i in range(40)])
    assert len(set(plain)) > 1


def test_residency_is_per_unit_of_weight(fleet: Node) -> None:
    fleet.apply([svc([fleet.backend("gpu0", weight=200), fleet.backend("gpu1", weight=100)])])
    _, ids = _ids(fleet)
    # 4 sessions on weight 2 is 2 per unit; 3 on weight 1 is 3: gpu0 has room.
    fleet.maps.set_sessions({ids["gpu0"]: 4, ids["gpu1"]: 3})
    assert fleet.run(connect_names, VIP, 80, 0, ["w-a"]) == ["gpu0"]
    # 4 / 2 = 2 against 1 / 1 = 1: gpu1 now.
    fleet.maps.set_sessions({ids["gpu0"]: 4, ids["gpu1"]: 1})
    assert fleet.run(connect_names, VIP, 80, 0, ["w-b"]) == ["gpu1"]


def _identity(kv: Node, pod: str) -> str:
    return f"{kv.pod(pod).address}:{POD_PORT}/tcp"


@pytest.mark.parametrize("move_epsilon", [1.0, None])
def test_a_saturated_session_moves_only_with_a_move_bound(
        fleet: Node, ring: Ring, move_epsilon: float | None) -> None:
    pods = PODS[:3]
    fleet.apply([svc([fleet.backend(p) for p in pods], epsilon=0.25,
                     move_epsilon=move_epsilon)])
    svc_id, ids = _ids(fleet)
    (first,) = fleet.run(connect_names, VIP, 80, 0, ["erin"])
    ring.drain()
    moved_before = _svc_counter(fleet, abi.SvcCounter.MOVED_LOAD)
    try:
        _move_and_check(fleet, ring, pods, first, svc_id, ids, moved_before, move_epsilon)
    finally:
        # Live loads outlive an apply in the Applier (and win over a desired state's):
        # leave none for the next test.
        fleet.applier.live_loads.clear()


def _move_and_check(fleet: Node, ring: Ring, pods: list[str], first: str, svc_id: int,
                    ids: dict[str, int], moved_before: int,
                    move_epsilon: float | None) -> None:
    # Near idle: 3 requests against none is 3x the mean, but no hot spot (MOVE_MIN_EXCESS).
    unit = model.LOAD_PER_REQUEST
    fleet.applier.set_loads({_identity(fleet, p): 3 * unit if p == first else 0 for p in pods})
    assert fleet.run(connect_names, VIP, 80, 0, ["erin"]) == [first]
    assert ring.drain() == []
    # Mean 4 requests: 10 is over (1 + 1.0) x 4, and 6 above it.
    fleet.applier.set_loads({_identity(fleet, p): 10 * unit if p == first else unit
                             for p in pods})
    (then,) = fleet.run(connect_names, VIP, 80, 0, ["erin"])
    if move_epsilon is None:
        assert then == first
        assert ring.drain() == []
        assert _svc_counter(fleet, abi.SvcCounter.MOVED_LOAD) == moved_before
        return
    assert then != first
    assert ring.drain() == [events.Event(abi.EV_BIND, svc_id, ids[then], ids[first],
                                         client.session_hash("erin"))]
    assert _svc_counter(fleet, abi.SvcCounter.MOVED_LOAD) == moved_before + 1
    # It stays on its new engine, which is not saturated.
    assert fleet.run(connect_names, VIP, 80, 0, ["erin"]) == [then]


def test_a_reader_on_the_pin_dir_sees_the_ring(fleet: Node) -> None:
    """What a restarted agent does: open the pinned ring by path, not through bcc."""
    fleet.apply([svc([fleet.backend(p) for p in PODS])])
    svc_id, ids = _ids(fleet)
    got: list[events.Event] = []
    with events.EventReader(fleet.settings.pin_dir, got.append) as reader:
        reader.consume()
        got.clear()
        (name,) = fleet.run(connect_names, VIP, 80, 0, ["frank"])
        assert reader.poll(2000) == 1
    assert got == [events.Event(abi.EV_BIND, svc_id, ids[name], abi.NO_BACKEND,
                                client.session_hash("frank"))]


def test_an_error_in_the_callback_reaches_the_caller(fleet: Node) -> None:
    fleet.apply([svc([fleet.backend(p) for p in PODS])])

    def boom(ev: events.Event) -> None:
        raise RuntimeError(f"relay down at {ev.kind}")

    with events.EventReader(fleet.maps, boom) as reader:
        reader.consume()
        fleet.run(connect_names, VIP, 80, 0, ["gina", "hank"])
        with pytest.raises(RuntimeError, match="relay down at 1"):
            reader.poll(2000)
    # The record that failed was consumed; the next one is still there.
    got: list[events.Event] = []
    with events.EventReader(fleet.maps, got.append) as reader:
        assert reader.consume() == 1
    assert got[0].key == client.session_hash("hank")
