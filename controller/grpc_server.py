"""The controller's gRPC edge: streams snapshots to agents, collects their reports.

:class:`Publisher` holds the current snapshot and a short history; the controller calls
:meth:`Publisher.publish` (from any thread) whenever policy or discovery changes the
desired state. :class:`ControlServer` serves ``kvroute.v1.Control`` on grpc.aio:

- ``WatchSnapshots``: the agent says what it holds (version and content hash). Same
  content → an empty delta to the current version (renumbers it if needed); a version
  still in the history with the same hash → a delta from it; anything else → a full
  snapshot. After that, each time
  the published snapshot changes, one delta from the last snapshot *sent on this stream*,
  so a slow agent skips intermediate versions instead of queueing them.
- ``Report``: a client stream of :class:`controller.agent_reports.AgentReport`; a report with a
  bad field is dropped whole (the agent's previous report stays) and counted.
- ``ReportBindings``: a client stream of the session bindings an agent's kernel made and
  used (:class:`dataplane.bindings.Report`), fed to the fleet's
  :class:`controller.bindings.BindingTable`. What the table decided goes to every watch
  stream as ``SessionBindings`` messages: a report's winning bindings at once (at most
  one message per ``flush`` seconds), session counts and expiries every
  ``SESSIONS_INTERVAL``; a stream that just opened gets the whole table after its
  first snapshot, and so does one that fell behind the log of recent messages.

:meth:`ControlServer.agents` gives per-agent convergence: the version and hash applied,
whether that is the current content, and for how long the agent has been behind.

TLS: :class:`channel.TLSFiles` names PEM files; the server then requires client certificates
signed by the same CA (mutual TLS), the client checks the server's. With TLS every RPC is
authorized by :mod:`controller.authz`: the certificate's node (:mod:`dataplane.api.identity`)
must be the node the message speaks for (else PERMISSION_DENIED, counted in
:attr:`ControlServer.refused`), and a report's scrapes and counters of other nodes' engines
are dropped (counted in :attr:`ControlServer.report_entries_dropped`). Without TLS the
server listens on loopback only (:func:`listen_refused`) and trusts its peers as before.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import ipaddress
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping

import grpc
import grpc.aio

from controller import authz
from controller import bindings as fleet_bindings
from dataplane import model, scraper
from dataplane import reports as agent_reports
from dataplane.api import channel, convert, identity
from dataplane.api.pb import kvroute_pb2 as pb
from dataplane.api.pb import kvroute_pb2_grpc as pb_grpc

log = logging.getLogger("kvroute.controller.grpc")

# How often decided bindings go out. A binding made on one node reaches the others within
# the agent's batching, this, and one round trip: ~50 ms in all.
DEFAULT_BINDING_FLUSH = 0.02
# Fan-out messages kept for streams that are a little behind (~20 s at full rate); a
# stream further behind gets the whole table again.
BINDING_LOG = 1024
# Expiry runs this often: it touches every service with bindings.
EXPIRE_INTERVAL = 1.0
# Session counts go out this often: they steer placement, and a node counts its own new
# sessions at once, so 100 ms of staleness costs little; sent with every flush they were
# most of the fan-out's bytes (64 engines: 42 KB/s an agent at 400 new sessions/s).
SESSIONS_INTERVAL = 0.1
# Agents the controller remembers. An agent with no open watch stream and no report for
# AGENT_TTL seconds is forgotten (its node left, or it never was an agent); a new agent id
# beyond MAX_AGENTS is refused (RESOURCE_EXHAUSTED), so made-up ids cannot grow memory and
# /metrics without bound. Agents report every few seconds and watch all the time.
DEFAULT_AGENT_TTL = 300.0
DEFAULT_MAX_AGENTS = 4096

# -- listening --------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach: 127.0.0.0/8, ::1, "localhost"."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve to anything


def listen_refused(address: str, tls: bool, insecure: bool) -> str | None:
    """Why the controller must not listen on ``address`` ("host:port"), or None.

    Plaintext means anyone who reaches the port can report loads, breaker evidence and
    session bindings, and read the whole topology; so without TLS only loopback is
    allowed, unless the operator explicitly asks (``insecure``)."""
    if tls or insecure:
        return None
    host = address.rpartition(":")[0]
    if is_loopback(host):
        return None
    return (f"refusing to listen on {address} in plaintext: anyone who can reach it could "
            "change routing. Give --tls-ca/--tls-cert/--tls-key (mutual TLS), listen on "
            "loopback, or pass --insecure-listen to accept the risk")


# -- publisher ----------------------------------------------------------------------------


class Publisher:
    """The current snapshot, the last ``history`` ones (for deltas to reconnecting agents)
    and when each version was published (for lag). Thread-safe."""

    def __init__(self, history: int = 32, clock: Callable[[], float] = time.monotonic) -> None:
        if history < 1:
            raise ValueError(f"history must be >= 1, got {history}")
        self._lock = threading.Lock()
        self._clock = clock
        self._history: collections.OrderedDict[int, model.Snapshot] = (
            collections.OrderedDict())
        self._size = history
        # Longer than the snapshot history: lag needs only the times.
        self._published_at: collections.OrderedDict[int, float] = collections.OrderedDict()
        self._current: model.Snapshot | None = None
        self._listeners: list[Callable[[], None]] = []
        # Engine loads travel apart from snapshots. Identity -> (load, sequence number of
        # its last change), kept in change order so a stream finds what changed since it
        # last sent in O(changes).
        self._loads: collections.OrderedDict[str, tuple[int, int]] = collections.OrderedDict()
        self._load_seq = 0

    @property
    def current(self) -> model.Snapshot | None:
        return self._current

    def publish(self, snap: model.Snapshot) -> bool:
        """Make ``snap`` current. Returns False (and keeps the current version) when the
        content is unchanged, so a controller may publish on every tick without sending
        empty deltas. Raises ValueError if the version does not increase."""
        if not isinstance(snap, model.Snapshot):
            raise TypeError(f"publish needs a Snapshot, got {type(snap).__name__}")
        with self._lock:
            current = self._current
            if current is not None:
                if snap.hash == current.hash:
                    return False
                if snap.version <= current.version:
                    raise ValueError(f"version must increase: {snap.version} after "
                                     f"{current.version}")
            self._current = snap
            self._history[snap.version] = snap
            while len(self._history) > self._size:
                self._history.popitem(last=False)
            self._published_at[snap.version] = self._clock()
            while len(self._published_at) > 64 * self._size:
                self._published_at.popitem(last=False)
            listeners = list(self._listeners)
        for notify in listeners:
            notify()
        return True

    def publish_loads(self, loads: Mapping[str, int]) -> int:
        """Record engine loads (identity -> units) of engines in the current snapshot and
        wake the streams if any moved. Returns how many changed."""
        current = self._current
        if current is None:
            return 0
        changed = 0
        with self._lock:
            for ident, load in loads.items():
                if current.engine(ident) is None:
                    continue  # not an engine of this fleet: nobody may set its load
                old = self._loads.get(ident)
                if old is not None and old[0] == load:
                    continue
                self._load_seq += 1
                self._loads[ident] = (load, self._load_seq)
                self._loads.move_to_end(ident)
                changed += 1
            # Engines that left the fleet leave the table (bounded by the fleet's size).
            for ident in [i for i in self._loads if current.engine(i) is None]:
                del self._loads[ident]
            listeners = list(self._listeners) if changed else []
        for notify in listeners:
            notify()
        return changed

    @property
    def load_seq(self) -> int:
        return self._load_seq

    def loads_since(self, seq: int) -> tuple[dict[str, int], int]:
        """Loads that changed after ``seq`` (all of them for 0), and the current seq."""
        with self._lock:
            out: dict[str, int] = {}
            for ident in reversed(self._loads):
                load, at = self._loads[ident]
                if at <= seq:
                    break
                out[ident] = load
            return out, self._load_seq

    def get(self, version: int) -> model.Snapshot | None:
        with self._lock:
            return self._history.get(version)

    def published_at(self, version: int) -> float | None:
        with self._lock:
            return self._published_at.get(version)

    def behind_since(self, applied_version: int) -> float | None:
        """When the first version newer than ``applied_version`` was published (the
        current one's time if none is, e.g. a number from an earlier controller)."""
        with self._lock:
            if self._current is None:
                return None
            newer = [t for v, t in self._published_at.items() if v > applied_version]
            return min(newer) if newer else self._published_at.get(self._current.version)

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` after each publish (in the publishing thread)."""
        with self._lock:
            self._listeners.append(listener)

    def unsubscribe(self, listener: Callable[[], None]) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)


# -- agents -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AgentStatus:
    agent_id: str
    node: str
    peer: str  # address of the last connection
    watching: bool  # a WatchSnapshots stream is open now
    sent_version: int | None  # last version sent on a watch stream
    applied_version: int  # last version the agent reported applied (0: none)
    applied_hash: str
    converged: bool  # the applied content is the current content
    lag_seconds: float  # how long it has been behind (0 when converged)
    last_report_at: float | None  # wall-clock time.time() of the last accepted report
    apply_seconds: float
    reports: int  # accepted
    rejected_reports: int
    last_error: str | None  # why the last report was rejected
    errors: tuple[str, ...]  # what the agent itself reported
    engines: tuple[scraper.ScrapeResult, ...]
    counters: tuple[agent_reports.BackendCounters, ...]


@dataclasses.dataclass
class _Agent:
    agent_id: str
    node: str = ""
    peer: str = ""
    first_seen: float = 0.0  # monotonic
    last_seen: float = 0.0  # monotonic: last stream opened or report received
    watching: int = 0
    sent_version: int | None = None
    report: agent_reports.AgentReport | None = None
    last_report_at: float | None = None
    reports: int = 0
    rejected: int = 0
    last_error: str | None = None


class ControlServer:
    """grpc.aio server of ``kvroute.v1.Control``. Run its methods on one event loop;
    :meth:`agents` may be called from any thread."""

    def __init__(
        self,
        publisher: Publisher,
        *,
        tls: channel.TLSFiles | None = None,
        on_report: Callable[[agent_reports.AgentReport], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        bindings: fleet_bindings.BindingTable | None = None,
        flush: float = DEFAULT_BINDING_FLUSH,
        insecure_listen: bool = False,
        agent_ttl: float = DEFAULT_AGENT_TTL,
        max_agents: int = DEFAULT_MAX_AGENTS,
        on_forget: Callable[[list[str]], None] | None = None,
    ) -> None:
        if not flush > 0:
            raise ValueError(f"flush must be > 0, got {flush!r}")
        if not agent_ttl > 0 or max_agents < 1:
            raise ValueError(f"need agent_ttl > 0 and max_agents >= 1, got {agent_ttl!r}, "
                             f"{max_agents!r}")
        self.agent_ttl = float(agent_ttl)
        self.max_agents = int(max_agents)
        # Called (on the server's loop) with the ids of expired agents, so state kept per
        # agent elsewhere (the reconciler's last scrape and counters) goes with them.
        self.on_forget = on_forget
        self.agents_expired = 0
        self.publisher = publisher
        # Touched only on the server's loop (handlers and the flusher), so it needs no lock.
        self.bindings = bindings or fleet_bindings.BindingTable()
        self.flush = float(flush)
        self._binding_log: collections.deque[tuple[int, pb.SnapshotUpdate]] = (
            collections.deque(maxlen=BINDING_LOG))
        self._binding_seq = 0
        self._binding_snapshot: model.Snapshot | None = None
        self._dump: tuple[int, list[pb.SnapshotUpdate]] | None = None
        self._flush_pending = False
        self._last_flush = float("-inf")
        self._flusher: asyncio.Task[None] | None = None
        self.binding_reports = 0
        self.binding_reports_rejected = 0
        self.tls = tls
        self.insecure_listen = insecure_listen
        # Which engine an identity is, and on which node (authz); the controller points
        # it at its reconciler, which knows the engines even before anything is published.
        self.engine_ref: authz.EngineLookup = self._published_engine
        self.refused: collections.Counter[tuple[str, str]] = collections.Counter()  # (rpc, why)
        self.report_entries_dropped = 0  # scrapes/counters of engines not the peer's
        self.on_report = on_report
        self._clock = clock
        self._wall = wall_clock
        self._lock = threading.Lock()
        self._agents: dict[str, _Agent] = {}
        self._server: grpc.aio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeups: set[asyncio.Event] = set()
        self._stopping = False
        self.port: int | None = None

    # -- lifecycle

    async def start(self, address: str = "127.0.0.1:0") -> int:
        """Listen on ``address`` ("host:port", port 0 picks one); returns the port."""
        if self._server is not None:
            raise RuntimeError("server already started")
        refused = listen_refused(address, self.tls is not None, self.insecure_listen)
        if refused is not None:
            raise PermissionError(refused)
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        server = grpc.aio.server(options=channel.SERVER_OPTIONS)
        pb_grpc.add_ControlServicer_to_server(_Servicer(self), server)
        if self.tls is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, channel.server_credentials(self.tls))
        if port == 0:
            raise OSError(f"cannot listen on {address}")
        self.publisher.subscribe(self._wake_all)
        await server.start()
        self._server = server
        self._flusher = asyncio.create_task(self._flush_bindings(), name="binding-flush")
        self.port = port
        log.info("control server listening on %s (port %d, %s)", address, port,
                 "mTLS" if self.tls else "plaintext")
        return port

    async def stop(self, grace: float = 0.5) -> None:
        """End every watch stream (agents see a clean end and reconnect), then stop."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping = True
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        self.publisher.unsubscribe(self._wake_all)
        for event in list(self._wakeups):
            event.set()
        await server.stop(grace)
        with self._lock:
            now = self._clock()
            for agent in self._agents.values():
                if agent.watching:  # its stream ended now: the TTL runs from here
                    agent.last_seen = now
                agent.watching = 0

    def publish(self, snap: model.Snapshot) -> bool:
        """Shorthand for ``self.publisher.publish(snap)``."""
        return self.publisher.publish(snap)

    def _wake_all(self) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        for event in list(self._wakeups):
            loop.call_soon_threadsafe(event.set)

    # -- convergence

    def agents(self) -> dict[str, AgentStatus]:
        current = self.publisher.current
        now = self._clock()
        out = {}
        with self._lock:
            records = list(self._agents.values())
        for a in records:
            r = a.report
            applied_version = r.applied_version if r else 0
            applied_hash = r.applied_hash if r else ""
            converged = current is not None and applied_hash == current.hash
            lag = 0.0
            if current is not None and not converged:
                since = self.publisher.behind_since(applied_version)
                start = max(since if since is not None else now, a.first_seen)
                lag = max(0.0, now - start)
            out[a.agent_id] = AgentStatus(
                agent_id=a.agent_id, node=a.node, peer=a.peer, watching=a.watching > 0,
                sent_version=a.sent_version, applied_version=applied_version,
                applied_hash=applied_hash, converged=converged, lag_seconds=lag,
                last_report_at=a.last_report_at, apply_seconds=r.apply_seconds if r else 0.0,
                reports=a.reports, rejected_reports=a.rejected, last_error=a.last_error,
                errors=r.errors if r else (), engines=r.engines if r else (),
                counters=r.counters if r else (),
            )
        return out

    async def wait_converged(self, agent_ids: Iterable[str], timeout: float,
                             poll: float = 0.02) -> bool:
        """True once every named agent reports the current content (for tests, demos)."""
        wanted = list(agent_ids)
        deadline = self._clock() + timeout
        while True:
            status = self.agents()
            if self.publisher.current is not None and all(
                a in status and status[a].converged for a in wanted
            ):
                return True
            if self._clock() >= deadline:
                return False
            await asyncio.sleep(poll)

    # -- authorization

    def _published_engine(self, ident: str) -> model.EngineRef | None:
        current = self.publisher.current
        return current.engine(ident) if current is not None else None

    def _peer(self, context: grpc.aio.ServicerContext) -> authz.Peer:
        if self.tls is None:
            return authz.PLAINTEXT
        uris = context.auth_context().get("peer_uri", [])
        return authz.Peer(True, identity.node_of(u.decode("utf-8", "replace") for u in uris))

    async def _authorize(self, rpc: str, peer: authz.Peer, agent_id: str, node: str,
                         context: grpc.aio.ServicerContext) -> None:
        """Abort the call (PERMISSION_DENIED, counted) unless ``peer`` may speak as
        ``agent_id`` on ``node``; an agent id already held by another node is refused too."""
        why = authz.claim_refused(peer, agent_id, node)
        if why is None and peer.authenticated:
            with self._lock:
                held = self._agents.get(agent_id)
                if held is not None and held.node and held.node != node:
                    why = f"agent_id {agent_id[:64]!r} belongs to node {held.node!r}"
        if why is None:
            return
        self.refused[(rpc, "identity")] += 1
        log.warning("%s from %s refused: %s", rpc, context.peer(), why)
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, why)

    # -- handlers (called by _Servicer)

    def _agent(self, agent_id: str, node: str, peer: str) -> _Agent | None:
        """The agent's record, made if new; None when it is new and the table is full
        even after forgetting the stale ones."""
        now = self._clock()
        agent = self._agents.get(agent_id)
        if agent is None and len(self._agents) >= self.max_agents:
            self.expire_agents()
        with self._lock:
            agent = self._agents.get(agent_id)
            if agent is None:
                if len(self._agents) >= self.max_agents:
                    return None
                agent = self._agents[agent_id] = _Agent(agent_id, first_seen=now)
            if node:
                agent.node = node
            agent.peer = peer
            agent.last_seen = now
            return agent

    async def _known_agent(self, rpc: str, agent_id: str, node: str,
                           context: grpc.aio.ServicerContext) -> _Agent:
        agent = self._agent(agent_id, node, context.peer())
        if agent is None:
            self.refused[(rpc, "agents_full")] += 1
            log.warning("%s from %s refused: %d agents known already", rpc, context.peer(),
                        self.max_agents)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"the controller knows {self.max_agents} agents already")
        assert agent is not None  # abort raises
        return agent

    def expire_agents(self) -> list[str]:
        """Forget agents with no open watch stream and nothing heard for ``agent_ttl``
        seconds; returns their ids (on the server's loop: see :attr:`on_forget`)."""
        cutoff = self._clock() - self.agent_ttl
        with self._lock:
            gone = [i for i, a in self._agents.items()
                    if a.watching == 0 and a.last_seen < cutoff]
            for agent_id in gone:
                del self._agents[agent_id]
        if gone:
            self.agents_expired += len(gone)
            log.info("forgot %d agents silent for %.0f s", len(gone), self.agent_ttl)
            if self.on_forget is not None:
                try:
                    self.on_forget(gone)
                except Exception:
                    log.exception("on_forget failed")
        return gone

    def _first_update(self, request: pb.WatchRequest,
                      current: model.Snapshot) -> pb.SnapshotUpdate:
        have_version, have_hash = request.have_version, request.have_hash
        if have_version == 0:
            return convert.full_update(current)
        if have_hash == current.hash:
            # The agent holds this content, maybe under another number (from before a
            # controller restart): an empty delta renumbers it, nothing to rebuild. Sent
            # even when the numbers agree, so the first message always confirms the state.
            return convert.delta_update(model.Delta(have_version, current.version,
                                                       current.hash))
        base = self.publisher.get(have_version)
        if base is not None and base.hash == have_hash:
            return convert.delta_update(model.delta(base, current))
        return convert.full_update(current)

    async def _watch(self, request: pb.WatchRequest,
                     context: grpc.aio.ServicerContext) -> AsyncIterator[pb.SnapshotUpdate]:
        try:
            agent_reports.AgentReport(request.agent_id, request.node, 0, "")  # validates ids
        except model.ModelError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        await self._authorize("WatchSnapshots", self._peer(context), request.agent_id,
                              request.node, context)
        agent = await self._known_agent("WatchSnapshots", request.agent_id, request.node, context)
        with self._lock:
            agent.watching += 1
        event = asyncio.Event()
        self._wakeups.add(event)
        sent: model.Snapshot | None = None
        loads_seq = 0
        binding_seq: int | None = None  # None: the whole table is still to send
        try:
            while not self._stopping:
                event.clear()
                current = self.publisher.current
                if current is not None and (sent is None or current.version != sent.version):
                    if sent is None:
                        update = self._first_update(request, current)
                    else:
                        update = convert.delta_update(model.delta(sent, current))
                    sent = current
                    yield update
                    with self._lock:
                        agent.sent_version = current.version
                    continue
                if sent is not None and self.publisher.load_seq > loads_seq:
                    loads, loads_seq = self.publisher.loads_since(loads_seq)
                    if loads:
                        yield convert.loads_update(loads)
                    continue
                if sent is not None and binding_seq != self._binding_seq:
                    updates, binding_seq = self._bindings_since(binding_seq)
                    for update in updates:
                        yield update
                    continue
                await event.wait()
        finally:
            self._wakeups.discard(event)
            with self._lock:
                agent.watching = max(0, agent.watching - 1)
                agent.last_seen = self._clock()  # the TTL runs from the stream's end

    async def _report(self, requests: AsyncIterator[pb.AgentReport],
                      context: grpc.aio.ServicerContext) -> pb.ReportAck:
        accepted = 0
        peer = self._peer(context)
        async for msg in requests:
            await self._authorize("Report", peer, msg.agent_id, msg.node, context)
            try:
                report = convert.report_from_pb(msg)
            except model.ModelError as exc:
                log.warning("report from %r rejected: %s", msg.agent_id, exc)
                bad = (self._agent(msg.agent_id, "", context.peer())
                       if msg.agent_id and len(msg.agent_id) <= model.IDENTITY_MAX else None)
                if bad is not None:
                    with self._lock:
                        bad.rejected += 1
                        bad.last_error = str(exc)
                continue
            report, dropped = authz.scoped_report(peer, report, self.engine_ref)
            if dropped:
                self.report_entries_dropped += dropped
                log.warning("report from %s: %d scrapes/counters of engines not on node %r "
                            "dropped", report.agent_id, dropped, peer.node)
            agent = await self._known_agent("Report", report.agent_id, report.node, context)
            self.publisher.publish_loads({r.identity: r.load.units for r in report.engines
                                          if r.ok and r.load is not None})
            with self._lock:
                agent.report = report
                agent.reports += 1
                agent.last_report_at = self._wall()
            accepted += 1
            if self.on_report is not None:
                try:
                    self.on_report(report)
                except Exception:
                    log.exception("on_report failed for %s", report.agent_id)
        return pb.ReportAck(reports=accepted)


    # -- session bindings (on the server's loop)

    def _bindings_since(self, seq: int | None) -> tuple[list[pb.SnapshotUpdate], int]:
        """Fan-out messages after ``seq``, or the whole table when ``seq`` is None or
        older than the log; and the sequence number they bring the stream to.

        The whole table is built once and kept with the sequence number it was taken at:
        a stream that opens later gets it plus the log since then, so a hundred agents
        coming back together cost one dump, not a hundred."""
        log_ = self._binding_log
        if seq is not None and (not log_ or log_[0][0] <= seq + 1):
            return self._log_after(seq), self._binding_seq
        cached = self._dump
        if cached is None or (log_ and log_[0][0] > cached[0] + 1) or (
                not log_ and cached[0] != self._binding_seq):
            self._sync_snapshot()
            cached = self._dump = (self._binding_seq, [
                convert.fanout_update(out) for out in self.bindings.dump()])
        at, dump = cached
        return [*dump, *self._log_after(at)], self._binding_seq

    def _log_after(self, seq: int) -> list[pb.SnapshotUpdate]:
        """Log messages after ``seq``, walked from the newest end: a stream that keeps up
        needs the last one or two, and every flush wakes every stream."""
        out = []
        for s, update in reversed(self._binding_log):
            if s <= seq:
                break
            out.append(update)
        out.reverse()
        return out

    def _sync_snapshot(self) -> None:
        current = self.publisher.current
        if current is not None and current is not self._binding_snapshot:
            self.bindings.set_snapshot(current)
            self._binding_snapshot = current

    def flush_bindings(self, now: float, expire: bool = False, sessions: bool = True) -> bool:
        """Send what the binding table decided since the last flush; True if anything."""
        self._sync_snapshot()
        if expire:
            self.bindings.expire(now)
        out = self.bindings.take(sessions)
        if not out:
            return False
        self._last_flush = now
        self._binding_seq += 1
        self._binding_log.append((self._binding_seq, convert.fanout_update(out)))
        for event in list(self._wakeups):
            event.set()
        return True

    def _flush_soon(self) -> None:
        """Fan a report's decisions out at once when the last flush is ``flush`` seconds
        old, else at that moment: immediate at low rates, at most one message per
        ``flush`` at high ones."""
        if self._flush_pending or self._loop is None:
            return
        self._flush_pending = True
        delay = max(0.0, self._last_flush + self.flush - self._clock())

        def run() -> None:
            self._flush_pending = False
            try:
                self.flush_bindings(self._clock(), sessions=False)  # counts: every 100 ms
            except Exception:
                log.exception("binding flush failed")

        self._loop.call_later(delay, run)

    async def _flush_bindings(self) -> None:
        # Bindings go out from _flush_soon; this loop sends session counts and expires.
        next_expiry = self._clock()
        while True:
            await asyncio.sleep(SESSIONS_INTERVAL)
            now = self._clock()
            expire = now >= next_expiry
            if expire:
                next_expiry = now + EXPIRE_INTERVAL
                try:
                    self.expire_agents()
                except Exception:
                    log.exception("agent expiry failed")
            try:
                self.flush_bindings(now, expire)
            except Exception:  # a bug here must not end binding fan-out for good
                log.exception("binding flush failed")

    async def _report_bindings(self, requests: AsyncIterator[pb.BindingReport],
                               context: grpc.aio.ServicerContext) -> pb.ReportAck:
        accepted = 0
        peer = self._peer(context)
        async for msg in requests:
            await self._authorize("ReportBindings", peer, msg.agent_id, msg.node, context)
            try:
                report = convert.binding_report_from_pb(msg)
            except model.ModelError as exc:
                self.binding_reports_rejected += 1
                log.warning("binding report from %r rejected: %s", msg.agent_id[:64], exc)
                continue
            self._sync_snapshot()
            self.bindings.report(report, self._clock())
            self.binding_reports += 1
            accepted += 1
            self._flush_soon()
        return pb.ReportAck(reports=accepted)


class _Servicer(pb_grpc.ControlServicer):
    """Method names are fixed by the proto. WatchSnapshots must itself be an async
    generator function: grpc.aio treats any other callable as a sync generator."""

    def __init__(self, owner: ControlServer) -> None:
        self._owner = owner

    async def WatchSnapshots(
        self, request: pb.WatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.SnapshotUpdate]:
        async for update in self._owner._watch(request, context):
            yield update

    async def Report(
        self, request_iterator: AsyncIterator[pb.AgentReport], context: grpc.aio.ServicerContext
    ) -> pb.ReportAck:
        return await self._owner._report(request_iterator, context)

    async def ReportBindings(
        self, request_iterator: AsyncIterator[pb.BindingReport],
        context: grpc.aio.ServicerContext
    ) -> pb.ReportAck:
        return await self._owner._report_bindings(request_iterator, context)
