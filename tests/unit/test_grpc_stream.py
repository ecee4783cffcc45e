"""Controller <-> agent stream over real gRPC on 127.0.0.1: full then deltas, restarts,
missed versions, corrupted deltas, mTLS, reports and convergence."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from controller import grpc_server
from dataplane import bindings, certs, enginemetrics, model, reports, scraper, stream
from dataplane.api import channel, convert
from dataplane.api.pb import kvroute_pb2 as pb
from dataplane.api.pb import kvroute_pb2_grpc as pb_grpc

FAST = stream.Backoff(base=0.05, cap=0.3)
WAIT = 5.0


def service(name: str, n: int, *, saturated: bool = False) -> model.Service:
    return model.Service(
        name=name, vip=f"10.96.0.{n}", port=80, protocol="tcp", affinity="session",
        affinity_timeout=600, table_size=251, epsilon=0.25, probe_share=0.05,
        saturated=saturated,
        backends=tuple(model.Backend(f"10.0.{n}.{i}", 8000, 100 + i, "active", i)
                       for i in range(1, 4)),
    )


def snap(version: int, *services: model.Service) -> model.Snapshot:
    return model.Snapshot.of(version, services)


class Controller:
    """A ControlServer on its own event loop thread, driven from the test thread."""

    def __init__(self, publisher: grpc_server.Publisher | None = None) -> None:
        self.publisher = publisher or grpc_server.Publisher()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: grpc_server.ControlServer | None = None

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(WAIT)

    def start(self, port: int = 0, tls: channel.TLSFiles | None = None) -> int:
        self.server = grpc_server.ControlServer(self.publisher, tls=tls)
        port = self.run(self.server.start(f"127.0.0.1:{port}"))
        assert isinstance(port, int)
        return port

    def stop(self) -> None:
        if self.server is not None:
            self.run(self.server.stop(grace=0.1))

    def agents(self) -> dict[str, grpc_server.AgentStatus]:
        assert self.server is not None
        return self.server.agents()

    def close(self) -> None:
        self.stop()
        self.run(asyncio.sleep(0.05))  # let gRPC's last completions land before closing
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT)
        self.loop.close()


class Agent:
    """A SnapshotClient with a recording on_snapshot."""

    def __init__(self, port: int, agent_id: str, *, ok: Callable[[], bool] = lambda: True,
                 delay: float = 0.0, node: str | None = None, **kw: Any) -> None:
        self.seen: list[model.Snapshot] = []
        self.ok = ok
        self.delay = delay
        kw.setdefault("report_interval", 0.2)
        self.client = stream.SnapshotClient(f"127.0.0.1:{port}", agent_id,
                                            node or f"node-{agent_id}",
                                            self.on_snapshot, backoff=FAST, **kw)

    def on_snapshot(self, s: model.Snapshot) -> bool:
        time.sleep(self.delay)
        self.seen.append(s)
        return self.ok()

    def wait(self, s: model.Snapshot) -> None:
        assert self.client.wait_for(lambda a: a == s, WAIT), (
            f"{self.client.agent_id} holds {self.client.applied}, stats {self.client.stats}")


@pytest.fixture
def controller() -> Iterator[Controller]:
    c = Controller()
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def agents() -> Iterator[list[Agent]]:
    made: list[Agent] = []
    try:
        yield made
    finally:
        for a in made:
            a.client.stop()


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_full_then_deltas_reach_two_agents(controller: Controller, agents: list[Agent]) -> None:
    v1 = snap(1, service("a", 1), service("b", 2))
    controller.publisher.publish(v1)
    port = controller.start()
    agents += [Agent(port, "n1"), Agent(port, "n2")]
    for a in agents:
        a.client.start()
    for a in agents:
        a.wait(v1)
    v2 = snap(2, service("a", 1, saturated=True), service("b", 2))
    v3 = snap(3, service("a", 1, saturated=True), service("c", 3))
    controller.publisher.publish(v2)
    for a in agents:
        a.wait(v2)
    assert controller.server is not None and controller.server.publish(v3)
    for a in agents:
        a.wait(v3)
        assert a.seen == [v1, v2, v3]
        assert (a.client.stats.fulls, a.client.stats.deltas) == (1, 2)
        assert a.client.stats.resyncs == 0
    # Publishing the same content again sends nothing and keeps the version.
    assert controller.publisher.publish(snap(4, service("c", 3), service("a", 1, saturated=True))
                                        ) is False
    assert controller.publisher.current == v3
    with pytest.raises(ValueError, match="version must increase"):
        controller.publisher.publish(snap(2, service("z", 9)))


def test_reports_reach_agents_with_the_applied_version(controller: Controller,
                                                       agents: list[Agent]) -> None:
    load = enginemetrics.EngineLoad(running=2.0, waiting=1.0, kv_usage=0.5,
                                    kv_family=enginemetrics.KV_USAGE, engines=1)

    def observe() -> reports.Observations:
        return reports.Observations(
            engines=(scraper.ScrapeResult("10.0.1.1:8000", True, True, 0.001, load, None),),
            counters=(reports.BackendCounters("10.0.1.1:8000/tcp", connects=7, failed=2),),
        )

    v1 = snap(1, service("a", 1))
    controller.publisher.publish(v1)
    port = controller.start()
    good = Agent(port, "good", report_source=observe)
    broken = Agent(port, "broken", ok=lambda: False)
    agents += [good, broken]
    good.client.start()
    broken.client.start()
    good.wait(v1)

    def settled() -> bool:
        status = controller.agents()
        return ("good" in status and status["good"].applied_version == 1
                and "broken" in status and status["broken"].reports >= 2)

    assert wait_until(settled), controller.agents()
    status = controller.agents()
    ok = status["good"]
    assert ok.converged and ok.lag_seconds == 0.0 and ok.watching
    assert ok.applied_hash == v1.hash and ok.node == "node-good"
    assert ok.counters[0].connects == 7 and ok.counters[0].failed == 2
    assert ok.engines[0].load == load and ok.engines[0].outcomes() == [(True, "scrape")]
    assert ok.last_report_at is not None and abs(ok.last_report_at - time.time()) < WAIT
    bad = status["broken"]
    assert bad.applied_version == 0 and not bad.converged and bad.lag_seconds > 0.0
    assert any("apply of version 1 failed" in e for e in bad.errors)
    # The failed apply is retried on the report interval.
    assert wait_until(lambda: len(broken.seen) >= 2)
    assert broken.client.applied is None

    v2 = snap(2, service("a", 1), service("b", 2))
    controller.publisher.publish(v2)
    good.wait(v2)
    assert wait_until(lambda: controller.agents()["good"].applied_version == 2)
    assert controller.run(controller.server.wait_converged(["good"], WAIT))  # type: ignore[union-attr]


def test_controller_restart_agents_keep_tables_reconnect_and_converge(
    controller: Controller, agents: list[Agent]
) -> None:
    v3 = snap(3, service("a", 1), service("b", 2))
    controller.publisher.publish(v3)
    port = controller.start()
    agents += [Agent(port, "n1"), Agent(port, "n2")]
    for a in agents:
        a.client.start()
        a.wait(v3)
    controller.stop()
    assert wait_until(lambda: not any(a.client.connected for a in agents))
    time.sleep(0.3)  # a few failed reconnects while the controller is away
    for a in agents:
        assert a.client.applied == v3  # static stability: the tables stay
    # The new controller starts its numbering again and rebuilds the same content:
    # agents are renumbered without reprogramming the kernel...
    restarted = grpc_server.Publisher()
    restarted.publish(snap(1, service("b", 2), service("a", 1)))
    controller.publisher = restarted
    controller.start(port)
    for a in agents:
        a.wait(snap(1, service("a", 1), service("b", 2)))
        assert a.seen == [v3]
        assert a.client.stats.fulls == 1
    # ...and the next change arrives as a delta.
    v2 = snap(2, service("a", 1))
    restarted.publish(v2)
    for a in agents:
        a.wait(v2)
        assert a.seen == [v3, v2]
        assert a.client.stats.fulls == 1 and a.client.stats.resyncs == 0
    assert wait_until(lambda: all(s.converged for s in controller.agents().values())
                      and len(controller.agents()) == 2)


def test_agent_that_missed_versions_converges_with_one_delta(controller: Controller,
                                                            agents: list[Agent]) -> None:
    controller.publisher.publish(snap(1, service("a", 1)))
    port = controller.start()
    agent = Agent(port, "n1")
    agents.append(agent)
    agent.client.start()
    agent.wait(snap(1, service("a", 1)))
    agent.client.stop()
    for v in range(2, 7):
        controller.publisher.publish(snap(v, *(service(f"s{i}", i) for i in range(1, v + 1))))
    final = controller.publisher.current
    assert final is not None
    agent.client.start()
    agent.wait(final)
    # Versions 2..5 were never seen; the agent came back holding v1 and got one delta.
    assert [s.version for s in agent.seen] == [1, 6]
    assert (agent.client.stats.fulls, agent.client.stats.deltas) == (1, 1)


def test_agent_behind_the_history_gets_a_full_snapshot(agents: list[Agent]) -> None:
    controller = Controller(grpc_server.Publisher(history=2))
    try:
        controller.publisher.publish(snap(1, service("a", 1)))
        port = controller.start()
        agent = Agent(port, "n1")
        agents.append(agent)
        agent.client.start()
        agent.wait(snap(1, service("a", 1)))
        agent.client.stop()
        for v in range(2, 6):
            controller.publisher.publish(snap(v, service("a", 1), service(f"s{v}", v)))
        final = controller.publisher.current
        assert final is not None
        agent.client.start()
        agent.wait(final)
        assert agent.client.stats.fulls == 2 and agent.client.stats.resyncs == 0
    finally:
        agent.client.stop()
        controller.close()


def test_slow_agent_skips_versions_and_converges(controller: Controller,
                                                agents: list[Agent]) -> None:
    controller.publisher.publish(snap(1, service("a", 1)))
    port = controller.start()
    slow = Agent(port, "slow", delay=0.05)
    agents.append(slow)
    slow.client.start()
    slow.wait(snap(1, service("a", 1)))
    for v in range(2, 30):
        controller.publisher.publish(snap(v, service("a", 1), service("b", 2 + v)))
    final = controller.publisher.current
    assert final is not None
    slow.wait(final)
    versions = [s.version for s in slow.seen]
    assert versions == sorted(versions) and versions[-1] == final.version
    assert slow.seen[-1] == final
    assert slow.client.stats.resyncs == 0


def test_corrupted_delta_leads_to_a_full_resync(controller: Controller, agents: list[Agent],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    v1 = snap(1, service("a", 1))
    controller.publisher.publish(v1)
    port = controller.start()
    agent = Agent(port, "n1")
    agents.append(agent)
    agent.client.start()
    agent.wait(v1)
    real_delta = model.delta
    corrupted: list[model.Delta] = []

    def corrupt_once(old: model.Snapshot, new: model.Snapshot) -> model.Delta:
        d = real_delta(old, new)
        if not corrupted:
            corrupted.append(d)
            # Drop one upsert but announce the right hash, as a buggy or tampered
            # controller would: the agent's result cannot match.
            return dataclasses.replace(d, upserted=d.upserted[:-1])
        return d

    monkeypatch.setattr(model, "delta", corrupt_once)
    v2 = snap(2, service("a", 1), service("b", 2))
    controller.publisher.publish(v2)
    agent.wait(v2)
    assert corrupted
    stats = agent.client.stats
    assert stats.resyncs == 1 and stats.fulls == 2 and stats.deltas == 0
    assert "hash" in (stats.last_error or "")
    assert agent.seen == [v1, v2]  # the bad result was never applied


# -- mTLS ---------------------------------------------------------------------------------


@dataclasses.dataclass
class PKI:
    server: channel.TLSFiles
    client: channel.TLSFiles  # node "node-good"
    other: channel.TLSFiles  # node "node-other", same CA
    rogue: channel.TLSFiles  # "node-good" again, but from another CA
    nameless: channel.TLSFiles  # signed by the CA, but names no node


def _files(folder: Path) -> channel.TLSFiles:
    return channel.TLSFiles(ca=folder / "ca.crt", cert=folder / "tls.crt",
                            key=folder / "tls.key")


def _make_pki(root: Path) -> PKI:
    """With the tool operators use (``kvroute certs``), so its identity format is the one
    the server checks."""
    certs.issue(root / "good", ["localhost", "127.0.0.1"], ["node-good", "node-other"])
    certs.issue(root / "rogue", ["localhost"], ["node-good"])
    # A client certificate from the right CA without the node URI (CN only).
    ca, _ = certs.load_or_create_authority(root / "good")
    crt, key = certs._leaf(ca, "node-good", [x509.DNSName("node-good")], False, 1, None)
    nameless = root / "nameless"
    nameless.mkdir()
    (nameless / "ca.crt").write_bytes((root / "good" / "ca.crt").read_bytes())
    (nameless / "tls.crt").write_bytes(crt.public_bytes(serialization.Encoding.PEM))
    (nameless / "tls.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    # The rogue trusts the real CA, so only the server's check of its cert can stop it.
    rogue = dataclasses.replace(_files(root / "rogue" / "nodes" / "node-good"),
                                ca=root / "good" / "ca.crt")
    return PKI(server=_files(root / "good" / "controller"),
               client=_files(root / "good" / "nodes" / "node-good"),
               other=_files(root / "good" / "nodes" / "node-other"),
               rogue=rogue, nameless=_files(nameless))


def test_mtls_accepts_a_good_client_and_refuses_others(controller: Controller,
                                                      agents: list[Agent],
                                                      tmp_path: Path) -> None:
    pki = _make_pki(tmp_path)
    v1 = snap(1, service("a", 1))
    controller.publisher.publish(v1)
    port = controller.start(tls=pki.server)
    good = Agent(port, "node-good-kvroute", node="node-good", tls=pki.client)
    rogue = Agent(port, "rogue", tls=pki.rogue)
    plain = Agent(port, "plain")
    agents += [good, rogue, plain]
    for a in agents:
        a.client.start()
    good.wait(v1)
    assert wait_until(lambda: controller.agents().get("node-good-kvroute") is not None
                      and controller.agents()["node-good-kvroute"].converged)
    time.sleep(0.5)  # several reconnect attempts for the refused ones
    for refused in (rogue, plain):
        assert refused.client.applied is None and refused.seen == []
        assert refused.client.stats.connects == 0
        assert refused.client.stats.disconnects >= 1
    assert set(controller.agents()) == {"node-good-kvroute"}


# -- who can change routing (issue 12) ----------------------------------------------------

FULL = enginemetrics.EngineLoad(running=64.0, waiting=200.0, kv_usage=1.0,
                                kv_family=enginemetrics.KV_USAGE, engines=1)


def _fleet() -> tuple[model.Snapshot, list[str]]:
    """Service "a"; its first engine is on node-good, the second on node-other, the third
    on no node."""
    svc = service("a", 1)
    idents = [svc.identity(b) for b in svc.backends]
    refs = tuple(model.EngineRef(i, f"http://{b.address}:8000/metrics",
                                 f"http://{b.address}:8000/health", node)
                 for i, b, node in zip(idents, svc.backends, ("node-good", "node-other", None),
                                       strict=True))
    return model.Snapshot.of(1, (svc,), refs), idents


def _attack(agent_id: str, node: str, idents: list[str]
            ) -> tuple[pb.WatchRequest, pb.AgentReport, pb.BindingReport]:
    """Everything a forger would send: a watch, a report that says every engine is full
    and that the kernel tripped it (breaker evidence), and bindings of sessions to one
    engine."""
    def report(trips: int) -> pb.AgentReport:
        return convert.report_to_pb(reports.AgentReport(
            agent_id, node, 0, "",
            engines=tuple(scraper.ScrapeResult(i, True, True, 0.001, FULL, None)
                          for i in idents),
            counters=tuple(reports.BackendCounters(i, connects=9, failed=9 * trips,
                                                   trips=trips) for i in idents)))
    bind = convert.binding_report_to_pb(bindings.Report(
        agent_id, node, bound=(bindings.Group("a", idents[1], (1, 2, 3)),)))
    return pb.WatchRequest(agent_id=agent_id, node=node), report(1), bind


@contextlib.contextmanager
def _stub(port: int, tls: channel.TLSFiles | None) -> Iterator[pb_grpc.ControlStub]:
    target = f"127.0.0.1:{port}"
    ch = (grpc.insecure_channel(target) if tls is None else
          grpc.secure_channel(target, channel.channel_credentials(tls),
                              options=channel.channel_options(tls)))
    with ch:
        yield pb_grpc.ControlStub(ch)


def _refused(call: Callable[[], Any]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    code = info.value.code()
    assert isinstance(code, grpc.StatusCode)
    return code


def _try_all(stub: pb_grpc.ControlStub, msgs: tuple[pb.WatchRequest, pb.AgentReport,
                                                       pb.BindingReport]) -> list[grpc.StatusCode]:
    watch, report, bind = msgs
    return [_refused(lambda: next(iter(stub.WatchSnapshots(watch, timeout=WAIT)))),
            _refused(lambda: stub.Report(iter([report, report]), timeout=WAIT)),
            _refused(lambda: stub.ReportBindings(iter([bind]), timeout=WAIT))]


def test_without_the_nodes_certificate_nothing_changes_routing(controller: Controller,
                                                               tmp_path: Path) -> None:
    """No certificate, a certificate from another CA, one of the CA's without a node,
    another node's: each is refused on WatchSnapshots, Report and ReportBindings, and the
    published snapshot, the loads, the breakers' input and the bindings stay as they were.
    Then the node's own certificate changes them, so the checks above can fail."""
    pki = _make_pki(tmp_path)
    v1, idents = _fleet()
    controller.publisher.publish(v1)
    port = controller.start(tls=pki.server)
    server = controller.server
    assert server is not None
    observed: list[reports.AgentReport] = []
    server.on_report = observed.append  # the controller's breakers are fed from here only
    denied = grpc.StatusCode.PERMISSION_DENIED
    # Claims made with each stolen name: the victim node's agent, and the caller's own.
    for tls, claims, codes in [
        (None, ["node-good"], {grpc.StatusCode.UNAVAILABLE}),
        (pki.rogue, ["node-good"], {grpc.StatusCode.UNAVAILABLE}),
        (pki.nameless, ["node-good"], {denied}),
        (pki.other, ["node-good", "node-good-kvroute"], {denied}),
    ]:
        with _stub(port, tls) as stub:
            for claim in claims:
                got = _try_all(stub, _attack(claim, "node-good", idents))
                assert set(got) == codes, (tls, claim, got)
    # The other node may not pose under its own node with another's agent id either.
    with _stub(port, pki.other) as stub:
        assert set(_try_all(stub, _attack("node-good", "node-other", idents))) == {denied}
    assert controller.publisher.current == v1
    assert controller.publisher.load_seq == 0 and controller.publisher.loads_since(0)[0] == {}
    assert observed == [] and controller.agents() == {}
    assert len(server.bindings) == 0 and server.binding_reports == 0
    assert server.refused[("WatchSnapshots", "identity")] == 4
    assert server.refused[("Report", "identity")] == 4
    assert server.refused[("ReportBindings", "identity")] == 4

    # The node's own certificate: accepted, and only for its own engines (and unclaimed ones).
    watch, report, bind = _attack("node-good-kvroute", "node-good", idents)
    with _stub(port, pki.client) as stub:
        first = next(iter(stub.WatchSnapshots(watch, timeout=WAIT)))
        assert first.WhichOneof("update") == "full"
        assert stub.Report(iter([report]), timeout=WAIT).reports == 1
        assert stub.ReportBindings(iter([bind]), timeout=WAIT).reports == 1
    assert [r.identity for r in observed[0].engines] == [idents[0], idents[2]]
    assert [c.identity for c in observed[0].counters] == [idents[0], idents[2]]
    assert server.report_entries_dropped == 2
    assert controller.publisher.loads_since(0)[0] == {idents[0]: FULL.units,
                                                       idents[2]: FULL.units}
    assert server.binding_reports == 1 and len(server.bindings) == 3


def test_an_agent_id_stays_with_the_node_that_holds_it(controller: Controller,
                                                       tmp_path: Path) -> None:
    """Agent ids fit a node by prefix ("<node>" or "<node>-…"), and a prefix can fit two
    nodes (node "a" and node "a-b" both fit "a-b-x"): an id whose record names one node
    is refused to every other."""
    pki = _make_pki(tmp_path)
    v1, idents = _fleet()
    controller.publisher.publish(v1)
    port = controller.start(tls=pki.server)
    assert controller.server is not None
    with _stub(port, pki.client) as stub:
        assert stub.Report(iter([_attack("node-good", "node-good", idents)[1]]),
                           timeout=WAIT).reports == 1
    assert controller.agents()["node-good"].node == "node-good"
    # The record of "node-other-a" says node-good holds it (as if node-good were a node
    # whose name is a prefix of it): node-other's own prefix fits, and is still refused.
    controller.server._agents["node-other-a"] = grpc_server._Agent("node-other-a",
                                                                    node="node-good")
    with _stub(port, pki.other) as stub:
        codes = _try_all(stub, _attack("node-other-a", "node-other", idents))
    assert set(codes) == {grpc.StatusCode.PERMISSION_DENIED}


# -- bounded agents -----------------------------------------------------------------------


def test_made_up_agent_ids_are_bounded_and_expire() -> None:
    """Thousands of invented agent ids: at most max_agents are kept (the rest refused and
    counted), silent ones are forgotten after the TTL with the state kept for them, and
    an agent with an open watch stream is never forgotten."""
    now = {"t": 1000.0}
    forgotten: list[str] = []
    c = Controller()
    try:
        c.publisher.publish(snap(1, service("a", 1)))
        c.server = server = grpc_server.ControlServer(
            c.publisher, clock=lambda: now["t"], agent_ttl=60.0, max_agents=500,
            on_forget=forgotten.extend)
        port = c.run(server.start("127.0.0.1:0"))
        with _stub(port, None) as stub:
            watch = stub.WatchSnapshots(pb.WatchRequest(agent_id="watcher", node="n"))
            assert next(iter(watch)).WhichOneof("update") == "full"
            fakes = (pb.AgentReport(agent_id=f"fake-{i}", node="n") for i in range(3000))
            code = _refused(lambda: stub.Report(fakes, timeout=WAIT * 2))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert len(c.agents()) == 500 and "watcher" in c.agents()
            assert server.refused[("Report", "agents_full")] == 1
            # One by one, as a real flood would come: each new id is refused.
            for i in range(3000, 3020):
                assert _refused(lambda i=i: stub.Report(iter([pb.AgentReport(
                    agent_id=f"fake-{i}", node="n")]), timeout=WAIT)) == (
                        grpc.StatusCode.RESOURCE_EXHAUSTED)
            assert server.refused[("Report", "agents_full")] == 21
            assert len(c.agents()) == 500
            # A known agent still reports.
            assert stub.Report(iter([pb.AgentReport(agent_id="fake-7", node="n")]),
                               timeout=WAIT).reports == 1
            now["t"] += 61.0
            assert len(c.run(_expire(server))) == 499  # all but the watcher
            assert set(c.agents()) == {"watcher"} and server.agents_expired == 499
            assert len(forgotten) == 499 and "watcher" not in forgotten
            # Room again for new ids.
            assert stub.Report(iter([pb.AgentReport(agent_id="late", node="n")]),
                               timeout=WAIT).reports == 1
            watch.cancel()
        # The watcher's stream ended: it is forgotten a TTL later, not before.
        assert wait_until(lambda: not c.agents()["watcher"].watching)
        now["t"] += 30.0
        assert c.run(_expire(server)) == []
        now["t"] += 31.0
        assert set(c.run(_expire(server))) == {"watcher", "late"}
    finally:
        c.close()


async def _expire(server: grpc_server.ControlServer) -> list[str]:
    return server.expire_agents()


# -- listening rules --------------------------------------------------------------------


@pytest.mark.parametrize(("address", "tls", "insecure", "refused"), [
    ("127.0.0.1:7070", False, False, False),
    ("127.0.0.5:0", False, False, False),
    ("[::1]:7070", False, False, False),
    ("localhost:7070", False, False, False),
    ("0.0.0.0:7070", False, False, True),
    ("[::]:7070", False, False, True),
    ("10.1.2.3:7070", False, False, True),
    ("ctl.example:7070", False, False, True),
    (":7070", False, False, True),
    ("0.0.0.0:7070", True, False, False),
    ("0.0.0.0:7070", False, True, False),
])
def test_plaintext_listens_only_on_loopback(address: str, tls: bool, insecure: bool,
                                            refused: bool) -> None:
    why = grpc_server.listen_refused(address, tls, insecure)
    assert (why is not None) == refused, why


def test_server_refuses_plaintext_wildcard_before_listening(controller: Controller) -> None:
    server = grpc_server.ControlServer(controller.publisher)
    with pytest.raises(PermissionError, match="insecure-listen"):
        controller.run(server.start("0.0.0.0:0"))
    assert server.port is None and server._server is None  # nothing half-started
    allowed = grpc_server.ControlServer(controller.publisher, insecure_listen=True)
    assert controller.run(allowed.start("0.0.0.0:0")) > 0
    controller.run(allowed.stop(grace=0.1))


# -- protocol edges -----------------------------------------------------------------------


def test_bad_requests_and_reports_are_refused(controller: Controller) -> None:
    controller.publisher.publish(snap(1, service("a", 1)))
    port = controller.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.ControlStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            next(iter(stub.WatchSnapshots(pb.WatchRequest(agent_id=""), timeout=WAIT)))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "agent_id" in (info.value.details() or "")
        # Holding the current content under the current version: an empty delta
        # confirms it, then nothing until the next version.
        current = controller.publisher.current
        assert current is not None
        watch = iter(stub.WatchSnapshots(pb.WatchRequest(agent_id="x", have_version=1,
                                                         have_hash=current.hash), timeout=0.5))
        first = next(watch)
        assert first.WhichOneof("update") == "delta"
        assert (first.delta.from_version, first.delta.to_version) == (1, 1)
        assert not first.delta.upserted and not first.delta.removed
        with pytest.raises(grpc.RpcError) as info:
            next(watch)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

        good = pb.AgentReport(agent_id="x", node="n", applied_version=1,
                              applied_hash=current.hash)
        bad = pb.AgentReport(agent_id="x", node="n", applied_version=1, applied_hash="zz")
        nan = pb.AgentReport(agent_id="x", node="n")
        nan.engines.add(identity="e", metrics_ok=True, health_ok=True).load.kv_usage = 7.0
        ack = stub.Report(iter([good, bad, nan]), timeout=WAIT)
        assert ack.reports == 1
    status = controller.agents()["x"]
    assert status.reports == 1 and status.rejected_reports == 2
    assert status.applied_version == 1 and status.converged  # the good report stays
    assert "kv_usage" in (status.last_error or "")


def test_engine_loads_travel_apart_from_snapshots(controller: Controller,
                                                  agents: list[Agent]) -> None:
    """A load one agent reports reaches the others as an EngineLoads message: no new
    snapshot version, and only loads that moved are sent again."""
    svc = service("a", 1)
    ident = svc.identity(svc.backends[0])
    ref = model.EngineRef(ident, f"http://{svc.backends[0].address}:8000/metrics",
                          f"http://{svc.backends[0].address}:8000/health", "node-scraper")
    v1 = model.Snapshot.of(1, (svc,), (ref,))
    controller.publisher.publish(v1)
    port = controller.start()
    running = {"now": 2.0}

    def observe() -> reports.Observations:
        load = enginemetrics.EngineLoad(running["now"], 0, 0.25, enginemetrics.KV_USAGE, 1)
        return reports.Observations(
            engines=(scraper.ScrapeResult(ident, True, True, 0.001, load, None),))

    got: list[dict[str, int]] = []
    scraping = Agent(port, "scraper", report_source=observe)
    other = Agent(port, "other", on_loads=got.append)
    agents += [scraping, other]
    for a in agents:
        a.client.start()
    other.wait(v1)
    assert wait_until(lambda: {ident: 2250} in got), got
    running["now"] = 5.0
    assert wait_until(lambda: {ident: 5250} in got), got
    assert controller.publisher.current == v1  # no snapshot per load change
    # A load for an engine the fleet does not have is not relayed.
    assert controller.publisher.publish_loads({"10.9.9.9:8000/tcp": 7}) == 0
