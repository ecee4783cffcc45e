"""The agent's end of the controller stream (kvroute.v1 Control), in its own thread.

:class:`SnapshotClient` watches snapshots, rebuilds each version from full snapshots and
deltas, and hands every new version to ``on_snapshot`` (which programs the kernel and
returns whether that worked). Alongside it streams reports: the applied version, plus what
``report_source`` returns (engine scrapes, kernel counters), every ``report_interval``
seconds and right after each apply, so the controller sees convergence at once.

Failure handling:

- A delta that does not fit (wrong base version, wrong resulting hash) is never applied:
  the client reconnects asking for a full snapshot (``have_version=0``).
- A failed apply keeps the previous tables; the client retries on the report interval and
  on the next version, and reports the error.
- Controller gone: the kernel keeps the last applied tables (static stability) and the
  client reconnects with exponential backoff and full jitter. On reconnection it says what
  it holds, so an unchanged controller answers with nothing or a small delta.

Engine loads arrive apart from snapshots (``EngineLoads``) and go to ``on_loads``
(identity -> load units), which writes them into the kernel without a plan.

Fleet-wide session bindings (:mod:`dataplane.bindings`) travel both ways on streams of
their own: ``binding_source`` is drained into ``ReportBindings`` whenever
:meth:`SnapshotClient.bindings_ready` says it has rows, and the controller's
``SessionBindings`` go to ``on_bindings``.

``on_snapshot``, ``on_loads`` and ``report_source`` run on the client's thread, one call at
a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import grpc.aio

from dataplane import bindings, model, reports
from dataplane.api import channel, convert
from dataplane.api.pb import kvroute_pb2 as pb
from dataplane.api.pb import kvroute_pb2_grpc as pb_grpc

log = logging.getLogger("kvroute.agent.stream")

OnSnapshot = Callable[[model.Snapshot], bool]
ReportSource = Callable[[], reports.Observations]
OnLoads = Callable[[dict[str, int]], None]
OnBindings = Callable[[bindings.Fanout], None]
BindingSource = Callable[[], bindings.Report | None]


@dataclasses.dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter: attempt k waits uniform(0, min(cap, base*2^k)),
    so agents that lost the same controller do not all come back in the same instant.

    The cap bounds how long a node runs on stale state after the controller returns (a
    10 s cap measured 15 s to reconverge, 1 s up to 2.3 s: the wait, then a snapshot
    round and a report); at 0.5 s, a fleet of 1,000 agents retrying a dead controller
    costs it ~2,000 refused connects per second, which is nothing."""

    base: float = 0.2
    cap: float = 0.5

    def delay(self, attempt: int, rng: random.Random) -> float:
        return rng.uniform(0.0, min(self.cap, self.base * 2.0 ** min(attempt, 32)))


@dataclasses.dataclass
class Stats:
    connects: int = 0  # sessions that received at least one update
    disconnects: int = 0
    resyncs: int = 0  # deltas refused (asked for a full snapshot instead)
    fulls: int = 0
    deltas: int = 0
    applies: int = 0  # successful on_snapshot calls
    loads: int = 0  # engine-load messages handed to on_loads
    apply_failures: int = 0
    reports: int = 0  # reports handed to gRPC
    bindings: int = 0  # session-binding messages handed to on_bindings
    binding_reports: int = 0  # binding reports handed to gRPC
    last_error: str | None = None


class _Resync(Exception):
    """The held snapshot and the stream disagree: reconnect for a full snapshot."""


class SnapshotClient:
    def __init__(
        self,
        target: str,
        agent_id: str,
        node: str,
        on_snapshot: OnSnapshot,
        *,
        tls: channel.TLSFiles | None = None,
        report_source: ReportSource | None = None,
        on_loads: OnLoads | None = None,
        on_bindings: OnBindings | None = None,
        binding_source: BindingSource | None = None,
        on_binding_stream: Callable[[], None] | None = None,
        report_interval: float = 1.0,
        backoff: Backoff | None = None,
        rng: random.Random | None = None,
    ) -> None:
        reports.AgentReport(agent_id, node, 0, "")  # validates the ids early
        if not report_interval > 0:
            raise ValueError(f"report_interval must be > 0, got {report_interval!r}")
        self.target = target
        self.agent_id = agent_id
        self.node = node
        self.tls = tls
        self._on_snapshot = on_snapshot
        self._report_source = report_source
        self._on_loads = on_loads
        self._on_bindings = on_bindings
        self._binding_source = binding_source
        self._on_binding_stream = on_binding_stream
        self.report_interval = float(report_interval)
        self.backoff = backoff or Backoff()
        self._rng = rng or random.Random()
        self.stats = Stats()
        # _received: the controller's state as rebuilt from the stream;
        # _applied: what on_snapshot accepted, i.e. what the kernel holds.
        self._received: model.Snapshot | None = None
        self._applied: model.Snapshot | None = None
        self._apply_seconds = 0.0
        self._apply_error: str | None = None
        self._want_full = False
        self.connected = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._report_now: asyncio.Event | None = None
        self._bindings_now: asyncio.Event | None = None
        self._binding_generation = 0  # which ReportBindings call may take rows
        self._report_generation = 0  # which Report call may send

    # -- public, any thread

    @property
    def applied(self) -> model.Snapshot | None:
        """The last snapshot applied (kept while the controller is away)."""
        return self._applied

    @property
    def received(self) -> model.Snapshot | None:
        return self._received

    async def run(self) -> None:
        """Follow the controller on the running loop until :meth:`close` or cancellation
        (the agent's way: one loop, named tasks). :meth:`start` runs the same in a
        thread of its own, for callers without a loop."""
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._report_now = asyncio.Event()
        self._bindings_now = asyncio.Event()
        await self._run()

    def close(self) -> None:
        """Ask :meth:`run` to end (from the loop's own thread)."""
        if self._stop is not None:
            self._stop.set()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("client already started")
        ready = threading.Event()
        self._thread = threading.Thread(target=self._thread_main, args=(ready,),
                                        name=f"kvroute-stream-{self.agent_id}", daemon=True)
        self._thread.start()
        ready.wait()

    def stop(self, timeout: float = 5.0) -> None:
        """Close the streams and end the thread. The applied snapshot stays readable."""
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None or loop is None or stop is None:
            return
        with contextlib.suppress(RuntimeError):  # loop already closed
            loop.call_soon_threadsafe(stop.set)
        thread.join(timeout)
        if thread.is_alive():
            raise TimeoutError(f"stream thread did not stop within {timeout}s")
        self._thread = None

    def report_now(self) -> None:
        """Send a report without waiting for the interval (e.g. an engine's load
        changed): the controller hears of it within one round trip."""
        loop, event = self._loop, self._report_now
        if loop is not None and event is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(event.set)

    def bindings_ready(self) -> None:
        """The binding source has rows: send them now (any thread)."""
        loop, event = self._loop, self._bindings_now
        if loop is not None and event is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(event.set)

    def wait_for(self, predicate: Callable[[model.Snapshot | None], bool],
                 timeout: float) -> bool:
        """Wait until ``predicate(applied snapshot)`` holds; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self._applied), timeout)

    def wait_applied(self, content_hash: str, timeout: float) -> bool:
        return self.wait_for(lambda s: s is not None and s.hash == content_hash, timeout)

    # -- the thread

    def _thread_main(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            asyncio.set_event_loop(loop)
            self._stop = asyncio.Event()
            self._report_now = asyncio.Event()
            self._bindings_now = asyncio.Event()
            ready.set()
            loop.run_until_complete(self._run())
        finally:
            with contextlib.suppress(Exception):
                # gRPC delivers the closed channel's last completions a moment later, from
                # its poller; closing the loop under them only logs errors.
                loop.run_until_complete(asyncio.sleep(0.05))
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            ready.set()

    async def _run(self) -> None:
        assert self._stop is not None
        attempt = 0
        while not self._stop.is_set():
            got_updates = False
            resync = False
            try:
                got_updates = await self._session()
            except _Resync as exc:
                resync = True
                log.warning("%s: resync with a full snapshot: %s", self.agent_id, exc)
            except grpc.aio.AioRpcError as exc:
                self.stats.last_error = f"{exc.code().name}: {exc.details()}"
                log.info("%s: controller stream ended: %s", self.agent_id, self.stats.last_error)
            except Exception as exc:
                self.stats.last_error = repr(exc)
                log.exception("%s: controller stream failed", self.agent_id)
            self.connected = False
            if self._stop.is_set():
                break
            self.stats.disconnects += 1
            if got_updates:
                attempt = 0
            # One immediate retry after a refused delta; a second refusal in a row backs off
            # (a controller sending bad data must not be hammered).
            delay = 0.0 if resync and attempt == 0 else self.backoff.delay(attempt, self._rng)
            attempt += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)

    def _channel(self) -> grpc.aio.Channel:
        options = channel.channel_options(self.tls)
        if self.tls is None:
            return grpc.aio.insecure_channel(self.target, options=options)
        return grpc.aio.secure_channel(self.target, channel.channel_credentials(self.tls),
                                       options=options)

    async def _session(self) -> bool:
        """One connection: watch until it ends; reports run beside it. True if any
        update arrived (the connection worked, so backoff starts over)."""
        assert self._stop is not None
        got = False
        channel = self._channel()
        stub = pb_grpc.ControlStub(channel)
        held = None if self._want_full else self._received
        request = pb.WatchRequest(agent_id=self.agent_id, node=self.node,
                                  have_version=held.version if held else 0,
                                  have_hash=held.hash if held else "")
        call = stub.WatchSnapshots(request)
        reports = asyncio.create_task(self._report_loop(stub))
        binds = asyncio.create_task(self._binding_loop(stub))
        stopper = asyncio.create_task(self._stop.wait())
        try:
            async for update in _until(call, stopper):
                if not got:
                    got = True
                    self.stats.connects += 1
                self.connected = True
                self._want_full = False
                self._handle(update)
            return got
        finally:
            call.cancel()
            for task in (reports, binds, stopper):
                task.cancel()
            for task in (reports, binds, stopper):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await channel.close(grace=None)

    def _handle(self, update: pb.SnapshotUpdate) -> None:
        kind = update.WhichOneof("update")
        if kind == "loads":
            self._loads(update.loads)
            return
        if kind == "bindings":
            self._bindings(update.bindings)
            return
        try:
            if kind == "full":
                snap = convert.snapshot_from_pb(update.full)
                self.stats.fulls += 1
            elif kind == "delta":
                if self._received is None:
                    raise model.ModelError("delta received before any full snapshot")
                snap = model.apply_delta(self._received, convert.delta_from_pb(update.delta))
                self.stats.deltas += 1
            else:
                raise model.ModelError(f"update: unknown kind {kind!r}")
        except model.ModelError as exc:
            self.stats.resyncs += 1
            self.stats.last_error = str(exc)
            self._want_full = True
            self._received = None
            raise _Resync(str(exc)) from None
        self._received = snap
        self._apply(snap)

    def _loads(self, msg: pb.EngineLoads) -> None:
        try:
            loads = convert.loads_from_pb(msg)
        except model.ModelError as exc:
            # Loads are advisory (the next message corrects them): no resync for one.
            log.warning("%s: engine loads refused: %s", self.agent_id, exc)
            self.stats.last_error = str(exc)
            return
        self.stats.loads += 1
        if self._on_loads is not None:
            try:
                self._on_loads(loads)
            except Exception:
                log.exception("%s: on_loads failed", self.agent_id)

    def _bindings(self, msg: pb.SessionBindings) -> None:
        try:
            out = convert.fanout_from_pb(msg)
        except model.ModelError as exc:
            # A bad batch is dropped, not a reason to resync snapshots: the bindings it
            # held are sent again by the next touch or the next connection's table dump.
            log.warning("%s: session bindings refused: %s", self.agent_id, exc)
            self.stats.last_error = str(exc)
            return
        self.stats.bindings += 1
        if self._on_bindings is not None:
            try:
                self._on_bindings(out)
            except Exception:
                log.exception("%s: on_bindings failed", self.agent_id)

    def _apply(self, snap: model.Snapshot) -> None:
        applied = self._applied
        if applied is not None and applied.hash == snap.hash:
            if applied.version != snap.version:
                self._set_applied(snap)  # renumbered, same content: nothing to program
            # Say so now, not at the next interval: a controller that just started counts
            # this agent as converged only from a report it receives after publishing
            # (this report cut reconvergence after a restart from up to 2.3 s).
            if self._report_now is not None:
                self._report_now.set()
            return
        started = time.perf_counter()
        try:
            ok = bool(self._on_snapshot(snap))
            error = None if ok else f"apply of version {snap.version} failed"
        except Exception as exc:
            log.exception("%s: on_snapshot raised on version %d", self.agent_id, snap.version)
            ok, error = False, f"apply of version {snap.version} raised {exc!r}"
        self._apply_seconds = time.perf_counter() - started
        self._apply_error = error
        if ok:
            self.stats.applies += 1
            self._set_applied(snap)
        else:
            self.stats.apply_failures += 1
        if self._report_now is not None:
            self._report_now.set()

    def _set_applied(self, snap: model.Snapshot) -> None:
        with self._cond:
            self._applied = snap
            self._cond.notify_all()

    # -- reports

    def _report(self) -> pb.AgentReport:
        observed = reports.Observations()
        errors: list[str] = []
        if self._report_source is not None:
            try:
                observed = self._report_source()
            except Exception as exc:
                log.exception("%s: report source failed", self.agent_id)
                errors.append(f"report source raised {exc!r}")
        if self._apply_error:
            errors.append(self._apply_error)
        applied = self._applied
        report = reports.AgentReport(
            agent_id=self.agent_id, node=self.node,
            applied_version=applied.version if applied else 0,
            applied_hash=applied.hash if applied else "",
            apply_seconds=self._apply_seconds,
            engines=tuple(observed.engines), counters=tuple(observed.counters),
            errors=(*observed.errors, *errors),
        )
        return convert.report_to_pb(report)

    async def _reports(self, generation: int) -> AsyncIterator[pb.AgentReport]:
        """Reports for one Report call. gRPC may keep pulling from a dead call's iterator:
        one left over from the previous connection took the "report now" wake-up after a
        controller restart, and the live stream waited a whole interval (up to 2.3 s to
        reconverge). An iterator whose call is over ends instead."""
        assert self._report_now is not None
        while generation == self._report_generation:
            self._report_now.clear()
            # A failed apply is retried here, at the report pace, while the stream is quiet.
            received = self._received
            if received is not None and (self._applied is None
                                         or self._applied.hash != received.hash):
                self._apply(received)
                self._report_now.clear()
            try:
                msg = self._report()
            except model.ModelError as exc:  # our own report source handed garbage
                log.error("%s: report not sent: %s", self.agent_id, exc)
                self.stats.last_error = str(exc)
            else:
                self.stats.reports += 1
                yield msg
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._report_now.wait(), self.report_interval)

    async def _report_loop(self, stub: Any) -> None:
        try:
            while True:
                self._report_generation += 1
                try:
                    await stub.Report(self._reports(self._report_generation))
                except grpc.aio.AioRpcError as exc:
                    log.debug("%s: report stream ended: %s", self.agent_id, exc.code().name)
                self._report_generation += 1
                # The watch stream decides about reconnecting; here just try again shortly.
                await asyncio.sleep(min(self.report_interval, 0.2))
        finally:
            self._report_generation += 1  # this session's iterators send nothing more
            if self._report_now is not None:
                self._report_now.set()  # and wake them, so they end


    async def _binding_reports(self, generation: int) -> AsyncIterator[pb.BindingReport]:
        """Rows for one ReportBindings call. gRPC may keep pulling from a call's request
        iterator after the call died (its consumer waits on the next item): rows taken
        then would be lost, so an iterator whose call is over takes nothing."""
        assert self._bindings_now is not None and self._binding_source is not None
        while generation == self._binding_generation:
            self._bindings_now.clear()
            while generation == self._binding_generation and (
                    report := self._binding_source()) is not None:
                self.stats.binding_reports += 1
                yield convert.binding_report_to_pb(report)
            await self._bindings_now.wait()

    async def _binding_loop(self, stub: Any) -> None:
        if self._binding_source is None:
            return
        try:
            while True:
                self._binding_generation += 1
                if self._on_binding_stream is not None:
                    self._on_binding_stream()  # e.g. send again what a dead stream carried
                try:
                    await stub.ReportBindings(self._binding_reports(self._binding_generation))
                except grpc.aio.AioRpcError as exc:
                    log.debug("%s: binding stream ended: %s", self.agent_id, exc.code().name)
                self._binding_generation += 1
                await asyncio.sleep(min(self.report_interval, 0.2))
        finally:
            self._binding_generation += 1  # this session's iterators take nothing more
            if self._bindings_now is not None:
                self._bindings_now.set()  # and wake them, so they end


async def _until(call: Any, stopper: asyncio.Task[Any]) -> AsyncIterator[pb.SnapshotUpdate]:
    """The call's messages until it ends or ``stopper`` finishes."""
    reader = call.__aiter__()
    while True:
        nxt = asyncio.ensure_future(reader.__anext__())
        done, _ = await asyncio.wait({nxt, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if nxt not in done:
            nxt.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration, Exception):
                await nxt
            return
        try:
            item = nxt.result()
        except StopAsyncIteration:
            return
        yield item
