"""Controller <-> agent stream over real gRPC on 127.0.0.1: full then deltas, restarts,
missed versions, corrupted deltas, mTLS, reports and convergence."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import ipaddress
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from controller import grpc_server
from dataplane import enginemetrics, model, reports, scraper, stream
from dataplane.api import channel
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
                 delay: float = 0.0, **kw: Any) -> None:
        self.seen: list[model.Snapshot] = []
        self.ok = ok
        self.delay = delay
        kw.setdefault("report_interval", 0.2)
        self.client = stream.SnapshotClient(f"127.0.0.1:{port}", agent_id, f"node-{agent_id}",
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
    client: channel.TLSFiles
    rogue: channel.TLSFiles  # a client cert from another CA


def _make_pki(root: Path) -> PKI:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        return path

    def cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
             issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool = False,
             server: bool = False) -> x509.Certificate:
        b = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
             .issuer_name(issuer).public_key(key.public_key())
             .serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(hours=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
            b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            b = b.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    def authority(name: str) -> tuple[x509.Name, ec.EllipticCurvePrivateKey, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        path = root / f"{name}.pem"
        path.write_bytes(cert(name, key, subject, key, ca=True).public_bytes(
            serialization.Encoding.PEM))
        return subject, key, path

    def leaf(name: str, ca: tuple[x509.Name, ec.EllipticCurvePrivateKey, Path],
             server: bool = False) -> channel.TLSFiles:
        key = ec.generate_private_key(ec.SECP256R1())
        crt = root / f"{name}.crt"
        crt.write_bytes(cert(name, key, ca[0], ca[1], server=server).public_bytes(
            serialization.Encoding.PEM))
        return channel.TLSFiles(ca=ca[2], cert=crt, key=write_key(key, root / f"{name}.key"))

    good_ca, other_ca = authority("kvroute-ca"), authority("rogue-ca")
    rogue = leaf("rogue-agent", other_ca)
    # The rogue trusts the real CA, so only the server's check of its cert can stop it.
    return PKI(server=leaf("controller", good_ca, server=True),
               client=leaf("agent", good_ca),
               rogue=dataclasses.replace(rogue, ca=good_ca[2]))


def test_mtls_accepts_a_good_client_and_refuses_others(controller: Controller,
                                                      agents: list[Agent],
                                                      tmp_path: Path) -> None:
    pytest.importorskip("cryptography", reason="the test generates its certificates with it")
    pki = _make_pki(tmp_path)
    v1 = snap(1, service("a", 1))
    controller.publisher.publish(v1)
    port = controller.start(tls=pki.server)
    good = Agent(port, "good", tls=pki.client)
    rogue = Agent(port, "rogue", tls=pki.rogue)
    plain = Agent(port, "plain")
    agents += [good, rogue, plain]
    for a in agents:
        a.client.start()
    good.wait(v1)
    assert wait_until(lambda: controller.agents().get("good") is not None
                      and controller.agents()["good"].converged)
    time.sleep(0.5)  # several reconnect attempts for the refused ones
    for refused in (rogue, plain):
        assert refused.client.applied is None and refused.seen == []
        assert refused.client.stats.connects == 0
        assert refused.client.stats.disconnects >= 1
    assert set(controller.agents()) == {"good"}


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
