"""The agent's relay of session bindings, with the kernel's maps faked: kernel ids <->
names, the bounded queue, and the session count it writes (the controller's count, plus
this node's unechoed bindings, plus other nodes' bindings since the last count)."""

from __future__ import annotations

import threading
from typing import Any

from dataplane import abi, apply, binder, bindings, events

A, B = "10.0.1.1:8000/tcp", "10.0.1.2:8000/tcp"


class _Applier:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.desired = object()
        self.view = apply.View()
        self.view.names = {7: "chat"}
        for be_id, ident in ((1, A), (2, B)):
            ep = apply.parse_identity(ident)
            self.view.backends[be_id] = (*ep, 0)
            self.view.be_addr[ep] = be_id

    def service_id(self, name: str) -> int | None:
        return {n: i for i, n in self.view.names.items()}.get(name)

    def backend_id(self, identity: str) -> int | None:
        return self.view.be_addr.get(apply.parse_identity(identity))


class _Maps:
    def __init__(self) -> None:
        self.affinity: dict[tuple[int, int], int] = {}
        self.sessions: dict[int, int] = {}

    def write_bindings(self, rows: Any) -> None:
        self.affinity.update({(s, k): b for s, k, b in rows})

    def delete_bindings(self, keys: Any) -> None:
        for k in keys:
            self.affinity.pop(k, None)

    def set_sessions(self, counts: Any) -> None:
        self.sessions.update(counts)


def _binder(queue_max: int = 100) -> tuple[binder.Binder, _Maps]:
    maps = _Maps()
    return binder.Binder(_Applier(), maps, queue_max=queue_max), maps  # type: ignore[arg-type]


def bind(key: int, be_id: int, prev: int = abi.NO_BACKEND) -> events.Event:
    return events.Event(abi.EV_BIND, 7, be_id, prev, key)


def test_kernel_events_become_a_report_by_name() -> None:
    b, _ = _binder()
    b.on_event(bind(11, 1))
    b.on_event(bind(12, 2, prev=1))
    b.on_event(events.Event(abi.EV_TOUCH, 7, 1, abi.NO_BACKEND, 13))
    b.on_event(bind(14, 99))  # an id the view does not hold (a race with an apply)
    rep = b.take_report("agent-0", "node0")
    assert rep is not None
    assert {(g.backend, g.prev, g.keys) for g in rep.bound} == {(A, "", (11,)), (B, A, (12,))}
    assert [(g.backend, g.keys) for g in rep.touched] == [(A, (13,))]
    assert b.unknown == 1 and b.pending == 0
    assert b.take_report("agent-0", "node0") is None


def test_the_queue_is_bounded_and_drops_touches_first() -> None:
    b, _ = _binder(queue_max=3)
    b.on_event(events.Event(abi.EV_TOUCH, 7, 1, abi.NO_BACKEND, 1))
    for key in (2, 3, 4):
        b.on_event(bind(key, 1))
    rep = b.take_report("agent-0", "node0")
    assert rep is not None and not rep.touched and rep.keys == 3 and b.dropped == 1


def test_fanouts_are_written_by_this_nodes_ids() -> None:
    b, maps = _binder()
    b.apply(bindings.Fanout(bound=(bindings.Group("chat", B, (5, 6)),)))
    assert maps.affinity == {(7, 5): 2, (7, 6): 2}
    b.apply(bindings.Fanout(expired=(bindings.Group("chat", "", (5,)),)))
    assert maps.affinity == {(7, 6): 2}
    b.apply(bindings.Fanout(bound=(bindings.Group("gone", A, (8,)),)))
    assert b.unwritable == 1


def test_session_counts_keep_this_nodes_new_sessions_until_the_controller_counts_them(
        ) -> None:
    b, maps = _binder()
    b.on_event(bind(1, 1))  # the kernel counted it itself
    b.on_event(bind(2, 1))
    # a count the controller sent before it heard of either: they must not vanish
    b.apply(bindings.Fanout(sessions={A: 0, B: 3}))
    assert maps.sessions == {1: 2, 2: 3}
    # another node's new session on B, between counts: counted at once
    b.apply(bindings.Fanout(bound=(bindings.Group("chat", B, (9,)),)))
    assert maps.sessions[2] == 4
    # our two come back decided; then the controller's count includes everything
    b.apply(bindings.Fanout(bound=(bindings.Group("chat", A, (1, 2)),)))
    b.apply(bindings.Fanout(sessions={A: 2, B: 4}))
    assert maps.sessions == {1: 2, 2: 4}
    # a session of ours that moved A -> B: both counts follow before the echo
    b.on_event(bind(1, 2, prev=1))
    b.apply(bindings.Fanout(sessions={A: 2, B: 4}))
    assert maps.sessions == {1: 1, 2: 5}
