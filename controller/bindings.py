"""The fleet's session bindings: which backend each live session belongs to.

Pure (explicit time, no I/O). Agents report the bindings their kernels made and the ones
they used again (:class:`dataplane.bindings.Report`); :class:`BindingTable` decides which
binding of a session wins, when a binding expires, and how many sessions each engine
holds, and queues what every agent must hear (:meth:`BindingTable.take`).

The rule when two nodes bind the same session differently (both saw it first, at about
the same time, and chose by their own loads): **the first binding the controller
receives wins**. A later binding of a session that is already bound loses unless it
moves the session away from the very backend the controller holds (``prev``) or that
backend is no longer usable in the current snapshot (open, draining or gone); a loser is
answered with the winner, which the losing node writes over its own. Every node ends
with the same binding, whatever order messages crossed in.

Expiry: the kernels do not expire fleet bindings on their own clocks (nodes would expire
a session at different moments and disagree); they report touches instead, at most a few
per affinity timeout per session, and a binding expires here one timeout after the last
touch any node reported, for every node at once. A binding whose backend left its
service is dropped and expired the same way. A restarted controller relearns live
bindings from touches; a binding never used again stays in the kernels' LRU maps until
evicted.

Memory is bounded by ``max_bindings``: past it, new sessions are not recorded (each node
keeps routing them by its own pick) and are counted.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterator

from dataplane import bindings, model

DEFAULT_MAX_BINDINGS = 4_000_000
_USABLE = (model.BackendState.ACTIVE, model.BackendState.PROBING)


@dataclasses.dataclass
class Stats:
    accepted: int = 0       # new bindings recorded
    moved: int = 0          # sessions moved to another backend
    conflicts: int = 0      # bindings that lost to an earlier one (the node is corrected)
    relearned: int = 0      # touches of bindings this controller did not know
    refused: int = 0        # unknown service, or a backend not in it
    over_capacity: int = 0  # new bindings not recorded: the table is full
    expired: int = 0        # expired or dropped with their backend


class _Service:
    __slots__ = ("entries", "members", "spec", "timeout", "usable")

    def __init__(self, svc: model.Service) -> None:
        self.spec = svc
        proto = svc.protocol.value
        self.timeout = float(svc.affinity_timeout)
        self.members = frozenset(model.backend_identity(b.address, b.port, proto)
                                 for b in svc.backends)
        self.usable = frozenset(model.backend_identity(b.address, b.port, proto)
                                for b in svc.backends if b.state in _USABLE)
        # key -> (backend identity, last touch), least recently touched first.
        self.entries: collections.OrderedDict[int, tuple[str, float]] = (
            collections.OrderedDict())


class BindingTable:
    def __init__(self, max_bindings: int = DEFAULT_MAX_BINDINGS) -> None:
        if max_bindings < 1:
            raise ValueError(f"max_bindings must be >= 1, got {max_bindings}")
        self.max_bindings = max_bindings
        self.stats = Stats()
        self._services: dict[str, _Service] = {}
        self._sessions: collections.Counter[str] = collections.Counter()
        self._size = 0
        # Identities interned: a million bindings share a few hundred strings.
        self._intern: dict[str, str] = {}
        self._out_bound: list[tuple[str, str, str, int]] = []
        self._out_expired: list[tuple[str, str, str, int]] = []
        self._dirty: set[str] = set()

    def __len__(self) -> int:
        return self._size

    def sessions(self) -> dict[str, int]:
        """Live bindings per backend identity."""
        return {i: n for i, n in self._sessions.items() if n}

    def backend_of(self, service: str, key: int) -> str | None:
        svc = self._services.get(service)
        entry = svc.entries.get(key) if svc is not None else None
        return entry[0] if entry is not None else None

    # -- input

    def set_snapshot(self, snap: model.Snapshot) -> None:
        """Follow the published desired state: services without affinity hold no
        bindings; a service that left drops its bindings (the agents purge its kernel
        entries with the service); a backend that left its service drops its sessions,
        and every agent is told they expired."""
        wanted = {s.name: s for s in snap.desired.services if s.affinity != model.Affinity.NONE}
        for name in [n for n in self._services if n not in wanted]:
            svc = self._services.pop(name)
            for backend, _ in svc.entries.values():
                self._count(backend, -1)
            self._size -= len(svc.entries)
            self.stats.expired += len(svc.entries)
        for name, spec in wanted.items():
            old = self._services.get(name)
            if old is not None and old.spec is spec:
                continue  # unchanged (deltas keep unchanged services as the same object)
            new = _Service(spec)
            if old is not None:
                new.entries = old.entries
                if old.members != new.members:
                    gone = [k for k, (b, _) in new.entries.items() if b not in new.members]
                    for key in gone:
                        self._drop(name, new, key)
            self._services[name] = new

    def report(self, rep: bindings.Report, now: float) -> None:
        for g in rep.bound:
            self._bind(g, now, touch=False)
        for g in rep.touched:
            self._bind(g, now, touch=True)

    def _bind(self, g: bindings.Group, now: float, touch: bool) -> None:
        svc = self._services.get(g.service)
        if svc is None or g.backend not in svc.members:
            self.stats.refused += len(g.keys)
            return
        backend = self._intern.setdefault(g.backend, g.backend)
        entries = svc.entries
        for key in g.keys:
            current = entries.get(key)
            if current is None:
                if self._size >= self.max_bindings:
                    self.stats.over_capacity += 1
                    continue
                entries[key] = (backend, now)
                self._size += 1
                self._count(backend, +1)
                self._out_bound.append((g.service, backend, "", key))
                if touch:
                    self.stats.relearned += 1
                else:
                    self.stats.accepted += 1
                continue
            holder = current[0]
            if holder == backend:
                entries[key] = (backend, now)
                entries.move_to_end(key)
            elif not touch and (g.prev == holder or holder not in svc.usable):
                entries[key] = (backend, now)
                entries.move_to_end(key)
                self._count(holder, -1)
                self._count(backend, +1)
                self._out_bound.append((g.service, backend, holder, key))
                self.stats.moved += 1
            else:
                # The earlier binding wins; tell every node (the loser overwrites its own).
                self._out_bound.append((g.service, holder, "", key))
                self.stats.conflicts += 1

    def expire(self, now: float) -> int:
        """Expire bindings not touched for their service's affinity timeout."""
        n = 0
        for name, svc in self._services.items():
            entries, limit = svc.entries, now - svc.timeout
            while entries:
                key, (_, touched) = next(iter(entries.items()))
                if touched > limit:
                    break
                self._drop(name, svc, key)
                n += 1
        return n

    def _drop(self, name: str, svc: _Service, key: int) -> None:
        backend, _ = svc.entries.pop(key)
        self._size -= 1
        self._count(backend, -1)
        self._out_expired.append((name, "", "", key))
        self.stats.expired += 1

    def _count(self, backend: str, delta: int) -> None:
        self._sessions[backend] += delta
        if not self._sessions[backend]:
            del self._sessions[backend]
        self._dirty.add(backend)

    # -- output

    def take(self, sessions: bool = True) -> bindings.Fanout:
        """What every agent must hear since the last take (empty when nothing moved);
        the session counts that changed only when ``sessions`` (a count is ~25 bytes an
        engine, and moves with every binding: callers send them less often)."""
        counts = {}
        if sessions:
            counts = {b: self._sessions.get(b, 0) for b in self._dirty}
            self._dirty = set()
        out = bindings.Fanout(bound=bindings.group(self._out_bound),
                              expired=bindings.group(self._out_expired), sessions=counts)
        self._out_bound, self._out_expired = [], []
        return out

    def dump(self, chunk: int = bindings.KEYS_PER_MESSAGE) -> Iterator[bindings.Fanout]:
        """The whole table as fan-out messages of at most ``chunk`` keys, for an agent
        that just connected: the session counts first, then every live binding (nothing
        for an empty table)."""
        counts = self.sessions()
        if counts:
            yield bindings.Fanout(sessions=counts)
        rows: list[tuple[str, str, str, int]] = []
        for name, svc in self._services.items():
            for key, (backend, _) in svc.entries.items():
                rows.append((name, backend, "", key))
                if len(rows) >= chunk:
                    yield bindings.Fanout(bound=bindings.group(rows))
                    rows = []
        if rows:
            yield bindings.Fanout(bound=bindings.group(rows))
