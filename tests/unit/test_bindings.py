"""Fleet-wide session bindings: the controller's table (who wins, expiry, counts), the
messages and their wire form, and the relay through the real gRPC server."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller import bindings as table_mod
from controller import grpc_server
from dataplane import bindings, model, stream
from dataplane.api import convert

A, B, C = "10.0.1.1:8000/tcp", "10.0.1.2:8000/tcp", "10.0.1.3:8000/tcp"


def service(name: str = "chat", timeout: int = 60,
            states: tuple[str, str, str] = ("active", "active", "active"),
            members: tuple[str, ...] = (A, B, C), affinity: str = "session",
            vip: str = "10.96.0.10") -> model.Service:
    backends = []
    for ident, state in zip(members, states, strict=False):
        addr, rest = ident.split(":")
        backends.append(model.Backend(addr, int(rest.split("/")[0]), 100, state))
    return model.Service(name=name, vip=vip, port=80, protocol="tcp",
                         affinity=affinity, affinity_timeout=timeout, table_size=251,
                         epsilon=0.25, probe_share=0.05, backends=tuple(backends))


def table(*services: model.Service) -> table_mod.BindingTable:
    t = table_mod.BindingTable()
    t.set_snapshot(model.Snapshot.of(1, services or (service(),)))
    return t


def bound(node: str, backend: str, *keys: int, prev: str = "",
          svc: str = "chat") -> bindings.Report:
    return bindings.Report(f"agent-{node}", node, (bindings.Group(svc, backend, keys, prev),))


def touched(node: str, backend: str, *keys: int) -> bindings.Report:
    return bindings.Report(f"agent-{node}", node, (),
                           (bindings.Group("chat", backend, keys),))


def rows(out: bindings.Fanout) -> set[tuple[str, int, str]]:
    return {(g.backend, k, g.prev) for g in out.bound for k in g.keys}


def test_the_first_binding_wins_and_the_loser_is_corrected() -> None:
    t = table()
    t.report(bound("n0", A, 7), now=0.0)
    t.report(bound("n1", B, 7), now=0.01)  # n1 bound the same session at about once
    assert t.backend_of("chat", 7) == A
    out = t.take()
    assert rows(out) == {(A, 7, "")}  # the winner, sent to every node (n1 overwrites)
    assert out.sessions == {A: 1}
    assert t.stats.conflicts == 1 and t.stats.accepted == 1


@given(st.permutations([("n0", A), ("n1", B), ("n2", C)]))
def test_every_order_of_arrival_ends_with_one_binding_everywhere(order: list[tuple[str, str]]
                                                                  ) -> None:
    t = table()
    for i, (node, backend) in enumerate(order):
        t.report(bound(node, backend, 99), now=i * 0.001)
    out = t.take()
    winner = order[0][1]
    assert t.backend_of("chat", 99) == winner
    # whatever each node wrote on its own, the last word every node hears is the winner
    assert {backend for backend, _, _ in rows(out)} == {winner}
    assert t.sessions() == {winner: 1}


def test_a_move_from_the_held_binding_replaces_it_and_any_other_move_loses() -> None:
    t = table()
    t.report(bound("n0", A, 5), 0.0)
    t.take()
    t.report(bound("n1", B, 5, prev=A), 1.0)  # A was unusable for n1: it moved the session
    assert t.backend_of("chat", 5) == B
    t.report(bound("n0", C, 5, prev=A), 1.001)  # n0 moved it too, from the same stale A
    assert t.backend_of("chat", 5) == B
    out = t.take()
    assert rows(out) == {(B, 5, A), (B, 5, "")}
    assert t.sessions() == {B: 1}
    assert t.stats.moved == 1 and t.stats.conflicts == 1


def test_a_binding_on_an_unusable_backend_loses_to_a_new_one() -> None:
    t = table()
    t.report(bound("n0", A, 5), 0.0)
    # A's breaker opened: a node without the entry binds anew (no prev) and wins
    t.set_snapshot(model.Snapshot.of(2, (service(states=("open", "active", "active")),)))
    t.report(bound("n1", B, 5), 1.0)
    assert t.backend_of("chat", 5) == B


def test_bindings_expire_a_timeout_after_the_last_touch_from_any_node() -> None:
    t = table(service(timeout=60))
    t.report(bound("n0", A, 1, 2), 0.0)
    t.take()
    t.report(touched("n1", A, 1), 50.0)  # key 1 used again, through another node
    assert t.expire(59.0) == 0
    assert t.expire(60.5) == 1  # key 2: a timeout after its binding
    out = t.take()
    assert [(g.service, g.keys) for g in out.expired] == [("chat", (2,))]
    assert t.backend_of("chat", 1) == A and t.backend_of("chat", 2) is None
    assert t.expire(110.5) == 1
    assert len(t) == 0 and t.sessions() == {}
    assert t.take().sessions == {A: 0}


def test_a_restarted_controller_relearns_live_bindings_from_touches() -> None:
    t = table()
    t.report(touched("n0", B, 42), 0.0)
    assert t.backend_of("chat", 42) == B
    assert rows(t.take()) == {(B, 42, "")}  # nodes that lost it get it back
    assert t.stats.relearned == 1
    t.report(touched("n1", C, 42), 0.1)  # a stale node's touch does not move it
    assert t.backend_of("chat", 42) == B
    assert rows(t.take()) == {(B, 42, "")}


def test_a_backend_that_leaves_takes_its_sessions_and_every_node_is_told() -> None:
    t = table()
    t.report(bound("n0", A, 1), 0.0)
    t.report(bound("n0", B, 2), 0.0)
    t.take()
    t.set_snapshot(model.Snapshot.of(2, (service(members=(B, C)),)))
    out = t.take()
    assert [(g.service, g.keys) for g in out.expired] == [("chat", (1,))]
    assert out.sessions == {A: 0}
    assert t.sessions() == {B: 1}


def test_a_service_that_leaves_drops_its_bindings() -> None:
    t = table()
    t.report(bound("n0", A, 1), 0.0)
    t.set_snapshot(model.Snapshot.of(2, ()))
    assert len(t) == 0 and t.sessions() == {}


def test_unknown_services_backends_and_no_affinity_services_are_refused() -> None:
    t = table(service(), service("plain", affinity="none", vip="10.96.0.11"))
    t.report(bound("n0", A, 1, svc="nope"), 0.0)
    t.report(bound("n0", "10.9.9.9:1/tcp", 1), 0.0)  # not a member: nobody may bind it
    t.report(bound("n0", A, 1, svc="plain"), 0.0)
    assert len(t) == 0 and t.stats.refused == 3
    assert not t.take()


def test_the_table_is_bounded() -> None:
    t = table_mod.BindingTable(max_bindings=3)
    t.set_snapshot(model.Snapshot.of(1, (service(),)))
    t.report(bound("n0", A, 1, 2, 3, 4, 5), 0.0)
    assert len(t) == 3 and t.stats.over_capacity == 2


def test_dump_carries_every_binding_in_bounded_messages() -> None:
    t = table()
    t.report(bound("n0", A, *range(1, 11)), 0.0)
    t.report(bound("n0", B, *range(11, 16)), 0.0)
    parts = list(t.dump(chunk=4))
    assert parts[0].sessions == {A: 10, B: 5}
    assert all(p.keys <= 4 for p in parts)
    got = {(g.backend, k) for p in parts[1:] for g in p.bound for k in g.keys}
    assert got == {(A, k) for k in range(1, 11)} | {(B, k) for k in range(11, 16)}


@pytest.mark.parametrize("bad", [
    lambda: bindings.Group("chat", A, (0,)),
    lambda: bindings.Group("chat", A, (2**64,)),
    lambda: bindings.Group("chat", "10.0.0.1:080/tcp", (1,)),
    lambda: bindings.Group("", A, (1,)),
    lambda: bindings.Report("a", "n", (), (bindings.Group("chat", A, (1,), prev=B),)),
    lambda: bindings.Fanout(expired=(bindings.Group("chat", A, (1,)),)),
    lambda: bindings.Fanout(sessions={A: -1}),
])
def test_bad_messages_are_refused_with_a_message(bad: object) -> None:
    with pytest.raises(model.ModelError):
        bad()  # type: ignore[operator]


@given(st.lists(st.tuples(st.sampled_from(["chat", "code"]), st.sampled_from([A, B, C]),
                          st.sampled_from(["", A]), st.integers(1, 2**64 - 1)), max_size=30))
def test_groups_round_trip_through_the_wire(entries: list[tuple[str, str, str, int]]) -> None:
    report = bindings.Report("agent-0", "node0", bindings.group(entries), ())
    back = convert.binding_report_from_pb(convert.binding_report_to_pb(report))
    assert back == report
    out = bindings.Fanout(bound=bindings.group(entries), sessions={A: 3})
    assert convert.fanout_from_pb(convert.fanout_update(out).bindings) == out


# -- through the real gRPC server ---------------------------------------------------------


class _Loop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: object) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)  # type: ignore[arg-type]

    def close(self) -> None:
        self.run(asyncio.sleep(0.05))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class _Node:
    """A SnapshotClient whose kernel is a dict, fed by a queue of bindings to report."""

    def __init__(self, port: int, name: str) -> None:
        self.name = name
        self.kernel: dict[tuple[str, int], str] = {}
        self.sessions: dict[str, int] = {}
        self.queue: list[tuple[str, str, str, int]] = []
        self.lock = threading.Lock()
        self.client = stream.SnapshotClient(
            f"127.0.0.1:{port}", f"agent-{name}", name, lambda snap: True,
            on_bindings=self.on_bindings, binding_source=self.source,
            backoff=stream.Backoff(base=0.05, cap=0.2))

    def on_bindings(self, out: bindings.Fanout) -> None:
        with self.lock:
            for g in out.bound:
                for k in g.keys:
                    self.kernel[(g.service, k)] = g.backend
            for g in out.expired:
                for k in g.keys:
                    self.kernel.pop((g.service, k), None)
            self.sessions.update(out.sessions)

    def source(self) -> bindings.Report | None:
        with self.lock:
            rows, self.queue = self.queue, []
        if not rows:
            return None
        return bindings.Report(f"agent-{self.name}", self.name, bindings.group(rows))

    def bind(self, backend: str, key: int) -> None:
        with self.lock:
            self.kernel[("chat", key)] = backend  # what its own kernel did
            self.queue.append(("chat", backend, "", key))
        self.client.bindings_ready()


def _wait(predicate: object, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.005)
    return False


def test_a_binding_made_on_one_node_reaches_the_others_and_conflicts_settle() -> None:
    loop = _Loop()
    publisher = grpc_server.Publisher()
    publisher.publish(model.Snapshot.of(1, (service(),)))
    server = grpc_server.ControlServer(publisher)
    port = loop.run(server.start("127.0.0.1:0"))
    nodes = [_Node(port, f"n{i}") for i in range(3)]  # type: ignore[arg-type]
    try:
        for n in nodes:
            n.client.start()
        assert _wait(lambda: all(n.client.connected for n in nodes))
        started = time.monotonic()
        nodes[0].bind(A, 1001)
        assert _wait(lambda: all(n.kernel.get(("chat", 1001)) == A for n in nodes))
        took = time.monotonic() - started
        print(f"\nbinding on n0 -> every node: {took * 1000:.1f} ms")
        assert took < 1.0
        # two nodes bind the same new session differently: all end on one engine
        nodes[1].bind(B, 2002)
        nodes[2].bind(C, 2002)
        assert _wait(lambda: len({n.kernel.get(("chat", 2002)) for n in nodes}) == 1
                     and nodes[0].kernel.get(("chat", 2002)) is not None)
        assert _wait(lambda: all(n.sessions.get(A) == 1 for n in nodes))
        # a node that connects later gets the whole table
        late = _Node(port, "late")  # type: ignore[arg-type]
        late.client.start()
        try:
            assert _wait(lambda: late.kernel.get(("chat", 1001)) == A
                         and late.kernel.get(("chat", 2002)) == nodes[0].kernel[("chat", 2002)])
        finally:
            late.client.stop()
    finally:
        for n in nodes:
            n.client.stop()
        loop.run(server.stop(grace=0.1))
        loop.close()
