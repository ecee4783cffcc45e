"""The agent's half of fleet-wide sessions: kernel binding events up, the fleet's
decisions down.

Up: connect4 announces every binding it makes (and, now and then, one it used again) on
the ``kvr_events`` ring (:mod:`dataplane.events`). :class:`Binder` turns the kernel's ids
into names (service name, backend identity) and queues them for the controller; the
queue is bounded, so a node cut off from its controller keeps its newest bindings and
counts what it dropped.

Down: the controller's :class:`dataplane.bindings.Fanout` is written into this node's
kernel: winning bindings into ``kvr_affinity``, expired ones deleted, session counts into
``kvr_be_sess`` (new sessions go where fewer sessions already are).

Session counts: the controller's count of an engine covers every binding it had decided
when it sent the count, but it is sent only every 100 ms, and the kernel counts its own
new sessions at once. Overwriting the kernel's count with the controller's would undo this
node's newest sessions, and waiting for it would let two nodes pile new sessions on one
engine in the meantime. So the count written is the controller's, plus this node's
bindings the controller has not echoed back yet (every decided binding comes back on the
stream, before any count that includes it), plus the other nodes' bindings that arrived
since the last count.
"""

from __future__ import annotations

import collections
import logging
import threading
import time

from dataplane import abi, apply, bindings, events
from dataplane.maps import MapSet

log = logging.getLogger("kvroute.binder")

# Rows queued for the controller at most (about 80 bytes each): enough for a controller
# outage of a minute at 2,000 new sessions/s on this node.
QUEUE_MAX = 131072
# Rows handed to a stream are kept this long and sent again on the next stream: a
# controller that dies loses what was in flight, and a binding made in that instant
# would otherwise reach the other nodes only with its first touch, an affinity timeout
# later. The controller takes a row twice at no cost (same backend: a touch).
RESEND_WINDOW = 10.0


class Binder:
    """Thread-safe: events arrive on the agent's loop, fan-outs too, but the applier
    may be changing the view from an apply."""

    def __init__(self, applier: apply.Applier, maps: MapSet, queue_max: int = QUEUE_MAX) -> None:
        self.applier = applier
        self.maps = maps
        self._lock = threading.Lock()
        # (service, backend, prev, key), bound and touched apart.
        self._bound: collections.deque[tuple[str, str, str, int]] = collections.deque()
        self._touched: collections.deque[tuple[str, str, str, int]] = collections.deque()
        self.queue_max = queue_max
        # (monotonic time handed out, is a binding, row): what a new stream sends again.
        self._sent: collections.deque[tuple[float, bool, tuple[str, str, str, int]]] = (
            collections.deque())
        self.resent = 0
        self.events = 0
        self.dropped = 0        # queue full: the oldest rows went
        self.unknown = 0        # events naming ids the view does not hold (a race with apply)
        self.written = 0        # bindings written from the fleet
        self.deleted = 0
        self.unwritable = 0     # fan-out rows naming a service or backend this node lacks
        # Session counts (see the module docstring), by backend identity.
        self._base: dict[str, int] = {}
        self._unechoed: collections.Counter[str] = collections.Counter()
        self._remote: collections.Counter[str] = collections.Counter()
        self._mine: dict[tuple[str, int], tuple[str, str]] = {}  # (svc, key) -> (be, prev)

    # -- up

    def on_event(self, ev: events.Event) -> None:
        """One kernel event (the ring's callback)."""
        self.events += 1
        view = self.applier.view
        name = view.names.get(ev.svc_id)
        backend = self._identity(ev.be_id)
        if name is None or backend is None or ev.key == 0:
            self.unknown += 1
            return
        prev = self._identity(ev.prev_be_id) if ev.prev_be_id != abi.NO_BACKEND else None
        row = (name, backend, prev or "", ev.key)
        with self._lock:
            if ev.kind == abi.EV_BIND and len(self._mine) < self.queue_max:
                self._mine[(name, ev.key)] = (backend, prev or "")
                self._unechoed[backend] += 1
                if prev:
                    self._unechoed[prev] -= 1
            queue = self._bound if ev.kind == abi.EV_BIND else self._touched
            queue.append(row)
            if len(self._bound) + len(self._touched) > self.queue_max:
                # Touches go first: they only postpone an expiry.
                (self._touched if self._touched else self._bound).popleft()
                self.dropped += 1

    def _identity(self, be_id: int) -> str | None:
        row = self.applier.view.backends.get(be_id)
        return abi.format_endpoint(*row[:3]) if row is not None else None

    def counters(self) -> dict[str, int]:
        """For dataplane.metrics.BindingCollector."""
        return {"kernel_events": self.events, "dropped": self.dropped, "unknown": self.unknown,
                "resent": self.resent, "written": self.written, "deleted": self.deleted,
                "unwritable": self.unwritable}

    @property
    def pending(self) -> int:
        return len(self._bound) + len(self._touched)

    def take_report(self, agent_id: str, node: str,
                    limit: int = bindings.KEYS_PER_MESSAGE) -> bindings.Report | None:
        """Up to ``limit`` queued rows as one report (None when nothing is queued)."""
        now = time.monotonic()
        with self._lock:
            bound = [self._bound.popleft() for _ in range(min(limit, len(self._bound)))]
            room = limit - len(bound)
            touched = [self._touched.popleft() for _ in range(min(room, len(self._touched)))]
            sent = self._sent
            sent.extend((now, True, row) for row in bound)
            sent.extend((now, False, row) for row in touched)
            while sent and (sent[0][0] < now - RESEND_WINDOW or len(sent) > self.queue_max):
                sent.popleft()
        if not bound and not touched:
            return None
        return bindings.Report(agent_id, node, bindings.group(bound), bindings.group(touched))

    def resend_recent(self) -> None:
        """A new stream to the controller: queue again what the last streams carried
        within RESEND_WINDOW (it may have died with them), ahead of newer rows."""
        with self._lock:
            cutoff = time.monotonic() - RESEND_WINDOW
            recent = [(b, row) for t, b, row in self._sent if t >= cutoff]
            self._sent.clear()
            self._bound.extendleft(reversed([row for b, row in recent if b]))
            self._touched.extendleft(reversed([row for b, row in recent if not b]))
            self.resent += len(recent)

    # -- down

    def _recount(self, out: bindings.Fanout) -> set[str]:
        """Fold a fan-out into the count terms; the identities whose count moved."""
        moved: set[str] = set()
        with self._lock:
            for g in out.bound:
                for key in g.keys:
                    mine = self._mine.pop((g.service, key), None)
                    if mine is not None:  # our own, echoed: the controller counts it now
                        self._unechoed[mine[0]] -= 1
                        moved.add(mine[0])
                        if mine[1]:
                            self._unechoed[mine[1]] += 1
                            moved.add(mine[1])
                        continue
                    self._remote[g.backend] += 1
                    moved.add(g.backend)
                    if g.prev:
                        self._remote[g.prev] -= 1
                        moved.add(g.prev)
            if out.sessions:
                moved.update(self._remote)
                self._remote.clear()
                self._base.update(out.sessions)
                moved.update(out.sessions)
        return moved

    def count(self, identity: str) -> int:
        """This node's estimate of the sessions an engine holds fleet-wide."""
        return max(0, self._base.get(identity, 0) + self._unechoed[identity]
                   + self._remote[identity])

    def apply(self, out: bindings.Fanout) -> None:
        moved = self._recount(out)
        applier = self.applier
        with applier.lock:
            put: list[tuple[int, int, int]] = []
            for g in out.bound:
                svc_id, be_id = applier.service_id(g.service), applier.backend_id(g.backend)
                if svc_id is None or be_id is None:
                    self.unwritable += len(g.keys)
                    continue
                put.extend((svc_id, key, be_id) for key in g.keys)
            gone: list[tuple[int, int]] = []
            for g in out.expired:
                svc_id = applier.service_id(g.service)
                if svc_id is None:
                    continue  # the service left: its entries went with it
                gone.extend((svc_id, key) for key in g.keys)
            counts = {be_id: self.count(i) for i in moved
                      if (be_id := applier.backend_id(i)) is not None}
            if put:
                self.maps.write_bindings(put)
                self.written += len(put)
            if gone:
                self.maps.delete_bindings(gone)
                self.deleted += len(gone)
            if counts:
                self.maps.set_sessions(counts)
