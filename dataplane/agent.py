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
import socket
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import prometheus_client
from aiohttp import web
from prometheus_client import CollectorRegistry

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
    pins,
    probes,
    stream,
)
from dataplane.api import channel
from dataplane.maps import PINNED_MAPS, MapSet
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


class Agent:
    def __init__(self, settings: Settings, cgroup: Path, config_path: Path | None,
                 ready_file: Path | None = None, controller: ControllerOptions | None = None,
                 metrics_addr: tuple[str, int] | None = None) -> None:
        if (config_path is None) == (controller is None):
            raise ValueError("give the agent a config file or a controller, not both")
        self.settings = settings
        self.cgroup = cgroup
        self.config_path = config_path
        self.ready_file = ready_file
        self.controller = controller
        self.metrics_addr = metrics_addr
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
        self.applied = False  # the first desired state is in the kernel (readiness)
        self._http_sock: socket.socket | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}

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
        self.registry.register(metrics.KernelCollector(self.maps))
        if self.metrics_addr:
            # Bound here, so a port in use fails the start; served once the loop runs.
            self._http_sock = _bind(*self.metrics_addr)
        if desired is not None:
            self._apply(desired, f"{self.config_path}")
            self._ready()
        if self.controller:
            self._start_controller(self.controller)

    def _ready(self) -> None:
        self.applied = True
        if self.ready_file and not self.ready_file.exists():
            self.ready_file.write_text("ready\n")

    def _apply(self, desired: model.DesiredState, source: str) -> None:
        assert self.applier is not None
        if self.config_path:
            self._mtime = self._current_mtime()
        with self.metrics.apply_seconds.time():
            result = self.applier.apply(desired)
        if result.cleanup_error:
            log.warning("applied %s, but removing what the kernel kept of removed services "
                        "and backends failed (retried on the next apply): %s", source,
                        result.cleanup_error)
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
            try:
                self._apply(snap.desired, f"snapshot {snap.version}")
            except (model.ModelError, apply.ApplyError) as exc:
                # The maps keep the state applied before; the stream retries this one.
                log.error("snapshot %d not applied, keeping the current state: %s",
                          snap.version, exc)
                return False
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
            try:
                self.applier.set_loads({i: v for i, v in loads.items() if i not in mine})
            except apply.ApplyError as exc:  # the controller's next loads carry them again
                log.error("could not write engine loads: %s", exc)

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
        except apply.ApplyError as exc:
            # The file is fine, the kernel refused a write: try again at the next poll.
            self._mtime = None
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
        work: dict[str, Coroutine[Any, Any, None]] = {}
        if self.stream is not None:
            work["controller-stream"] = self.stream.run()
        if self.watcher is not None:
            work["engine-scrapes"] = self.watcher.run()
        if self.events is not None:
            work["kernel-bindings"] = self._relay_events()
        if self.config_path is not None:
            work["config-file"] = self._follow_file(reload, poll_interval)
        self._tasks = {name: asyncio.create_task(coro, name=name) for name, coro in work.items()}
        tasks = list(self._tasks.values())
        stopping = asyncio.create_task(stop.wait(), name="stop-signal")
        runner = None
        try:
            if self._http_sock is not None:
                runner = await self._serve_http()
            done, _ = await asyncio.wait([stopping, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stopping and task.exception() is not None:
                    log.error("task %s failed: %r", task.get_name(), task.exception())
        finally:
            if runner is not None:
                await runner.cleanup()
            if self.stream is not None:
                self.stream.close()
            for task in [stopping, *tasks]:
                task.cancel()
            await asyncio.gather(stopping, *tasks, return_exceptions=True)

    # -- HTTP: /metrics, /readyz, /livez ------------------------------------------------------

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics_page)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/livez", self._livez)
        return app

    async def _serve_http(self) -> web.AppRunner:
        assert self._http_sock is not None
        runner = web.AppRunner(self._app(), handle_signals=False, access_log=None)
        await runner.setup()
        await web.SockSite(runner, self._http_sock).start()
        host, port = self._http_sock.getsockname()[:2]
        log.info("HTTP on %s:%d (/metrics /readyz /livez)", host, port)
        return runner

    def facts(self) -> probes.Facts:
        """What readiness is judged on, read from the pin dir now: a pin removed under a
        running agent (``kvroute uninstall``) makes it unready."""
        def names(folder: Path) -> frozenset[str]:
            try:
                return frozenset(p.name for p in folder.iterdir())
            except OSError:
                return frozenset()
        pin_dir = self.settings.pin_dir
        return probes.Facts(links=names(pin_dir / pins.LINKS_DIR), maps=names(pin_dir),
                            applied=self.applied)

    def readiness(self) -> probes.Verdict:
        return probes.readiness(self.facts(), [p.name for p in loader.PROGRAMS], PINNED_MAPS)

    def liveness(self) -> probes.Verdict:
        return probes.liveness({name: not t.done() for name, t in self._tasks.items()})

    async def _metrics_page(self, request: web.Request) -> web.Response:
        # The kernel collector walks every map: off the loop, so scrapes and applies
        # never wait for a Prometheus scrape of a large node.
        body = await asyncio.to_thread(prometheus_client.generate_latest, self.registry)
        return web.Response(body=body,
                            headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST})

    @staticmethod
    def _verdict(verdict: probes.Verdict) -> web.Response:
        return web.Response(status=200 if verdict.ok else 503, text=verdict.text())

    async def _readyz(self, request: web.Request) -> web.Response:
        return self._verdict(self.readiness())

    async def _livez(self, request: web.Request) -> web.Response:
        return self._verdict(self.liveness())

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
        if self._http_sock is not None:
            self._http_sock.close()
        if self.events:
            self.events.close()
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


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"--metrics {host}:{port}: {exc.strerror}") from None
    return sock
