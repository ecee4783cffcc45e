"""The controller process: discovery → reconciler → snapshots to agents, reports back.

One asyncio loop runs everything that touches the reconciler, so it needs no lock:

- discovery's ``watch()`` → :meth:`Reconciler.set_specs`;
- the gRPC :class:`controller.grpc_server.ControlServer` hands each agent report to
  :meth:`Reconciler.observe` (its handlers run on this loop);
- a ticker calls :meth:`Reconciler.tick` every ``tick_interval`` (and at once after a
  report that moved a breaker) and publishes a snapshot whose content changed;
- an HTTP endpoint serves ``/metrics``, ``/healthz`` (the loop ticks), ``/readyz`` (this
  replica leads and discovery has delivered) and ``/engines`` (the live engine view, JSON).

Nothing is published before discovery has delivered its first list: an empty snapshot
would make every agent drop its tables, the opposite of static stability.

With leader election (Kubernetes), every replica ticks and keeps its breakers warm from
the reports it receives, but only the leader publishes; ``/readyz`` fails on the others so
a Service sends agents to the leader. Versions start at the wall clock in milliseconds, so
a successor's versions are higher than its predecessor's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import prometheus_client
from aiohttp import web

from controller import grpc_server, leader, metrics, reconcile
from controller.discovery import discovered
from dataplane import model, reports
from dataplane.api import channel

log = logging.getLogger("kvroute.controller")

DEFAULT_LISTEN = "127.0.0.1:7070"
DEFAULT_TICK = 0.05


class Controller:
    """Wires a discovery source, a reconciler and a gRPC server together (see the module
    docstring). ``leading`` False waits for :meth:`set_leading` (leader election)."""

    def __init__(
        self,
        discovery: discovered.Discovery,
        reconciler: reconcile.Reconciler,
        server: grpc_server.ControlServer,
        tick_interval: float = DEFAULT_TICK,
        registry: prometheus_client.CollectorRegistry | None = None,
        *,
        leading: bool = True,
        clock: Callable[[], float] = time.monotonic,
        max_removal_share: float = discovered.DEFAULT_MAX_REMOVAL_SHARE,
    ) -> None:
        if not tick_interval > 0:
            raise ValueError(f"tick_interval must be > 0, got {tick_interval!r}")
        self.discovery = discovery
        self.reconciler = reconciler
        self.server = server
        self.tick_interval = float(tick_interval)
        self.registry = registry if registry is not None else prometheus_client.CollectorRegistry()
        self.metrics = metrics.ControllerMetrics(self.registry, reconciler, server)
        self._clock = clock
        self._leading = leading
        self.metrics.leader.set(1 if leading else 0)
        self.max_removal_share = max_removal_share
        # Service ports of the last discovery result applied.
        self.known_specs: set[tuple[str, int, str]] = set()
        self.refused: str | None = None  # why the latest discovery result was refused
        self.synced = False  # discovery delivered at least once
        self.last_tick: float | None = None  # clock() of the last tick
        self.ticks = 0
        self.http_port: int | None = None
        self.grpc_port: int | None = None
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._runner: web.AppRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        server.on_report = self._on_report
        server.engine_ref = reconciler.engine_ref
        server.on_forget = reconciler.forget_agents

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self, listen: str = DEFAULT_LISTEN, http: str | None = None) -> None:
        """Listen for agents on ``listen`` and (if given) HTTP on ``http`` ("host:port",
        port 0 picks one: see :attr:`grpc_port`, :attr:`http_port`); start the loops."""
        self._loop = asyncio.get_running_loop()
        self.grpc_port = await self.server.start(listen)
        if http is not None:
            host, port = parse_address(http)
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((host, port))
            except OSError:
                sock.close()
                raise
            self.http_port = sock.getsockname()[1]
            self._runner = web.AppRunner(self._app(), handle_signals=False, access_log=None)
            await self._runner.setup()
            await web.SockSite(self._runner, sock).start()
            log.info("controller HTTP on %s:%d (/metrics /healthz /readyz /engines)", host,
                     self.http_port)
        loop = self._loop
        self._tasks = [loop.create_task(self._watch(), name="kvroute-discovery"),
                       loop.create_task(self._ticker(), name="kvroute-ticker")]

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.server.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def run(self, stop: asyncio.Event, listen: str = DEFAULT_LISTEN,
                  http: str | None = None) -> None:
        """Start, run until ``stop`` is set or a loop dies, then stop."""
        await self.start(listen, http)
        try:
            waiter = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait({waiter, *self._tasks},
                                         return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            for task in done:
                if task is not waiter and task.exception() is not None:
                    raise RuntimeError("controller loop died") from task.exception()
        finally:
            await self.stop()

    def set_leading(self, leading: bool) -> None:
        """Leadership changed (any thread: the elector calls it from its own)."""
        self._leading = leading
        self.metrics.leader.set(1 if leading else 0)
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._wake.set)

    @property
    def leading(self) -> bool:
        return self._leading

    # -- loops ---------------------------------------------------------------------------

    async def _watch(self) -> None:
        async for specs in self.discovery.watch():
            ports: set[tuple[str, int, str]] = {(s.name, s.port, s.protocol) for s in specs}
            self.refused = discovered.removal_refused(self.known_specs, ports,
                                                      self.max_removal_share)
            if self.refused is not None:
                log.error("%s", self.refused)
                self.metrics.discovery_refused.inc()
                continue
            self.known_specs = ports
            self.reconciler.set_specs(specs, self._clock())
            self.metrics.discovery_updates.inc()
            for problem in self.reconciler.problems():
                log.warning("%s", problem)
            if not self.synced:
                log.info("discovery: %d service ports", len(specs))
            self.synced = True
            self._wake.set()
        raise RuntimeError("discovery watch ended")

    async def _ticker(self) -> None:
        loop = asyncio.get_running_loop()
        next_tick = loop.time()
        while True:
            self._wake.clear()
            if self.synced:
                try:
                    self.tick()
                except Exception:
                    # A bug must not stop the controller: agents keep the last snapshot,
                    # the next tick tries again, and /healthz turns red if none succeeds.
                    log.exception("tick failed")
            next_tick += self.tick_interval
            now = loop.time()
            if next_tick < now:  # overran: skip the missed ticks instead of bursting
                next_tick = now + self.tick_interval
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), next_tick - now)

    def tick(self) -> model.Snapshot | None:
        """One reconcile step; returns the snapshot published, if any."""
        started = time.perf_counter()
        now = self._clock()
        self.reconciler.tick(now)
        events = self.reconciler.events()
        self.metrics.record_transitions(events)
        for e in events:
            log.info("engine %s: breaker %s -> %s (%s)", e.engine, e.from_state.value,
                     e.to_state.value, e.reason)
        published = None
        last = self.reconciler.last
        current = self.server.publisher.current
        # Publish whatever is newer than what agents were sent: a new snapshot, or the
        # reconciler's latest when this replica just became the leader.
        if self._leading and last is not None and (current is None or current.hash != last.hash):
            self.server.publish(last)
            self.metrics.snapshots.inc()
            published = last
            log.debug("published snapshot %d (%s)", last.version, last.hash[:12])
        self.metrics.tick_seconds.observe(time.perf_counter() - started)
        self.last_tick = now  # only a tick that got this far counts for /healthz
        self.ticks += 1
        return published

    def _on_report(self, report: reports.AgentReport) -> None:
        self.reconciler.observe(report, self._clock())
        self.metrics.reports.inc()
        if self.reconciler.has_events:
            self._wake.set()  # a breaker moved: tell the agents now, not at the next tick

    # -- HTTP ----------------------------------------------------------------------------

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/engines", self._engines)
        return app

    def healthy(self) -> bool:
        """The ticker is alive: ticked recently (or discovery is still syncing)."""
        if not self._tasks or any(t.done() for t in self._tasks):
            return False
        if not self.synced:
            return True
        limit = max(1.0, 20 * self.tick_interval)
        return self.last_tick is not None and self._clock() - self.last_tick < limit

    async def _metrics(self, request: web.Request) -> web.Response:
        body = prometheus_client.generate_latest(self.registry)
        return web.Response(body=body,
                            headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        ok = self.healthy()
        return web.Response(status=200 if ok else 503, text="ok\n" if ok else "not ticking\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        ready = self.healthy() and self.synced and self._leading
        why = "ready" if ready else ("not leading" if not self._leading else "not synced")
        return web.Response(status=200 if ready else 503, text=why + "\n")

    async def _engines(self, request: web.Request) -> web.Response:
        return web.json_response(self.status())

    def status(self) -> dict[str, Any]:
        """JSON-ready live view: snapshot, engines, agents (for ``/engines`` and demos)."""
        snap = self.reconciler.last
        engines = []
        for v in self.reconciler.engine_view().values():
            row = dataclasses.asdict(v)
            row["breaker"] = v.breaker.value
            row["load"] = None if v.load is None else {
                "running": v.load.running, "waiting": v.load.waiting,
                "kv_usage": v.load.kv_usage}
            engines.append(row)
        agents = [
            {"agent_id": a.agent_id, "node": a.node, "applied_version": a.applied_version,
             "converged": a.converged, "lag_seconds": a.lag_seconds, "watching": a.watching}
            for a in self.server.agents().values()
        ]
        return {"version": snap.version if snap else 0, "hash": snap.hash if snap else "",
                "leading": self._leading, "synced": self.synced, "engines": engines,
                "agents": agents, "problems": list(self.reconciler.problems())}


# -- CLI ----------------------------------------------------------------------------------


def parse_address(text: str) -> tuple[str, int]:
    """"host:port" (IPv6 as "[::1]:port") → (host, port); ValueError if malformed."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _address(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        parse_address(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


@click.command("controller")
@click.option("--static", "static_file", type=click.Path(exists=True, dir_okay=False),
              help="Discover services from this YAML file (re-read when it changes).")
@click.option("--kubernetes", is_flag=True, help="Discover Services and EndpointSlices.")
@click.option("--kubeconfig", type=click.Path(dir_okay=False),
              help="With --kubernetes: kubeconfig (default: in-cluster or ~/.kube/config).")
@click.option("--namespace", help="With --kubernetes: only this namespace.")
@click.option("--services", "service_scope", type=click.Choice(["all", "annotated"]),
              default="all", show_default=True,
              help="With --kubernetes: which ClusterIP Services kvroute balances. 'all' "
                   "replaces kube-proxy (unannotated Services are balanced as kube-proxy "
                   "would); 'annotated' runs beside it, taking only Services with a "
                   "kvroute.io/ annotation and leaving the rest to kube-proxy.")
@click.option("--listen", default=DEFAULT_LISTEN, show_default=True, callback=_address,
              help="gRPC address agents connect to. Without the --tls-* files only loopback "
                   "is allowed (see --insecure-listen).")
@click.option("--insecure-listen", is_flag=True,
              help="Allow plaintext, unauthenticated gRPC on a non-loopback --listen address. "
                   "Dangerous: anyone who reaches the port can open breakers, report loads and "
                   "bindings (steering sessions) and read the fleet's topology. Use mutual "
                   "TLS instead.")
@click.option("--metrics", "metrics_addr", callback=_address,
              help="HOST:PORT serving /metrics, /healthz, /readyz and /engines.")
@click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False))
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False))
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False))
@click.option("--tick", type=click.FloatRange(min=0.001, max=60.0), default=DEFAULT_TICK,
              show_default=True, help="Seconds between reconcile ticks.")
@click.option("--leader-elect/--no-leader-elect", default=None,
              help="Lease leader election (default: on with --kubernetes inside a cluster).")
@click.option("--lease-name", default="kvroute-controller", show_default=True)
@click.option("--lease-namespace", default=None,
              help="Namespace of the Lease (default: --namespace, else the pod's, else "
                   "'kube-system').")
@click.option("--max-removal-share", type=click.FloatRange(0.0, 1.0, min_open=True),
              default=discovered.DEFAULT_MAX_REMOVAL_SHARE, show_default=True,
              help="Refuse a discovery result that removes every service, or more than this "
                   "share of them at once (1: allow anything).")
@click.option("--agent-ttl", type=click.FloatRange(min=1.0), show_default=True,
              default=grpc_server.DEFAULT_AGENT_TTL,
              help="Forget an agent with no open stream and no report for this many seconds.")
@click.option("--max-agents", type=click.IntRange(min=1), show_default=True,
              default=grpc_server.DEFAULT_MAX_AGENTS,
              help="Agents remembered at once; reports from new agent ids beyond it are "
                   "refused, so made-up ids cannot grow memory and /metrics.")
@click.option("-v", "--verbose", count=True, help="-v info, -vv debug.")
def command(static_file: str | None, kubernetes: bool, kubeconfig: str | None,
            namespace: str | None, service_scope: str, listen: str, insecure_listen: bool,
            metrics_addr: str | None, tls_ca: str | None, tls_cert: str | None,
            tls_key: str | None, tick: float,
            leader_elect: bool | None, lease_name: str, lease_namespace: str | None,
            max_removal_share: float, agent_ttl: float, max_agents: int,
            verbose: int) -> None:
    """Run the kvroute controller: discover services, run breakers and policy on agent
    reports, stream snapshots to agents."""
    if bool(static_file) == kubernetes:
        raise click.UsageError("give exactly one of --static FILE or --kubernetes")
    if not kubernetes and (kubeconfig or namespace or service_scope != "all"):
        raise click.UsageError("--kubeconfig, --namespace and --services go with --kubernetes")
    tls_parts = (tls_ca, tls_cert, tls_key)
    if any(tls_parts) and not all(tls_parts):
        raise click.UsageError("mutual TLS needs all of --tls-ca, --tls-cert and --tls-key")
    if leader_elect and not kubernetes:
        raise click.UsageError("--leader-elect needs --kubernetes (the Lease lives there)")
    refused = grpc_server.listen_refused(listen, all(tls_parts), insecure_listen)
    if refused is not None:  # before anything starts
        raise click.UsageError(refused)
    if insecure_listen and all(tls_parts):
        raise click.UsageError("--insecure-listen makes no sense with mutual TLS")
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)],
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tls = (channel.TLSFiles(Path(tls_ca), Path(tls_cert), Path(tls_key))
           if tls_ca and tls_cert and tls_key else None)
    if leader_elect is None:
        leader_elect = kubernetes and bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
    try:
        asyncio.run(_serve(static_file, kubeconfig, namespace, listen, metrics_addr, tls, tick,
                           leader_elect, lease_name, lease_namespace, max_removal_share,
                           insecure_listen, agent_ttl, max_agents,
                           annotated_only=service_scope == "annotated"))
    except (OSError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None


async def _serve(static_file: str | None, kubeconfig: str | None, namespace: str | None,
                 listen: str, http: str | None, tls: channel.TLSFiles | None, tick: float,
                 leader_elect: bool, lease_name: str, lease_namespace: str | None,
                 max_removal_share: float = discovered.DEFAULT_MAX_REMOVAL_SHARE,
                 insecure_listen: bool = False,
                 agent_ttl: float = grpc_server.DEFAULT_AGENT_TTL,
                 max_agents: int = grpc_server.DEFAULT_MAX_AGENTS,
                 annotated_only: bool = False) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    cleanups: list[Callable[[], None]] = []
    discovery: discovered.Discovery
    api = None
    if static_file:
        from controller.discovery import static

        discovery = static.StaticDiscovery(static_file)
    else:
        from controller.discovery import k8s

        api = k8s.api_client(kubeconfig)
        kd = k8s.KubernetesDiscovery(api, k8s.Settings(namespace=namespace,
                                                        annotated_only=annotated_only))
        cleanups.append(kd.close)
        discovery = kd
    reconciler = reconcile.Reconciler(first_version=int(time.time() * 1000))
    server = grpc_server.ControlServer(grpc_server.Publisher(), tls=tls,
                                       insecure_listen=insecure_listen, agent_ttl=agent_ttl,
                                       max_agents=max_agents)
    controller = Controller(discovery, reconciler, server, tick, leading=not leader_elect,
                            max_removal_share=max_removal_share)
    if leader_elect:
        assert api is not None
        elector = leader.LeaderElector(api, leader.Config(
            namespace=lease_namespace or namespace or _pod_namespace() or "kube-system",
            name=lease_name, identity=os.environ.get("POD_NAME") or socket.gethostname()),
            on_change=controller.set_leading)
        elector.start()
        cleanups.insert(0, elector.close)
    try:
        await controller.run(stop, listen, http)
    finally:
        for cleanup in cleanups:
            cleanup()


def _pod_namespace() -> str | None:
    path = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    with contextlib.suppress(OSError):
        return path.read_text().strip() or None
    return None


if __name__ == "__main__":
    command()
