"""The node agent: owns the programs and maps, applies desired state.

Desired state comes from a YAML file (reloaded on change or SIGHUP) or from
the controller's snapshot stream; with a controller the agent also scrapes
the engines on its node, writes their load straight into the kernel, and
reports loads and kernel counters back. The agent keeps no state of its own
that matters: everything it diffs against lives in the pinned maps, so it can
be killed at any moment and a new one picks up where it left off while the
attached programs keep routing. Losing the controller changes nothing either:
the tables stay as they are and scraping goes on (static stability).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, start_http_server

from dataplane import (
    apply,
    binder,
    config,
    engines,
    events,
    health,
    host,
    loader,
    metrics,
    model,
    nodeport,
    stream,
    tc,
)
from dataplane.api import channel
from dataplane.maps import MapSet
from dataplane.settings import Settings

log = logging.getLogger("kvroute.agent")

EVENT_POLL = 0.1  # seconds between fallback passes over the kernel's binding events


@dataclasses.dataclass(frozen=True)
class ControllerOptions:
    target: str                      # host:port of the controller's gRPC server
    node: str                        # this node's name (engines on it are scraped here)
    agent_id: str
    scrape_interval: float = 0.25
    report_interval: float = 1.0
    stall_window: float = health.DEFAULT_STALL_WINDOW  # dataplane.health.JudgeConfig
    tls: channel.TLSFiles | None = None


@dataclasses.dataclass(frozen=True)
class ExternalOptions:
    """The packet path (dataplane.tc): traffic from outside the node to NodePorts and
    external IPs, on these interfaces."""

    interfaces: tuple[str, ...]
    node: str  # this node's name: backends whose `node` is it are local (no SNAT)
    snat_ip: str | None = None  # None: the first IPv4 address of the first interface
    snat_ports: tuple[int, int] = (nodeport.SNAT_PORT_MIN, nodeport.SNAT_PORT_MAX)


class Agent:
    def __init__(self, settings: Settings, cgroup: Path, config_path: Path | None,
                 ready_file: Path | None = None, controller: ControllerOptions | None = None,
                 metrics_addr: tuple[str, int] | None = None,
                 external: ExternalOptions | None = None) -> None:
        if (config_path is None) == (controller is None):
            raise ValueError("give the agent a config file or a controller, not both")
        self.settings = settings
        self.cgroup = cgroup
        self.config_path = config_path
        self.ready_file = ready_file
        self.controller = controller
        self.metrics_addr = metrics_addr
        self.external = external
        self.packet_path: tc.PacketPath | None = None
        self.np: nodeport.NodePortMaps | None = None
        self._mtime: float | None = None
        self.maps: MapSet | None = None
        self.datapath: loader.Datapath | None = None
        self.applier: apply.Applier | None = None
        self.registry = CollectorRegistry()
        self.metrics = metrics.AgentMetrics(self.registry)
        self.stream: stream.SnapshotClient | None = None
        self.watcher: engines.EngineWatcher | None = None
        self.binder: binder.Binder | None = None
        self.events: events.EventReader | None = None

    def start(self) -> None:
        # Validate the desired state before touching the kernel: a bad file at
        # start changes nothing.
        desired = config.load_file(self.config_path) if self.config_path else None
        if desired is not None:
            model.check_capacity(desired, self.settings.max_services, self.settings.max_backends)
        host.check_cgroup(self.cgroup)
        started = time.perf_counter()
        self.datapath = loader.Datapath(self.settings)
        log.info("programs compiled and loaded in %.2fs", time.perf_counter() - started)
        for line in self.datapath.attach(self.cgroup):
            log.info("%s (cgroup %s)", line, self.cgroup)
        self.maps = MapSet(self.settings.pin_dir)
        # Following a controller, client and session bindings are fleet-wide: the
        # kernel announces them and leaves their expiry to the controller.
        self.applier = apply.Applier(self.maps, self.settings.hash_seed,
                                     self.settings.max_services, self.settings.max_backends,
                                     fleet=self.controller is not None)
        log.info("adopted %d services and %d backends from %s", len(self.applier.view.services),
                 len(self.applier.view.backends), self.settings.pin_dir)
        if self.external:
            self._start_packet_path(self.external)
        self.registry.register(metrics.KernelCollector(self.maps))
        if self.np is not None:
            self.registry.register(metrics.PacketPathCollector(self.maps, self.np))
        if self.metrics_addr:
            start_http_server(self.metrics_addr[1], self.metrics_addr[0], registry=self.registry)
            log.info("metrics on http://%s:%d/metrics", *self.metrics_addr)
        if desired is not None:
            self._apply(desired, f"{self.config_path}")
            self._ready()
        if self.controller:
            self._start_controller(self.controller)

    def _start_packet_path(self, ext: ExternalOptions) -> None:
        started = time.perf_counter()
        self.packet_path = tc.PacketPath(self.settings)
        log.info("packet path compiled and loaded in %.2fs", time.perf_counter() - started)
        for name in ext.interfaces:
            for line in self.packet_path.attach(tc.Interface(name)):
                log.info("attached %s", line)
        self.np = nodeport.NodePortMaps(self.settings.pin_dir)
        addresses = nodeport.node_addresses()
        snat = ext.snat_ip or next(iter(nodeport.interface_addresses(ext.interfaces[0])), None)
        self.np.set_config(snat, *ext.snat_ports)
        self.np.set_node_addresses(addresses)
        log.info("NodePorts answer on %s; flows to other nodes' backends SNAT to %s",
                 ", ".join(addresses) or "no address", snat or "nothing (left alone)")

    def _ready(self) -> None:
        if self.ready_file and not self.ready_file.exists():
            self.ready_file.write_text("ready\n")

    def _apply(self, desired: model.DesiredState, source: str) -> None:
        assert self.applier is not None
        if self.config_path:
            self._mtime = self._current_mtime()
        with self.metrics.apply_seconds.time():
            result = self.applier.apply(desired)
            if self.np is not None and self.external is not None:
                node = self.external.node
                local = {svc.identity(be) for svc in desired.services for be in svc.backends
                         if be.node == node}
                nodeport.apply(self.np, desired.services, self.applier.service_id,
                               self.applier.backend_id, local.__contains__)
        changes = ", ".join(f"{k}={v}" for k, v in sorted(result.summary.items())) or "no change"
        # Load-only updates arrive several times a second with a controller: keep
        # them out of the log unless asked (-v).
        routine = all(k.startswith(("be_load", "svc_load")) for k in result.summary)
        log.log(logging.DEBUG if routine else logging.INFO,
                "applied %s: %s (tables %.3fs, write %.3fs)", source, changes,
                result.build_seconds, result.write_seconds)

    def _start_controller(self, opts: ControllerOptions) -> None:
        assert self.applier is not None

        def on_snapshot(snap: model.Snapshot) -> bool:
            # Validated on receipt (the model's constructors): applied as it is.
            self._apply(snap.desired, f"snapshot {snap.version}")
            self.metrics.snapshot_version.set(snap.version)
            self._ready()
            return True

        def targets() -> list[model.EngineRef]:
            snap = client.applied
            return list(snap.engines) if snap is not None else []

        def on_round(seconds: float, written: int, news: bool) -> None:
            self.metrics.scrape_seconds.observe(seconds)
            self.metrics.load_writes.set(written)
            if news:  # other nodes learn of it through the controller: tell it now
                client.report_now()

        watcher = engines.EngineWatcher(self.applier, targets, opts.node, opts.scrape_interval,
                                        on_round=on_round,
                                        judge=health.JudgeConfig(stall_window=opts.stall_window))
        def on_loads(loads: dict[str, int]) -> None:
            # Engines on this node are scraped here, more recently than the controller
            # heard of them: only the others' loads are taken from the stream.
            mine = {t.identity for t in watcher.mine()}
            assert self.applier is not None
            self.applier.set_loads({i: v for i, v in loads.items() if i not in mine})

        assert self.maps is not None
        relay = binder.Binder(self.applier, self.maps)
        client = stream.SnapshotClient(
            opts.target, opts.agent_id, opts.node, on_snapshot,
            tls=opts.tls, on_loads=on_loads, on_bindings=relay.apply,
            binding_source=lambda: relay.take_report(opts.agent_id, opts.node),
            on_binding_stream=relay.resend_recent,
            report_source=watcher.observations, report_interval=opts.report_interval)
        self.binder, self.events = relay, events.EventReader(self.maps, relay.on_event)
        self.registry.register(metrics.BadPagesCollector(lambda: dict(watcher.bad_pages)))
        self.registry.register(metrics.BindingCollector(relay.counters))
        self.stream, self.watcher = client, watcher
        log.info("following controller %s as agent %s on node %s", opts.target, opts.agent_id,
                 opts.node)

    def reload(self) -> bool:
        """Apply the file again; invalid content is rejected whole and the maps keep
        their state. Returns whether it applied."""
        assert self.config_path is not None
        try:
            desired = config.load_file(self.config_path)
            self._apply(desired, str(self.config_path))
        except model.ModelError as exc:  # bad file, or more than the maps hold
            self._mtime = self._current_mtime()
            log.error("not applied, keeping the current state: %s", exc)
            return False
        return True

    def _current_mtime(self) -> float | None:
        try:
            return self.config_path.stat().st_mtime if self.config_path else None
        except OSError:
            return None

    def run(self, poll_interval: float = 1.0) -> None:
        """Run until SIGTERM or SIGINT: one asyncio loop with named tasks (the controller
        stream, this node's engine scrapes, the config file), SIGHUP reloads the file."""
        asyncio.run(self._main(poll_interval))

    async def _main(self, poll_interval: float) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        reload = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, reload.set)
        tasks = []
        if self.stream is not None:
            tasks.append(asyncio.create_task(self.stream.run(), name="controller-stream"))
        if self.watcher is not None:
            tasks.append(asyncio.create_task(self.watcher.run(), name="engine-scrapes"))
        if self.events is not None:
            tasks.append(asyncio.create_task(self._relay_events(), name="kernel-bindings"))
        if self.config_path is not None:
            tasks.append(asyncio.create_task(self._follow_file(reload, poll_interval),
                                             name="config-file"))
        stopping = asyncio.create_task(stop.wait(), name="stop-signal")
        done, _ = await asyncio.wait([stopping, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not stopping and task.exception() is not None:
                log.error("task %s failed: %r", task.get_name(), task.exception())
        if self.stream is not None:
            self.stream.close()
        for task in [stopping, *tasks]:
            task.cancel()
        await asyncio.gather(stopping, *tasks, return_exceptions=True)

    async def _relay_events(self) -> None:
        """Drain the kernel's binding events as they come (the ring's epoll fd on the
        loop) and hand them to the controller stream; a slow poll besides, in case a
        wake-up is missed (the ring only signals a reader that had caught up)."""
        assert self.events is not None and self.binder is not None
        reader, relay, client = self.events, self.binder, self.stream

        def drain() -> None:
            try:
                reader.consume()
            except Exception:  # a bad record must not stop the relay
                log.exception("reading kernel binding events failed")
            if relay.pending and client is not None:
                client.bindings_ready()

        loop = asyncio.get_running_loop()
        loop.add_reader(reader.fileno(), drain)
        try:
            while True:
                await asyncio.sleep(EVENT_POLL)
                drain()
        finally:
            loop.remove_reader(reader.fileno())

    async def _follow_file(self, reload: asyncio.Event, poll_interval: float) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(reload.wait(), poll_interval)
            if reload.is_set() or self._current_mtime() != self._mtime:
                reload.clear()
                self.reload()

    def close(self, detach: bool) -> None:
        if self.events:
            self.events.close()
        if self.np:
            self.np.close()
        if self.packet_path:
            self.packet_path.close()
            if detach and self.external:
                for name in self.external.interfaces:
                    tc.detach(tc.Interface(name))
        if self.applier:
            self.applier.close()
        if self.maps:
            self.maps.close()
        if self.datapath:
            self.datapath.close()
        if detach:
            for line in loader.uninstall(self.settings.pin_dir):
                log.info("removed %s", line)
            log.info("detached: kvroute no longer routes on this node")
        else:
            log.info("exiting; programs stay attached and keep routing from the pinned maps")
