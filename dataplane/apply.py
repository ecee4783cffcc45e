"""Desired state -> kernel maps.

`plan` is pure: from the validated desired state and what the maps hold now
it computes the target contents of every map (ids, values, tables) and the
difference. `execute` writes only that difference, with batch updates, in an
order that keeps every connect() consistent: backends before the tables that
name them, tables before the services that use them, removals last. Nothing
is written before the whole plan exists, so bad input changes nothing.

Tables: services with client or session affinity get a weighted Maglev table
(a key keeps its backend across nodes and across most changes); services
without affinity get a proportional table (their keys are random, so
consistency buys nothing and the build is a repeat of counts).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import socket
import struct
import threading
import time
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from dataplane import abi, bpfsys, maglev, model
from dataplane.maps import MapSet
from dataplane.tables import TablePool

# Raw map keys and values as tuples of the C fields, in declaration order.
L4 = tuple[int, int, int]                    # kvr_l4_key minus pad
# kvr_svc: id, table_size, tbl_group, tbl_base, aff_timeout, eps_milli, probe_milli,
# affinity, flags, n_backends, revision
SvcVal = tuple[int, int, int, int, int, int, int, int, int, int, int]
BeVal = tuple[int, int, int, int]            # kvr_backend
_SVC_FIELDS = ("id", "table_size", "tbl_group", "tbl_base", "aff_timeout", "eps_milli",
               "probe_milli", "affinity", "flags", "n_backends", "revision")
_UNPLACED = -1  # tbl_group/tbl_base of a table execute has yet to write

# A backend serving several services with different states takes the most
# restrictive one: an endpoint is one pod, whatever Service names it.
_SEVERITY = {
    model.BackendState.ACTIVE: 0, model.BackendState.PROBING: 1,
    model.BackendState.DRAINING: 2, model.BackendState.OPEN: 3,
}
_KSTATE = {
    model.BackendState.ACTIVE: int(abi.BackendState.ACTIVE),
    model.BackendState.DRAINING: int(abi.BackendState.DRAINING),
    model.BackendState.OPEN: int(abi.BackendState.OPEN),
    model.BackendState.PROBING: int(abi.BackendState.PROBING),
}
_KAFF = {
    model.Affinity.NONE: int(abi.Affinity.NONE),
    model.Affinity.CLIENT: int(abi.Affinity.CLIENT),
    model.Affinity.SESSION: int(abi.Affinity.SESSION),
}
# Only these states get table slots; draining and open backends are left out
# of the table, which moves only their own keys.
_IN_TABLE = (model.BackendState.ACTIVE, model.BackendState.PROBING)
_USABLE_KSTATES = (int(abi.BackendState.ACTIVE), int(abi.BackendState.PROBING))


@dataclasses.dataclass
class View:
    """The user-space-owned contents of the maps (kernel-owned ones are not diffed)."""

    services: dict[L4, SvcVal] = dataclasses.field(default_factory=dict)
    names: dict[int, str] = dataclasses.field(default_factory=dict)
    backends: dict[int, BeVal] = dataclasses.field(default_factory=dict)
    be_addr: dict[L4, int] = dataclasses.field(default_factory=dict)  # index of backends
    members: dict[tuple[int, int], int] = dataclasses.field(default_factory=dict)
    be_load: dict[int, int] = dataclasses.field(default_factory=dict)
    svc_load: dict[int, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Diff:
    put: dict[Any, Any]
    delete: list[Any]


@dataclasses.dataclass
class Plan:
    target: View
    diffs: dict[str, Diff]
    tables: dict[L4, np.ndarray]            # service key -> backend ids by slot, to write
    gone_services: list[int]
    gone_backends: list[int]
    trips_clear: list[int]                  # backends whose kernel trip ends
    build_seconds: float

    def summary(self) -> dict[str, int]:
        out = {f"{name}_put": len(d.put) for name, d in self.diffs.items() if d.put}
        out.update({f"{name}_delete": len(d.delete) for name, d in self.diffs.items() if d.delete})
        if self.tables:
            out["tables_written"] = len(self.tables)
        return out


def _l4(addr: int, port: int, proto: str) -> L4:
    # abi.ip_to_be32/port_to_be16 inlined (this runs once per backend per apply):
    # network order read as a native little-endian integer is a byte swap.
    x = addr
    be32 = ((x & 0xFF) << 24) | ((x & 0xFF00) << 8) | ((x >> 8) & 0xFF00) | (x >> 24)
    return (be32, socket.htons(port), abi.IPPROTO[proto])


def _ip(text: str) -> int:
    return int.from_bytes(socket.inet_aton(text), "big")


H = TypeVar("H", bound=Hashable)


def _alloc(wanted: list[H], existing: Mapping[H, int], taken: set[int]) -> dict[H, int]:
    """Keep existing ids; give new objects the lowest ids never in use in this
    apply (an id freed now is not reused now: affinity entries may still name it)."""
    out: dict[H, int] = {}
    nxt = 1
    for obj in wanted:
        old = existing.get(obj)
        if old is not None:
            out[obj] = old
            continue
        while nxt in taken:
            nxt += 1
        out[obj] = nxt
        taken.add(nxt)
    return out


def _revision(kind: bytes, size: int, seed: int, entries: list[tuple[Any, int, int]]) -> int:
    h = hashlib.blake2b(kind + struct.pack("=IQ", size, seed), digest_size=8)
    h.update(repr(entries).encode())
    return int.from_bytes(h.digest(), "little")


@functools.lru_cache(maxsize=1024)
def proportional(weights: tuple[int, ...], size: int) -> np.ndarray:
    """Indices into `weights`, each repeated in proportion to its weight (largest
    remainder, ties to the lower index): a table for random keys. Cached, since
    most services share a handful of weight patterns; the result is read-only."""
    w = np.asarray(weights, dtype=np.float64)
    if w.sum() <= 0:
        return np.zeros(0, dtype=np.uint32)
    exact = w * size / w.sum()
    counts = np.floor(exact).astype(np.int64)
    short = size - int(counts.sum())
    if short:
        order = np.argsort(-(exact - counts), kind="stable")
        counts[order[:short]] += 1
    table = np.repeat(np.arange(len(w), dtype=np.uint32), counts)
    table.flags.writeable = False
    return table


def plan(desired: model.DesiredState, current: View, seed: int,
         live_loads: Mapping[L4, int] | None = None) -> Plan:
    """Compute the target maps and what differs from `current`. Pure.

    `live_loads` (endpoint -> load) are the agent's own scrapes of engines on its
    node; they are newer than the loads in a desired state and win over them.
    """
    target = View()
    live_loads = live_loads or {}

    # Endpoints: one backend id per (address, port, protocol), shared by services.
    ep_state: dict[L4, model.BackendState] = {}
    ep_load: dict[L4, int] = {}
    svc_eps: list[list[L4]] = []
    for svc in desired.services:
        eps = []
        for be in svc.backends:
            key = _l4(be.key[0], be.port, svc.protocol)
            eps.append(key)
            state = ep_state.get(key)
            if state is None:
                ep_state[key] = be.state
                ep_load[key] = be.load
            else:
                if _SEVERITY[be.state] > _SEVERITY[state]:
                    ep_state[key] = be.state
                ep_load[key] = max(ep_load[key], be.load)
        svc_eps.append(eps)
    be_ids = _alloc(list(ep_state), current.be_addr, set(current.backends))
    trips_clear = []
    for key, be_id in be_ids.items():
        target.backends[be_id] = (*key, _KSTATE[ep_state[key]])
        target.be_addr[key] = be_id
        was = current.backends.get(be_id)
        if was is not None and was[3] == abi.BackendState.OPEN and ep_state[key] in _IN_TABLE:
            # User space closed (or half-opened) the breaker: that also ends a
            # trip the kernel made on its own.
            trips_clear.append(be_id)
        load = live_loads.get(key, ep_load[key])
        if load:
            target.be_load[be_id] = load

    svc_keys = [_l4(_ip(s.vip), s.port, s.protocol) for s in desired.services]
    current_ids = {k: v[0] for k, v in current.services.items()}
    svc_ids = _alloc(list(svc_keys), current_ids, set(current_ids.values()))

    # Table inputs per service; only services whose inputs changed get a new table.
    maglev_groups: dict[int, list[tuple[L4, list[str], list[int], np.ndarray]]] = {}
    tables: dict[L4, np.ndarray] = {}
    for svc, key, eps in zip(desired.services, svc_keys, svc_eps, strict=True):
        svc_id = svc_ids[key]
        consistent = svc.affinity != model.Affinity.NONE
        entries: list[tuple[Any, int, int]] = []
        loads = []
        for be, ep in zip(svc.backends, eps, strict=True):
            be_id = be_ids[ep]
            usable = ep_state[ep] in _IN_TABLE
            # Maglev needs the node-independent name; a proportional table only an order.
            name = svc.identity(be) if consistent else ep
            entries.append((name, be.weight if usable else 0, be_id))
            target.members[(svc_id, be_id)] = be.weight
            if usable:
                loads.append(target.be_load.get(be_id, 0))
        entries.sort()
        revision = _revision(b"maglev" if consistent else b"prop", svc.size, seed, entries)
        eps_milli = abi.EPS_OFF if svc.epsilon is None else min(round(svc.epsilon * 1000), 0xFFFE)
        prev = current.services.get(key)
        if prev is not None and prev[0] == svc_id and prev[10] == revision:
            group, base = prev[2], prev[3]
        else:
            group = base = _UNPLACED
            ids = np.fromiter((e[2] for e in entries), dtype=np.uint32, count=len(entries))
            weights = [e[1] for e in entries]
            if consistent:
                maglev_groups.setdefault(svc.size, []).append(
                    (key, [e[0] for e in entries], weights, ids))
            else:
                tables[key] = _to_ids(proportional(tuple(weights), svc.size), ids,
                                      svc.size)
        flags = abi.SVC_F_SATURATED if svc.saturated else 0
        target.services[key] = (
            svc_id, svc.size, group, base, svc.affinity_timeout, eps_milli,
            round(svc.probe_share * 1000), _KAFF[svc.affinity], flags, len(svc.backends),
            revision)
        target.names[svc_id] = svc.name
        if loads and sum(loads):
            target.svc_load[svc_id] = sum(loads) // len(loads)

    started = time.perf_counter()
    for size, members in maglev_groups.items():
        built = maglev.build_many([(idents, weights) for _, idents, weights, _ in members],
                                  size, seed)
        for (key, _, _, ids), idx in zip(members, built, strict=True):
            tables[key] = _to_ids(idx, ids, size)
    build_seconds = time.perf_counter() - started

    diffs = {
        name: _diff(getattr(current, name), getattr(target, name))
        for name in ("backends", "members", "be_load", "svc_load", "names", "services")
    }
    return Plan(
        target=target, diffs=diffs, tables=tables,
        gone_services=sorted(set(current.names) - set(target.names)),
        gone_backends=sorted(set(current.backends) - set(target.backends)),
        trips_clear=trips_clear,
        build_seconds=build_seconds,
    )


def _to_ids(idx: np.ndarray, ids: np.ndarray, size: int) -> np.ndarray:
    if len(idx) == 0:
        # No backend may take a slot: every slot names no backend, so connects
        # fail fast with ECONNREFUSED.
        return np.full(size, abi.NO_BACKEND, dtype=np.uint32)
    return ids[idx]


def _diff(current: Mapping[Any, Any], target: Mapping[Any, Any]) -> Diff:
    return Diff(put={k: v for k, v in target.items() if current.get(k) != v},
                delete=[k for k in current if k not in target])


# -- the kernel edge ----------------------------------------------------------------------

_DT_L4 = np.dtype(abi.L4Key)
_DT_SVC = np.dtype(abi.Svc)
_DT_BE = np.dtype(abi.Backend)
_DT_MEMBER = np.dtype(abi.MemberKey)
_DT_NAME = np.dtype(abi.SvcName)
_U32 = np.dtype(np.uint32)


def _records(rows: Sequence[Sequence[int]], dtype: np.dtype, fields: tuple[str, ...]
             ) -> np.ndarray:
    arr = np.zeros(len(rows), dtype=dtype)
    if rows:
        cols = np.array(rows, dtype=np.uint64).reshape(-1, len(fields))
        for i, field in enumerate(fields):
            arr[field] = cols[:, i]
    return arr


def _l4_array(keys: list[L4]) -> np.ndarray:
    return _records(keys, _DT_L4, ("addr", "port", "proto"))


def _member_array(keys: list[tuple[int, int]]) -> np.ndarray:
    return _records(keys, _DT_MEMBER, ("svc_id", "be_id"))


def _u32(values: Any) -> np.ndarray:
    return np.fromiter(values, dtype=_U32)


def _put(maps: MapSet, name: str, keys: np.ndarray, vals: np.ndarray) -> None:
    bpfsys.update_batch(maps.fd(name), keys, vals)


def _delete(maps: MapSet, name: str, keys: np.ndarray) -> None:
    bpfsys.delete_batch(maps.fd(name), keys)


def _delete_present(maps: MapSet, name: str, ids: list[int]) -> None:
    fd = maps.fd(name)
    for i in ids:
        bpfsys.delete(fd, abi.ct.c_uint32(i))


@dataclasses.dataclass
class ApplyResult:
    summary: dict[str, int]
    build_seconds: float
    write_seconds: float


def execute(p: Plan, maps: MapSet, pool: TablePool, current: View) -> ApplyResult:
    """Write a plan's difference to the maps, in a connect-safe order. Fills in where
    each new table went (p.target.services)."""
    started = time.perf_counter()
    d = p.diffs

    # 1. Backends, their reverse index, kernel-owned entries for new ones, loads.
    if d["backends"].put:
        _put(maps, "kvr_be_v1", _u32(d["backends"].put),
             _records(list(d["backends"].put.values()), _DT_BE,
                      ("addr", "port", "proto", "state")))
    if p.trips_clear:
        _delete_present(maps, "kvr_health", p.trips_clear)
    if d["be_load"].put:
        _put(maps, "kvr_be_load", _u32(d["be_load"].put), _u32(d["be_load"].put.values()))
    if d["svc_load"].put:
        _put(maps, "kvr_svc_load", _u32(d["svc_load"].put), _u32(d["svc_load"].put.values()))
    if d["members"].put:
        _put(maps, "kvr_member", _member_array(list(d["members"].put)),
             _u32(d["members"].put.values()))

    # 2. New tables into free regions; the service values below publish them.
    services = d["services"].put
    released = []
    for key, table in p.tables.items():
        group, base = pool.write(table)
        value = (*p.target.services[key][:2], group, base, *p.target.services[key][4:])
        p.target.services[key] = services[key] = value
        old = current.services.get(key)
        if old is not None:
            released.append((old[2], old[3]))

    pool.publish()

    # 3. Services last: a new service appears only once its table exists.
    if d["names"].put:
        raw = b"".join(n.encode()[:63].ljust(_DT_NAME.itemsize, b"\0")
                       for n in d["names"].put.values())
        _put(maps, "kvr_svc_name", _u32(d["names"].put),
             np.frombuffer(raw, dtype=np.uint8).reshape(-1, _DT_NAME.itemsize))
    if services:
        _put(maps, "kvr_svc_v1", _l4_array(list(services)),
             _records(list(services.values()), _DT_SVC, _SVC_FIELDS))

    # 4. Removals: services first (no new connect can reach them), then what they used.
    if d["services"].delete:
        _delete(maps, "kvr_svc_v1", _l4_array(d["services"].delete))
        released.extend((current.services[k][2], current.services[k][3])
                        for k in d["services"].delete)
    for group, base in released:
        pool.release(group, base)
    for name, mapname, conv in (
        ("names", "kvr_svc_name", _u32), ("svc_load", "kvr_svc_load", _u32),
        ("members", "kvr_member", _member_array), ("backends", "kvr_be_v1", _u32),
        ("be_load", "kvr_be_load", _u32),
    ):
        if d[name].delete:
            _delete(maps, mapname, conv(d[name].delete))
    # Kernel-created entries (counters, health) exist only for objects that saw
    # traffic, so their removal tolerates absent keys.
    if p.gone_services:
        _delete_present(maps, "kvr_svc_cnt", p.gone_services)
        _purge_affinity(maps, set(p.gone_services))
    if p.gone_backends:
        _delete_present(maps, "kvr_health", p.gone_backends)
        _delete_present(maps, "kvr_be_cnt", p.gone_backends)
    pool.collect()
    return ApplyResult(p.summary(), p.build_seconds, time.perf_counter() - started)


def _purge_affinity(maps: MapSet, svc_ids: set[int]) -> None:
    """Forget the sessions of removed services, so a service that later gets the
    same id starts clean. Removals are rare; the LRU walk is the price."""
    stale = [k for k in maps.keys("kvr_affinity", abi.AffKey) if k.svc_id in svc_ids]
    for key in stale:
        bpfsys.delete(maps.fd("kvr_affinity"), key)


def read_view(maps: MapSet) -> View:
    """What the maps hold now: a restarted agent starts its diff from here."""
    view = View()
    for key, svc in maps.items("kvr_svc_v1", abi.L4Key, abi.Svc):
        view.services[(key.addr, key.port, key.proto)] = tuple(
            getattr(svc, f) for f in _SVC_FIELDS)
    for k, name in maps.items("kvr_svc_name", abi.ct.c_uint32, abi.SvcName):
        view.names[k.value] = name.name.decode()
    for k, be in maps.items("kvr_be_v1", abi.ct.c_uint32, abi.Backend):
        view.backends[k.value] = (be.addr, be.port, be.proto, be.state)
        view.be_addr[(be.addr, be.port, be.proto)] = k.value
    for mk, w in maps.items("kvr_member", abi.MemberKey, abi.ct.c_uint32):
        view.members[(mk.svc_id, mk.be_id)] = w.value
    for k, v in maps.items("kvr_be_load", abi.ct.c_uint32, abi.ct.c_uint32):
        view.be_load[k.value] = v.value
    for k, v in maps.items("kvr_svc_load", abi.ct.c_uint32, abi.ct.c_uint32):
        view.svc_load[k.value] = v.value
    return view


def parse_identity(identity: str) -> L4:
    """'10.0.0.5:8000/tcp' (the identity of a backend) -> its endpoint key."""
    address, port, proto = abi.parse_endpoint(identity)
    return _l4(int(address), port, proto)


class Applier:
    """The agent's handle on the maps: its view of them, the table groups, and the
    live loads of the engines it scrapes. Thread-safe: snapshots, file reloads and
    load updates arrive on different threads."""

    def __init__(self, maps: MapSet, seed: int) -> None:
        self.maps = maps
        self.seed = seed
        self.lock = threading.Lock()
        self.view = read_view(maps)
        self.pool = TablePool(maps)
        self.pool.adopt(svc for _, svc in maps.items("kvr_svc_v1", abi.L4Key, abi.Svc))
        self.live_loads: dict[L4, int] = {}

    def apply(self, desired: model.DesiredState) -> ApplyResult:
        with self.lock:
            p = plan(desired, self.view, self.seed, self.live_loads)
            result = execute(p, self.maps, self.pool, self.view)
            self.view = p.target
            return result

    def set_loads(self, loads: Mapping[str, int]) -> int:
        """Write engines' live loads (by backend identity) and their services' mean
        loads straight into the kernel, without a full apply: the bounded-load check
        sees a load change one scrape after it happens. Returns entries written."""
        with self.lock:
            changed_be: dict[int, int] = {}
            for ident, load in loads.items():
                key = parse_identity(ident)
                self.live_loads[key] = load
                be_id = self.view.be_addr.get(key)
                if be_id is not None and self.view.be_load.get(be_id, 0) != load:
                    changed_be[be_id] = load
            if not changed_be:
                return 0
            view = self.view
            view.be_load.update(changed_be)
            for be_id, load in changed_be.items():
                if load == 0:
                    del view.be_load[be_id]
            svc_ids = {s for s, b in view.members if b in changed_be}
            sums: dict[int, list[int]] = {s: [] for s in svc_ids}
            for (svc_id, be_id) in view.members:
                if svc_id in sums and view.backends[be_id][3] in _USABLE_KSTATES:
                    sums[svc_id].append(view.be_load.get(be_id, 0))
            means = {s: sum(v) // len(v) for s, v in sums.items() if v}
            _put(self.maps, "kvr_be_load", _u32(changed_be), _u32(changed_be.values()))
            _put(self.maps, "kvr_svc_load", _u32(means), _u32(means.values()))
            view.svc_load.update(means)
            return len(changed_be) + len(means)

    def counters(self, identities: set[str] | None = None) -> dict[str, list[int]]:
        """Kernel per-backend counters (enum kvr_be_cnt order) by backend identity."""
        out = {}
        with self.lock:
            keys = list(self.view.be_addr.items())
        for key, be_id in keys:
            ident = abi.format_endpoint(*key)
            if identities is not None and ident not in identities:
                continue
            values = self.maps.percpu_sum("kvr_be_cnt", abi.ct.c_uint32(be_id),
                                          abi.BeCounters)
            out[ident] = values or [0] * len(abi.BeCounter)
        return out

    def close(self) -> None:
        self.pool.close()
