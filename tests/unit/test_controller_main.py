"""controller.main end to end, in process and without root: a static file naming simulated
engines, the controller on loopback, and a fake agent (dataplane.stream.SnapshotClient)
that scrapes the engines the snapshot lists and reports them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import prometheus_client
import pytest
from click.testing import CliRunner
from prometheus_client import parser as prom_parser

from controller import grpc_server, main, reconcile
from controller.discovery import static
from dataplane import model, reports, scraper, stream
from lab.engine_sim import server as sim

ROOT = Path(__file__).resolve().parents[2]
SCRAPE_INTERVAL = 0.05
TICK = 0.05
# The engines' pod address in the discovery file. The model refuses loopback backends (a
# client's own host answers 127/8), so the pods get a TEST-NET-1 address (RFC 5737, routed
# nowhere), each engine its own port; the fake agent stands in for a node that reaches the
# pods, and scrapes each simulator where it really listens: loopback, the same port.
POD_ADDRESS = "192.0.2.10"


class FakeAgent:
    """Applies snapshots by recording them; scrapes the engines of its node (and those of
    no node) every SCRAPE_INTERVAL with a fresh connection per round (like a real engine's
    death, a refused connect is then seen at once) and reports each round once, right
    after it ends."""

    def __init__(self, target: str, agent_id: str = "agent-a", node: str = "node-a") -> None:
        self.node = node
        self.applied: list[tuple[float, model.Snapshot]] = []
        self._lock = threading.Lock()
        self._pending: dict[str, scraper.ScrapeResult] = {}
        self._stop = threading.Event()
        self.rounds = 0
        self.first_failure: dict[str, float] = {}  # monotonic time of an engine's first failure
        self.client = stream.SnapshotClient(target, agent_id, node, self._on_snapshot,
                                            report_source=self._report,
                                            report_interval=SCRAPE_INTERVAL,
                                            backoff=stream.Backoff(base=0.05, cap=0.2))
        self._thread = threading.Thread(target=self._scrape_main, daemon=True)

    def start(self) -> None:
        self.client.start()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.client.stop()
        self._thread.join(5)

    def _on_snapshot(self, snap: model.Snapshot) -> bool:
        with self._lock:
            self.applied.append((time.monotonic(), snap))
        return True

    def _report(self) -> reports.Observations:
        with self._lock:
            pending, self._pending = self._pending, {}
        return reports.Observations(engines=tuple(pending.values()))

    def _targets(self) -> list[scraper.EngineTarget]:
        snap = self.client.applied
        out = []
        for ref in snap.engines if snap is not None else ():
            if ref.node not in (None, self.node):
                continue
            url = httpx.URL(ref.metrics_url)
            health = httpx.URL(ref.health_url)
            assert url.host == POD_ADDRESS, ref.metrics_url  # the controller's URL, untouched
            out.append(scraper.EngineTarget(ref.identity, f"{url.scheme}://127.0.0.1:{url.port}",
                                            metrics_path=url.path, health_path=health.path))
        return out

    def _scrape_main(self) -> None:
        async def loop() -> None:
            # No keep-alive: each round connects anew, so a closed listener shows at once.
            async with httpx.AsyncClient(timeout=1.0, trust_env=False, limits=httpx.Limits(
                    max_keepalive_connections=0)) as client:
                while not self._stop.is_set():
                    await one_round(client)

        async def one_round(client: httpx.AsyncClient) -> None:
            started = time.monotonic()
            targets = self._targets()
            if targets:
                results = await scraper.scrape(targets, timeout=1.0, client=client)
                with self._lock:
                    self._pending.update(results)
                    for r in results.values():
                        if not r.ok:
                            self.first_failure.setdefault(r.identity, time.monotonic())
                self.rounds += 1
                self.client.report_now()  # as the real agent does on news
            await asyncio.sleep(max(0.0, SCRAPE_INTERVAL - (time.monotonic() - started)))

        asyncio.run(loop())

    def state_of(self, identity: str) -> str | None:
        snap = self.client.applied
        return _state_in(snap, identity) if snap is not None else None

    def wait_state(self, identity: str, state: str, timeout: float) -> float | None:
        """Monotonic time the applied snapshot first showed ``state``, or None."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                for at, snap in self.applied:
                    if _state_in(snap, identity) == state:
                        return at
            time.sleep(0.005)
        return None

    def forget(self) -> None:
        with self._lock:
            self.applied.clear()
            self.first_failure.clear()


def wait(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


def _state_in(snap: model.Snapshot, identity: str) -> str | None:
    for svc in snap.services:
        for b in svc.backends:
            if reconcile.backend_identity(b.address, b.port, svc.protocol) == identity:
                return b.state
    return None


@contextlib.contextmanager
def engines(n: int) -> Iterator[list[tuple[str, sim.EngineServer]]]:
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(sim.running_in_thread(sim.ServerConfig(engine_id=f"e{i}")))
               for i in range(n)]


def write_static(path: Path, ports: list[int]) -> None:
    def eps(chosen: list[int]) -> str:
        return "\n".join(f"      - {{address: {POD_ADDRESS}, port: {p}, node: node-a}}"
                         for p in chosen)

    path.write_text(f"""services:
  - name: chat
    vip: 10.96.0.10
    port: 80
    engine: vllm
    affinity: session
    breaker: {{consecutive-failures: 2, cooldown: 0.2}}
    endpoints:
{eps(ports[:2])}
  - name: code
    vip: 10.96.0.11
    port: 80
    engine: vllm
    affinity: session
    breaker: {{consecutive-failures: 2, cooldown: 0.2}}
    endpoints:
{eps(ports[2:])}
""")


def post_faults(base_url: str, body: dict[str, Any]) -> None:
    r = httpx.post(f"{base_url}/admin/faults", json=body, timeout=5.0)
    assert r.status_code == 200, r.text


def run_controller(discovery: static.StaticDiscovery,
                   body: Callable[[main.Controller, FakeAgent], None]) -> main.Controller:
    """Start the controller on loopback and a fake agent, run ``body`` in a thread."""
    rec = reconcile.Reconciler()
    server = grpc_server.ControlServer(grpc_server.Publisher())
    controller = main.Controller(discovery, rec, server, TICK,
                                 prometheus_client.CollectorRegistry())

    async def go() -> None:
        await controller.start("127.0.0.1:0", "127.0.0.1:0")
        agent = FakeAgent(f"127.0.0.1:{controller.grpc_port}")
        agent.start()
        try:
            await asyncio.to_thread(body, controller, agent)
        finally:
            await asyncio.to_thread(agent.stop)
            await controller.stop()

    asyncio.run(go())
    return controller


def test_controller_end_to_end_breaker_cycle(tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="kvroute.controller")
    with engines(3) as sims:
        ports = [s.port for _, s in sims]
        ids = [f"{POD_ADDRESS}:{p}/tcp" for p in ports]
        path = tmp_path / "services.yaml"
        write_static(path, ports)
        discovery = static.StaticDiscovery(path, poll_interval=0.05)
        measured: dict[str, float] = {}

        def body(controller: main.Controller, agent: FakeAgent) -> None:
            # Converges: the agent holds the controller's current content.
            assert agent.client.wait_for(lambda s: s is not None and len(s.services) == 2, 10)
            snap = agent.client.applied
            assert snap is not None
            assert [s.name for s in snap.services] == ["chat.80-tcp", "code.80-tcp"]
            assert [e.identity for e in snap.engines] == sorted(ids)
            assert all(_state_in(snap, i) == "active" for i in ids)
            assert wait(lambda: (a := controller.server.agents().get("agent-a")) is not None
                        and a.converged)
            # Loads flow in: every engine has been scraped and reported.
            assert wait(lambda: all(
                v.last_ok for v in controller.reconciler.engine_view().values()))

            # Kill engine 0's listener (refuse new connects) for 1 s.
            agent.forget()
            measured["t0_wall"] = time.time()
            t0 = time.monotonic()
            post_faults(sims[0][0], {"refuse": True, "refuse_s": 1.0})
            measured["post"] = time.monotonic() - t0  # the listener is closed by now
            opened = agent.wait_state(ids[0], "open", 5)
            assert opened is not None, "engine 0 never showed open"
            measured["fault_to_open_applied"] = opened - t0
            measured["fault_to_failed_scrape"] = agent.first_failure[ids[0]] - t0
            assert _state_in(agent.applied[-1][1], ids[1]) == "active"
            # Back after refuse_s: cool-down → probing → active.
            probing = agent.wait_state(ids[0], "probing", 10)
            assert probing is not None and probing > opened
            assert wait(lambda: agent.state_of(ids[0]) == "active")
            measured["fault_to_active"] = time.monotonic() - t0

            # The HTTP side: health, readiness, metrics, the live view.
            base = f"http://127.0.0.1:{controller.http_port}"
            assert urllib.request.urlopen(f"{base}/healthz", timeout=5).status == 200
            assert urllib.request.urlopen(f"{base}/readyz", timeout=5).status == 200
            text = urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()
            families = {f.name: f for f in prom_parser.text_string_to_metric_families(text)}
            trans = [s for s in families["kvroute_controller_breaker_transitions"].samples
                     if s.name.endswith("_total") and s.labels["engine"] == ids[0]]
            assert {(s.labels["from"], s.labels["to"]) for s in trans} >= {
                ("closed", "open"), ("open", "half_open"), ("half_open", "closed")}
            lag = [s for s in families["kvroute_controller_agent_convergence_lag_seconds"].samples
                   if s.labels["agent"] == "agent-a"]
            assert len(lag) == 1 and lag[0].value >= 0
            assert families["kvroute_controller_snapshot_version"].samples[0].value >= 1
            view = json.loads(urllib.request.urlopen(f"{base}/engines", timeout=5).read())
            assert {e["identity"] for e in view["engines"]} == set(ids)
            assert view["agents"][0]["agent_id"] == "agent-a"

        run_controller(discovery, body)
    opened_logs = [r for r in caplog.records
                   if f"engine {ids[0]}: breaker closed -> open" in r.getMessage()]
    assert opened_logs
    breaker_open = opened_logs[0].created - measured["t0_wall"]
    since_post = measured["fault_to_open_applied"] - measured["post"]
    print(f"\nfault POST took {measured['post'] * 1000:.0f} ms; from its start: first failed "
          f"scrape {measured['fault_to_failed_scrape'] * 1000:.0f} ms, breaker open in the "
          f"controller {breaker_open * 1000:.0f} ms, open in the agent's applied snapshot "
          f"{measured['fault_to_open_applied'] * 1000:.0f} ms ({since_post * 1000:.0f} ms "
          f"after the POST returned); active again after {measured['fault_to_active']:.2f} s "
          f"(refused 1 s, cool-down 0.2 s)")
    assert measured["fault_to_open_applied"] < 2.0


def test_nothing_is_published_before_discovery_delivers(tmp_path: Path) -> None:
    class Never:
        def snapshot(self) -> list[Any]:
            return []

        async def watch(self) -> Any:
            await asyncio.Event().wait()
            yield []  # pragma: no cover

    rec = reconcile.Reconciler()
    server = grpc_server.ControlServer(grpc_server.Publisher())
    controller = main.Controller(Never(), rec, server, TICK)

    async def go() -> None:
        await controller.start("127.0.0.1:0", "127.0.0.1:0")
        try:
            await asyncio.sleep(0.3)
            assert server.publisher.current is None
            assert controller.healthy()
            r = await asyncio.to_thread(
                httpx.get, f"http://127.0.0.1:{controller.http_port}/readyz")
            assert r.status_code == 503 and "not synced" in r.text
        finally:
            await controller.stop()

    asyncio.run(go())


def test_a_follower_ticks_but_publishes_only_once_leading(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("services:\n  - {name: web, vip: 10.96.0.20, port: 80,"
                    " endpoints: [{address: 10.0.0.5, port: 80}]}\n")
    rec = reconcile.Reconciler()
    server = grpc_server.ControlServer(grpc_server.Publisher())
    controller = main.Controller(static.StaticDiscovery(path, poll_interval=0.05), rec, server,
                                 TICK, leading=False)

    async def go() -> None:
        await controller.start("127.0.0.1:0")
        try:
            for _ in range(100):
                if rec.last is not None:
                    break
                await asyncio.sleep(0.01)
            assert rec.last is not None and server.publisher.current is None
            controller.set_leading(True)
            await asyncio.sleep(3 * TICK)
            assert server.publisher.current is not None
            assert server.publisher.current.hash == rec.last.hash
        finally:
            await controller.stop()

    asyncio.run(go())


# -- CLI ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "exactly one of --static FILE or --kubernetes"),
        (["--kubernetes", "--static", "{file}"], "exactly one"),
        (["--static", "{file}", "--namespace", "x"], "go with --kubernetes"),
        (["--static", "{file}", "--services", "annotated"], "--services go with --kubernetes"),
        (["--kubernetes", "--services", "some"], "'some' is not one of 'all', 'annotated'"),
        (["--static", "{file}", "--tls-ca", "{file}"], "all of --tls-ca"),
        (["--static", "{file}", "--listen", "nonsense"], "HOST:PORT"),
        (["--static", "{file}", "--leader-elect"], "needs --kubernetes"),
        (["--static", "{file}", "--listen", "0.0.0.0:7070"], "--insecure-listen"),
        (["--static", "{file}", "--listen", "[::]:7070"], "in plaintext"),
        (["--static", "{file}", "--listen", "ctl.example:7070"], "in plaintext"),
        (["--static", "{file}", "--listen", "0.0.0.0:7070", "--insecure-listen",
          "--tls-ca", "{file}", "--tls-cert", "{file}", "--tls-key", "{file}"],
         "makes no sense with mutual TLS"),
    ],
)
def test_cli_refuses_bad_usage(tmp_path: Path, args: list[str], message: str) -> None:
    f = tmp_path / "s.yaml"
    f.write_text("services: []\n")
    result = CliRunner().invoke(main.command, [a.format(file=f) for a in args])
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_cli_serves_until_sigterm(tmp_path: Path) -> None:
    f = tmp_path / "s.yaml"
    f.write_text("services:\n  - {name: web, vip: 10.96.0.20, port: 80,"
                 " endpoints: [{address: 10.0.0.5, port: 80}]}\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        http_port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "controller.main", "--static", str(f), "--listen",
         "127.0.0.1:0", "--metrics", f"127.0.0.1:{http_port}", "-v"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 20
        body = ""
        while time.monotonic() < deadline:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics",
                                              timeout=1).read().decode()
                if 'kvroute_controller_snapshot_services 1.0' in body:
                    break
            except OSError:
                pass
            time.sleep(0.05)
        assert 'kvroute_controller_snapshot_services 1.0' in body
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out


# -- metrics ------------------------------------------------------------------------------


def test_metrics_live_on_the_given_registry_only() -> None:
    from controller import metrics
    from tests.unit import test_reconcile as tr

    before = {m.name for m in prometheus_client.REGISTRY.collect()}
    rec = tr.make(tr.spec(endpoints=(tr.ep("10.0.0.1"), tr.ep("10.0.0.2", ready=False,
                                                                terminating=True))))
    registry = prometheus_client.CollectorRegistry()
    m = metrics.ControllerMetrics(registry, rec, grpc_server.ControlServer(
        grpc_server.Publisher()))
    assert {x.name for x in prometheus_client.REGISTRY.collect()} == before
    assert registry.get_sample_value("kvroute_controller_snapshot_version") == 0

    rec.observe(tr.report(tr.scrape(tr.E1, ok=False)), 0.1)
    rec.observe(tr.report(tr.scrape(tr.E1, ok=False), tr.scrape(
        tr.E2, engine_load=tr.load(running=2, kv=0.5))), 0.2)
    rec.observe(tr.report(tr.scrape(tr.E1, ok=False)), 0.3)  # the third failed round
    snap = rec.tick(0.3)
    assert snap is not None
    m.record_transitions(rec.events())

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("kvroute_controller_snapshot_version") == snap.version
    svc = tr.NAME
    assert value("kvroute_controller_backend_state", service=svc, backend=tr.E1, state="open") == 1
    assert value("kvroute_controller_backend_state", service=svc, backend=tr.E1,
                 state="active") == 0
    assert value("kvroute_controller_backend_state", service=svc, backend=tr.E2,
                 state="draining") == 1
    assert value("kvroute_controller_backend_weight", service=svc, backend=tr.E1) == 0
    assert value("kvroute_controller_backend_load", service=svc, backend=tr.E2) == 2500
    assert value("kvroute_controller_engine_breaker_state", engine=tr.E1, state="open") == 1
    assert value("kvroute_controller_engine_breaker_state", engine=tr.E2, state="closed") == 1
    assert value("kvroute_controller_engine_requests_running", engine=tr.E2) == 2
    assert value("kvroute_controller_engine_kv_usage_ratio", engine=tr.E2) == 0.5
    assert value("kvroute_controller_engine_scrape_ok", engine=tr.E1) == 0
    assert value("kvroute_controller_breaker_transitions_total", engine=tr.E1, reason=(
        "consecutive_failures:health"), to="open", **{"from": "closed"}) == 1
    assert value("kvroute_controller_service_saturated", service=svc) == 0


@pytest.mark.parametrize("before, after, share, refused", [
    (range(10), (), 0.5, "no service"), (range(10), range(4), 0.5, "remove 6 of 10"),
    (range(10), range(5), 0.5, None), (range(10), (), 1.0, None), ((), (), 0.5, None),
    (range(3), range(7), 0.5, None), (range(4), range(4, 8), 0.5, "remove 4 of 4"),
])
def test_removal_guard(before: range, after: range, share: float, refused: str | None) -> None:
    from controller.discovery import discovered
    why = discovered.removal_refused(set(before), set(after), share)
    assert (why is None) if refused is None else (why is not None and refused in why)


def test_a_discovery_result_that_removes_every_service_is_refused() -> None:
    """A truncated static file (services: []) keeps the services the controller has and
    publishes nothing new; the next good list goes through."""
    from tests.unit import test_reconcile as tr

    lists = [[tr.spec(), tr.spec("default/other", "10.96.0.11")], [],
             [tr.spec()], [tr.spec("default/third", "10.96.0.12")],
             [tr.spec(), tr.spec("default/third", "10.96.0.12")]]

    class Listed:
        def snapshot(self) -> list[Any]:
            return lists[0]

        async def watch(self) -> Any:
            for specs in lists:
                yield specs

    rec = reconcile.Reconciler()
    ctl = main.Controller(Listed(), rec, grpc_server.ControlServer(grpc_server.Publisher()))
    seen: list[int] = []
    real = rec.set_specs
    rec.set_specs = lambda specs, now: (seen.append(len(specs)), real(specs, now))  # type: ignore
    with pytest.raises(RuntimeError, match="discovery watch ended"):
        asyncio.run(ctl._watch())
    # [] refused (all gone); [one] is half: allowed at 0.5; swapping the only one for
    # another removes all of them: refused; adding one beside it goes through.
    assert seen == [2, 1, 2]
    assert ctl.metrics.registry.get_sample_value(
        "kvroute_controller_discovery_refused_total") == 2
