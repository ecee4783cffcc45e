"""Desired state -> kernel maps.

`plan` is pure: from the validated desired state and what the maps hold now
it computes the target contents of every map (ids, values, tables) and the
difference. `execute` writes only that difference, with batch updates, in an
order that keeps every connect() consistent: backends before the tables that
name them, tables before the services that use them, removals last. Nothing
is written before the whole plan exists and fits the maps, so bad input
changes nothing; a write the kernel refuses is undone with every write before
it (in reverse, which is connect-safe too), so the maps hold the old state or
the new one, never a mix.

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
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from dataplane import abi, bpfsys, hashing, maglev, model
from dataplane.maps import MapSet
from dataplane.tables import TablePool

# Raw map keys and values as tuples of the C fields, in declaration order.
# kvr_l4_key minus pad: (128-bit address, IPv4 as ::ffff:a.b.c.d; port; proto)
L4 = tuple[int, int, int]
# kvr_svc: id, table_size, tbl_group, tbl_base, aff_timeout, eps_milli, probe_milli,
# affinity, flags, n_backends, move_eps_milli, revision, ident
SvcVal = tuple[int, int, int, int, int, int, int, int, int, int, int, int, int]
# kvr_backend: the endpoint's L4 fields, state, and a dual-stack pod's IPv6 address (0: none)
BeVal = tuple[int, int, int, int, int]
_SVC_FIELDS = ("id", "table_size", "tbl_group", "tbl_base", "aff_timeout", "eps_milli",
               "probe_milli", "affinity", "flags", "n_backends", "move_eps_milli", "revision",
               "ident")
# Endpoint -> {service name: (state, load) that service gives it}: who lists a backend.
def _move_milli(epsilon: float | None) -> int:
    """A move bound as the kernel's x1000 u16; None -> 0, off. Zero, not EPS_OFF: the
    field was padding before, and programs upgraded under an older agent's services must
    read "off" there until the agent rewrites them."""
    return 0 if epsilon is None else round(epsilon * 1000)


# A backend serving several services is one pod whatever Service names it, so the kernel
# holds one entry per endpoint with the most restrictive state and the highest load.
Refs = dict[L4, dict[str, tuple[model.BackendState, int]]]
_UNPLACED = -1  # tbl_group/tbl_base of a table execute has yet to write
_REVISION = _SVC_FIELDS.index("revision")


def _milli(epsilon: float | None) -> int:
    """An epsilon as the kernel's x1000 u16; None -> EPS_OFF (the check off)."""
    return abi.EPS_OFF if epsilon is None else min(round(epsilon * 1000), 0xFFFE)

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

    services: dict[L4, SvcVal] = dataclasses.field(default_factory=dict)  # by first VIP
    # A dual-stack service's second VIP -> its first: the kernel holds the same value
    # under both keys, and only the first owns the table region.
    aliases: dict[L4, L4] = dataclasses.field(default_factory=dict)
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
    refs: Refs = dataclasses.field(default_factory=dict)  # who lists each endpoint

    def summary(self) -> dict[str, int]:
        out = {f"{name}_put": len(d.put) for name, d in self.diffs.items() if d.put}
        out.update({f"{name}_delete": len(d.delete) for name, d in self.diffs.items() if d.delete})
        if self.tables:
            out["tables_written"] = len(self.tables)
        return out


def _l4(addr: int, port: int, proto: str) -> L4:
    # abi.port_to_be16 inlined (this runs once per backend per apply); the address stays
    # a 128-bit integer until _words turns it into the key's four __be32.
    return (addr, _HTONS(port), _PROTO[proto])


_HTONS = socket.htons
_PROTO: dict[str, int] = dict(abi.IPPROTO)


def _ip(text: str) -> int:
    return abi.addr128(text)


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


_MAPS = ("backends", "members", "be_load", "svc_load", "names", "services", "aliases")


def _endpoints(svc: model.Service) -> list[L4]:
    return [_l4(be.key[0], be.port, svc.protocol) for be in svc.backends]


def _service_key(svc: model.Service) -> L4:
    return _l4(_ip(svc.vip), svc.port, svc.protocol)


def _aliases(svc: model.Service, key: L4) -> dict[L4, L4]:
    """A dual-stack service's second VIP key -> ``key``, its first."""
    if svc.vip6 is None:
        return {}
    return {_l4(_ip(svc.vip6), svc.port, svc.protocol): key}


def _alts(svc: model.Service, eps: Sequence[L4], into: dict[L4, int]) -> None:
    """The IPv6 addresses of a service's dual-stack backends, by endpoint, where ``into``
    has none yet: called in service-name order, the first service naming one wins."""
    for be, ep in zip(svc.backends, eps, strict=True):
        if be.address6_number:
            into.setdefault(ep, be.address6_number)


def _merged(users: Mapping[str, tuple[model.BackendState, int]]) -> tuple[model.BackendState,
                                                                          int]:
    if len(users) == 1:  # the common case: one service lists the endpoint
        for only in users.values():
            return only
    state, load = model.BackendState.ACTIVE, 0
    for s, value in users.values():
        if _SEVERITY[s] > _SEVERITY[state]:
            state = s
        load = max(load, value)
    return state, load


def endpoint_refs(services: Sequence[model.Service]) -> tuple[Refs, dict[str, list[L4]]]:
    """Who lists each endpoint, and each service's endpoints in backend order."""
    refs: Refs = {}
    eps_of: dict[str, list[L4]] = {}
    for svc in services:
        eps = eps_of[svc.name] = _endpoints(svc)
        for be, ep in zip(svc.backends, eps, strict=True):
            users = refs.get(ep)
            if users is None:
                users = refs[ep] = {}
            users[svc.name] = (be.state, be.load)
    return refs, eps_of


class _Tables:
    """Per-service planning shared by full and incremental plans: the kvr_svc value, the
    member rows, the mean load, and the tables to build (Maglev ones batched by size)."""

    def __init__(self, seed: int, fleet: bool = False) -> None:
        self.seed = seed
        self.fleet = fleet
        self.maglev: dict[int, list[tuple[L4, list[str], list[int], np.ndarray]]] = {}
        self.tables: dict[L4, np.ndarray] = {}

    def service(self, svc: model.Service, key: L4, svc_id: int, eps: Sequence[L4],
                be_id_of: Callable[[L4], int], usable_of: Callable[[L4], bool],
                load_of: Callable[[int], int], prev: SvcVal | None
                ) -> tuple[SvcVal, dict[tuple[int, int], int], int]:
        consistent = svc.affinity != model.Affinity.NONE
        entries: list[tuple[Any, int, int]] = []
        loads = []
        members = {}
        for be, ep in zip(svc.backends, eps, strict=True):
            be_id = be_id_of(ep)
            ok = usable_of(ep)
            # Maglev needs the node-independent name; a proportional table only an order.
            name = svc.identity(be) if consistent else ep
            entries.append((name, be.weight if ok else 0, be_id))
            members[(svc_id, be_id)] = be.weight
            if ok:
                loads.append(load_of(be_id))
        entries.sort()
        size = svc.size
        revision = _revision(b"maglev" if consistent else b"prop", size, self.seed, entries)
        eps_milli = _milli(svc.epsilon)
        if prev is not None and prev[0] == svc_id and prev[_REVISION] == revision:
            group, base = prev[2], prev[3]
        else:
            group = base = _UNPLACED
            ids = np.fromiter((e[2] for e in entries), dtype=np.uint32, count=len(entries))
            weights = [e[1] for e in entries]
            if consistent:
                self.maglev.setdefault(size, []).append(
                    (key, [e[0] for e in entries], weights, ids))
            else:
                self.tables[key] = _to_ids(proportional(tuple(weights), size), ids, size)
        flags = abi.SVC_F_SATURATED if svc.saturated else 0
        if self.fleet and consistent:
            flags |= abi.SVC_F_FLEET
        value = (svc_id, size, group, base, svc.affinity_timeout, eps_milli,
                 round(svc.probe_share * 1000), _KAFF[svc.affinity], flags, len(svc.backends),
                 _move_milli(svc.move_epsilon), revision,
                 hashing.svc_ident(svc.vip, svc.port, svc.protocol))
        mean = sum(loads) // len(loads) if loads else 0
        return value, members, mean

    def build(self) -> float:
        started = time.perf_counter()
        for size, group in self.maglev.items():
            built = maglev.build_many([(idents, weights) for _, idents, weights, _ in group],
                                      size, self.seed)
            for (key, _, _, ids), idx in zip(group, built, strict=True):
                self.tables[key] = _to_ids(idx, ids, size)
        return time.perf_counter() - started


def _trip_ends(was: BeVal | None, state: model.BackendState) -> bool:
    # User space closed (or half-opened) the breaker: that also ends a trip the kernel
    # made on its own.
    return was is not None and was[3] == abi.BackendState.OPEN and state in _IN_TABLE


def plan(desired: model.DesiredState, current: View, seed: int,
         live_loads: Mapping[L4, int] | None = None, fleet: bool = False) -> Plan:
    """Compute the target maps of the whole desired state and what differs from
    `current`. Pure.

    `live_loads` (endpoint -> load) are the engines' latest loads (the agent's own
    scrapes and the controller's load messages); they win over a desired state's.
    `fleet`: the node follows a controller, so services with affinity get
    SVC_F_FLEET (their bindings are fleet-wide).
    """
    target = View()
    live_loads = live_loads or {}
    refs, eps_of = endpoint_refs(desired.services)
    alts: dict[L4, int] = {}
    for svc in desired.services:
        _alts(svc, eps_of[svc.name], alts)
    be_ids = _alloc(list(refs), current.be_addr, set(current.backends))
    usable: dict[L4, bool] = {}
    trips_clear = []
    for ep, be_id in be_ids.items():
        state, load = _merged(refs[ep])
        usable[ep] = state in _IN_TABLE
        target.backends[be_id] = (*ep, _KSTATE[state], alts.get(ep, 0))
        target.be_addr[ep] = be_id
        if _trip_ends(current.backends.get(be_id), state):
            trips_clear.append(be_id)
        load = live_loads.get(ep, load)
        if load:
            target.be_load[be_id] = load

    svc_keys = [_service_key(s) for s in desired.services]
    current_ids = {k: v[0] for k, v in current.services.items()}
    svc_ids = _alloc(svc_keys, current_ids, set(current_ids.values()))
    tables = _Tables(seed, fleet)
    for svc, key in zip(desired.services, svc_keys, strict=True):
        svc_id = svc_ids[key]
        value, members, mean = tables.service(
            svc, key, svc_id, eps_of[svc.name], be_ids.__getitem__, usable.__getitem__,
            lambda be_id: target.be_load.get(be_id, 0), current.services.get(key))
        target.services[key] = value
        target.aliases.update(_aliases(svc, key))
        target.names[svc_id] = svc.name
        target.members.update(members)
        if mean:
            target.svc_load[svc_id] = mean
    build_seconds = tables.build()
    diffs = {name: _diff(getattr(current, name), getattr(target, name)) for name in _MAPS}
    return Plan(
        target=target, diffs=diffs, tables=tables.tables,
        gone_services=sorted(set(current.names) - set(target.names)),
        gone_backends=sorted(set(current.backends) - set(target.backends)),
        trips_clear=trips_clear, build_seconds=build_seconds, refs=refs)


def plan_changes(before: model.DesiredState, after: model.DesiredState,
                 names: Iterable[str], current: View, refs: Refs, seed: int,
                 live_loads: Mapping[L4, int] | None = None, fleet: bool = False) -> Plan:
    """What turns the maps of ``before`` (``current``, with ``refs`` its endpoint_refs)
    into those of ``after``, when only the services in ``names`` differ. Pure. Touches
    only those services, their endpoints, and the services that share an endpoint whose
    state or load moved (Katran's modifyRealsForVip writes only what one VIP changed),
    so a one-service delta in a fleet of 10,000 costs what one service costs.

    The plan's ``refs`` holds the new entries of the endpoints it touched (an empty
    mapping: nobody lists it any more), ``target`` only the services it rewrote.
    """
    live_loads = live_loads or {}
    old, new = before.by_name, after.by_name
    names = set(names)
    touched: Refs = {}
    for name in names:
        for svc, listed in ((old.get(name), False), (new.get(name), True)):
            if svc is None:
                continue
            for be, ep in zip(svc.backends, _endpoints(svc), strict=True):
                users = touched.get(ep)
                if users is None:
                    users = touched[ep] = dict(refs.get(ep, {}))
                if listed:
                    users[name] = (be.state, be.load)
                else:
                    users.pop(name, None)

    diffs = {name: Diff(put={}, delete=[]) for name in _MAPS}
    d_be, d_load = diffs["backends"], diffs["be_load"]
    be_ids: dict[L4, int] = {}
    usable: dict[L4, bool] = {}
    be_load: dict[int, int] = {}
    gone_backends, trips_clear = [], []
    next_be = max(current.backends, default=0) + 1
    replan = set(names)
    for ep, users in touched.items():
        be_id = current.be_addr.get(ep)
        if not users:
            if be_id is not None:
                d_be.delete.append(be_id)
                if be_id in current.be_load:
                    d_load.delete.append(be_id)
                gone_backends.append(be_id)
            continue
        if be_id is None:
            be_id, next_be = next_be, next_be + 1
        be_ids[ep] = be_id
        state, load = _merged(users)
        usable[ep] = state in _IN_TABLE
        was = current.backends.get(be_id)
        row = (*ep, _KSTATE[state], _alt_of(ep, users, new))
        if was != row:
            d_be.put[be_id] = row
            if _trip_ends(was, state):
                trips_clear.append(be_id)
        load = live_loads.get(ep, load)
        be_load[be_id] = load
        if load != current.be_load.get(be_id, 0):
            if load:
                d_load.put[be_id] = load
            else:
                d_load.delete.append(be_id)
        if was != row or load != current.be_load.get(be_id, 0):
            # Other services listing this endpoint see its new state or load.
            replan.update(users)
            replan.update(refs.get(ep, {}))

    def be_id_of(ep: L4) -> int:
        return be_ids[ep] if ep in be_ids else current.be_addr[ep]

    def usable_of(ep: L4) -> bool:
        if ep in usable:
            return usable[ep]
        return current.backends[current.be_addr[ep]][3] in _USABLE_KSTATES

    def load_of(be_id: int) -> int:
        return be_load[be_id] if be_id in be_load else current.be_load.get(be_id, 0)

    target = View()
    tables = _Tables(seed, fleet)
    gone_services = []
    next_svc = max(current.names, default=0) + 1
    for name in sorted(replan):
        svc_old, svc_new = old.get(name), new.get(name)
        old_key = _service_key(svc_old) if svc_old is not None else None
        old_val = current.services.get(old_key) if old_key is not None else None
        key = _service_key(svc_new) if svc_new is not None else None
        old_members: dict[tuple[int, int], int] = {}
        if old_val is not None and svc_old is not None:
            old_members = {(old_val[0], current.be_addr[ep]): be.weight for be, ep in
                           zip(svc_old.backends, _endpoints(svc_old), strict=True)}
        old_aliases = _aliases(svc_old, old_key) if svc_old is not None and old_key else {}
        new_aliases = _aliases(svc_new, key) if svc_new is not None and key else {}
        if old_val is None:
            old_aliases = {}
        _diff_into(diffs["aliases"], old_aliases, new_aliases)
        target.aliases.update(new_aliases)
        if old_val is not None and key != old_key:  # removed, or moved to another VIP
            assert old_key is not None
            diffs["services"].delete.append(old_key)
            diffs["names"].delete.append(old_val[0])
            if old_val[0] in current.svc_load:
                diffs["svc_load"].delete.append(old_val[0])
            gone_services.append(old_val[0])
            diffs["members"].delete.extend(old_members)
            old_members = {}
        if svc_new is None or key is None:
            continue
        if old_val is not None and key == old_key:
            svc_id = old_val[0]
        else:
            svc_id, next_svc = next_svc, next_svc + 1
            old_members = {}
            diffs["names"].put[svc_id] = name
        eps = _endpoints(svc_new)
        value, members, mean = tables.service(
            svc_new, key, svc_id, eps, be_id_of, usable_of, load_of,
            old_val if key == old_key else None)
        target.services[key] = value
        if current.services.get(key) != value:
            diffs["services"].put[key] = value
        _diff_into(diffs["members"], old_members, members)
        if mean != current.svc_load.get(svc_id, 0):
            if mean:
                diffs["svc_load"].put[svc_id] = mean
            else:
                diffs["svc_load"].delete.append(svc_id)
    # A VIP one service leaves and another takes in the same change is written, not removed.
    written = set(diffs["services"].put) | set(diffs["aliases"].put)
    diffs["services"].delete = [k for k in diffs["services"].delete if k not in written]
    diffs["aliases"].delete = [k for k in diffs["aliases"].delete if k not in written]
    build_seconds = tables.build()
    return Plan(target=target, diffs=diffs, tables=tables.tables,
                gone_services=sorted(gone_services), gone_backends=sorted(gone_backends),
                trips_clear=trips_clear, build_seconds=build_seconds, refs=touched)


def _alt_of(ep: L4, users: Mapping[str, Any], services: Mapping[str, model.Service]) -> int:
    """An endpoint's IPv6 address as a full plan gives it (see _alts): from the first
    service by name that lists it with one; 0 if none does."""
    for name in sorted(users):
        svc = services[name]
        for be in svc.backends:
            if be.address6_number and _l4(be.key[0], be.port, svc.protocol) == ep:
                return be.address6_number
    return 0


def _diff_into(diff: Diff, before: Mapping[Any, Any], after: Mapping[Any, Any]) -> None:
    diff.put.update({k: v for k, v in after.items() if before.get(k) != v})
    diff.delete.extend(k for k in before if k not in after)


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
_ADDR_DT = np.dtype(np.uint32)  # __be32 words, read natively as ctypes reads them
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


def _words(addrs: Iterable[int], width: int) -> np.ndarray:
    """Addresses -> rows of network-order __be32 words (``width`` bytes each)."""
    raw = b"".join(a.to_bytes(width, "big") for a in addrs)
    return np.frombuffer(raw, dtype=_ADDR_DT).reshape(-1, width // 4)


def _l4_array(keys: list[L4]) -> np.ndarray:
    arr = _records([k[1:] for k in keys], _DT_L4, ("port", "proto"))
    if keys:
        arr["addr"] = _words((k[0] for k in keys), 16)
    return arr


def _be_array(rows: list[BeVal]) -> np.ndarray:
    """kvr_backend values: an IPv4 endpoint fills addr4 (and addr6 with a dual-stack
    pod's IPv6 address), an IPv6 one addr6."""
    arr = _records([r[1:4] for r in rows], _DT_BE, ("port", "proto", "state"))
    if rows:
        v4 = [model.is_v4(r[0]) for r in rows]
        arr["addr4"] = _words((r[0] & 0xFFFFFFFF if is4 else 0 for r, is4 in zip(rows, v4,
                                                                                  strict=True)),
                              4)[:, 0]
        arr["addr6"] = _words((r[4] if is4 else r[0] for r, is4 in zip(rows, v4, strict=True)),
                              16)
    return arr


def _member_array(keys: list[tuple[int, int]]) -> np.ndarray:
    return _records(keys, _DT_MEMBER, ("svc_id", "be_id"))


def _u32(values: Any) -> np.ndarray:
    return np.fromiter(values, dtype=_U32)


def _name_rows(names: Sequence[str]) -> np.ndarray:
    raw = b"".join(n.encode()[:63].ljust(_DT_NAME.itemsize, b"\0") for n in names)
    return np.frombuffer(raw, dtype=np.uint8).reshape(-1, _DT_NAME.itemsize)


# Each user-space-owned View field: its kernel map and how its keys and values are packed.
_CODECS: dict[str, tuple[str, Callable[[list[Any]], np.ndarray],
                         Callable[[list[Any]], np.ndarray]]] = {
    "backends": ("kvr_be_v2", _u32, _be_array),
    "be_load": ("kvr_be_load", _u32, _u32),
    "svc_load": ("kvr_svc_load", _u32, _u32),
    "members": ("kvr_member", _member_array, _u32),
    "names": ("kvr_svc_name", _u32, _name_rows),
    "services": ("kvr_svc_v2", _l4_array, lambda rows: _records(rows, _DT_SVC, _SVC_FIELDS)),
    # a dual-stack service's second VIP: the same map and value as its first VIP's
    "aliases": ("kvr_svc_v2", _l4_array, lambda rows: _records(rows, _DT_SVC, _SVC_FIELDS)),
}


def _put(maps: MapSet, field: str, entries: Mapping[Any, Any]) -> None:
    mapname, keys, values = _CODECS[field]
    bpfsys.update_batch(maps.fd(mapname), keys(list(entries)), values(list(entries.values())))


def _delete_present(maps: MapSet, name: str, ids: list[int]) -> None:
    fd = maps.fd(name)
    for i in ids:
        bpfsys.delete(fd, abi.ct.c_uint32(i))


class ApplyError(RuntimeError):
    """A write to the maps failed. ``rolled_back``: the maps hold what they held before
    (retry the apply); otherwise the undo failed too and the applier re-read the maps."""

    def __init__(self, message: str, rolled_back: bool) -> None:
        super().__init__(message)
        self.rolled_back = rolled_back


class _Journal:
    """The writes of one change to the user-space-owned maps, undone newest first on
    failure, each key back to what the view the change started from holds (the caller
    changes that view only once every write succeeded, so the forward path pays nothing
    for the undo). The forward order is connect-safe (what a value names is written
    before the value), so its reverse is too: services go back to their old tables
    before anything only the new ones name goes away."""

    def __init__(self, maps: MapSet, current: View) -> None:
        self.maps = maps
        self.current = current
        self._undo: list[Callable[[], None]] = []

    def put(self, field: str, entries: Mapping[Any, Any]) -> None:
        if not entries:
            return
        self._undo.append(functools.partial(self._restore, field, entries.keys()))
        _put(self.maps, field, entries)

    def delete(self, field: str, keys: Sequence[Any]) -> None:
        if not keys:
            return
        self._undo.append(functools.partial(self._restore, field, keys))
        mapname, pack, _ = _CODECS[field]
        bpfsys.delete_batch(self.maps.fd(mapname), pack(list(keys)))

    def undo_with(self, step: Callable[[], None]) -> None:
        """Undo ``step`` at this point of the order (the table pool's own rollback)."""
        self._undo.append(step)

    def _before(self, field: str) -> Mapping[Any, Any]:
        if field == "aliases":  # the view keeps alias -> first VIP; the kernel, the value
            return {alias: self.current.services[first]
                    for alias, first in self.current.aliases.items()}
        before: Mapping[Any, Any] = getattr(self.current, field)
        return before

    def _restore(self, field: str, keys: Iterable[Any]) -> None:
        before = self._before(field)
        old = {k: before[k] for k in keys if k in before}
        new = [k for k in keys if k not in before]
        # A batch cut short wrote only some keys: remove the new ones present or not.
        if new:
            mapname, pack, _ = _CODECS[field]
            bpfsys.delete_each(self.maps.fd(mapname), pack(new))
        if old:
            _put(self.maps, field, old)

    def rollback(self) -> list[str]:
        """Undo every step, newest first; the steps that could not be undone."""
        failed = []
        for step in reversed(self._undo):
            try:
                step()
            except OSError as exc:
                failed.append(str(exc))
        self._undo.clear()
        return failed


@dataclasses.dataclass
class ApplyResult:
    summary: dict[str, int]
    build_seconds: float
    write_seconds: float
    # Removing kernel-made entries (counters, health, affinity) of what the change removed
    # failed: routing is as desired; the applier runs ``leftover`` first thing next time.
    cleanup_error: str | None = None
    leftover: Cleanup | None = None


@dataclasses.dataclass
class Cleanup:
    """Kernel-made entries to remove once the change that made them stale is written:
    trips user space ended, and what the kernel keeps for removed services and backends."""

    trips_clear: list[int] = dataclasses.field(default_factory=list)
    gone_services: list[int] = dataclasses.field(default_factory=list)
    gone_backends: list[int] = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.trips_clear or self.gone_services or self.gone_backends)

    def run(self, maps: MapSet) -> None:
        """Idempotent: absent entries are fine, so a cleanup cut short is run again whole."""
        _delete_present(maps, "kvr_health", self.trips_clear)
        if self.gone_services:
            _delete_present(maps, "kvr_svc_cnt_v3", self.gone_services)
            _purge_affinity(maps, set(self.gone_services))
        for name in ("kvr_health", "kvr_be_cnt", "kvr_be_sess"):
            _delete_present(maps, name, self.gone_backends)


# Maps a change may grow, by View field: checked against the kernel's max_entries before
# the first write, since every new entry is written before any old one is removed.
_GROWN = ("backends", "be_load", "svc_load", "members", "names", "services", "aliases")


def check_room(p: Plan, maps: MapSet, current: View) -> None:
    """Raise :class:`model.ModelError` when a map would overflow part-way through the
    change: the new entries are all written before the old ones go, so a map holds both
    for a moment (what :func:`model.check_capacity` checks is the end state only). Fields
    sharing a map (a service's first and second VIPs) count together."""
    held: dict[str, int] = {}
    added: dict[str, int] = {}
    for field in _GROWN:
        before = getattr(current, field)
        mapname = _CODECS[field][0]
        held[mapname] = held.get(mapname, 0) + len(before)
        added[mapname] = added.get(mapname, 0) + sum(1 for k in p.diffs[field].put
                                                     if k not in before)
    problems = []
    for mapname, extra in added.items():
        peak, limit = held[mapname] + extra, maps.max_entries(mapname)
        if extra and peak > limit:
            problems.append(f"{mapname}: the change holds {peak} entries at once (the "
                            f"{held[mapname]} there now and the new ones written before the "
                            f"old go), more than the map's {limit}; apply it in smaller steps")
    if problems:
        raise model.ModelError(problems)


def execute(p: Plan, maps: MapSet, pool: TablePool, current: View) -> ApplyResult:
    """Write a plan's difference to the maps, in a connect-safe order. Fills in where
    each new table went (p.target.services).

    All or nothing for what routing reads: a write that fails is undone with everything
    written before it, newest first (see :class:`_Journal`), and :class:`ApplyError` is
    raised. The kernel-made entries of what the change removed go last, once routing is
    as desired; their removal failing is reported in the result, not undone."""
    started = time.perf_counter()
    check_room(p, maps, current)
    journal = _Journal(maps, current)
    pool.begin()
    try:
        released = _write(p, journal, pool, current)
    except OSError as exc:
        failed = journal.rollback()
        try:
            pool.rollback()  # a no-op once the journal did it; ends the pool's change
        except OSError as undo:
            failed.append(str(undo))
        if failed:
            raise ApplyError(f"writing the maps failed ({exc}), and so did undoing it "
                             f"({'; '.join(failed)}): the maps were re-read, the next apply "
                             f"plans from what they hold", rolled_back=False) from None
        raise ApplyError(f"writing the maps failed ({exc}): every write was undone, the "
                         f"maps hold the previous state", rolled_back=True) from None
    pool.commit()
    for group, base in released:
        pool.release(group, base)
    result = ApplyResult(p.summary(), p.build_seconds, 0.0)
    cleanup = Cleanup(p.trips_clear, p.gone_services, p.gone_backends)
    try:
        cleanup.run(maps)
    except OSError as exc:
        result.cleanup_error, result.leftover = str(exc), cleanup
    try:
        pool.collect()  # empty groups; any left are collected by a later change
    except OSError as exc:
        result.cleanup_error = result.cleanup_error or str(exc)
    result.write_seconds = time.perf_counter() - started
    return result


def _write(p: Plan, journal: _Journal, pool: TablePool, current: View
           ) -> list[tuple[int, int]]:
    """The writes of execute, in order; the table regions the change gave up."""
    d = p.diffs
    # 1. Backends, loads and memberships: nothing names a new one yet.
    journal.put("backends", d["backends"].put)
    journal.put("be_load", d["be_load"].put)
    journal.put("svc_load", d["svc_load"].put)
    journal.put("members", d["members"].put)

    # 2. New tables into free regions; the service values below publish them.
    journal.undo_with(pool.rollback)
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
    # A second VIP holds its first VIP's value: written whenever that changes.
    aliases = {alias: p.target.services[first] for alias, first in d["aliases"].put.items()}
    aliases.update({alias: services[first] for alias, first in p.target.aliases.items()
                    if first in services})
    journal.put("names", d["names"].put)
    journal.put("services", services)
    journal.put("aliases", aliases)

    # 4. Removals: services first (no new connect can reach them), then what they used.
    journal.delete("aliases", d["aliases"].delete)
    journal.delete("services", d["services"].delete)
    released.extend((current.services[k][2], current.services[k][3])
                    for k in d["services"].delete)
    for field in ("names", "svc_load", "members", "backends", "be_load"):
        journal.delete(field, d[field].delete)
    return released


def _purge_affinity(maps: MapSet, svc_ids: set[int]) -> None:
    """Forget the sessions of removed services, so a service that later gets the
    same id starts clean. Removals are rare; the LRU walk is the price."""
    stale = [k for k in maps.keys("kvr_affinity", abi.AffKey) if k.svc_id in svc_ids]
    for key in stale:
        bpfsys.delete(maps.fd("kvr_affinity"), key)


def read_view(maps: MapSet) -> View:
    """What the maps hold now: a restarted agent starts its diff from here."""
    view = View()
    by_id: dict[int, list[L4]] = {}
    for key, svc in maps.items("kvr_svc_v2", abi.L4Key, abi.Svc):
        l4 = (abi.from_words(key.addr), key.port, key.proto)
        view.services[l4] = tuple(getattr(svc, f) for f in _SVC_FIELDS)
        by_id.setdefault(svc.id, []).append(l4)
    for keys in by_id.values():
        # A dual-stack service's first VIP is its IPv4 one (model.Service.vip6).
        keys.sort(key=lambda k: not model.is_v4(k[0]))
        for alias in keys[1:]:
            view.aliases[alias] = keys[0]
            del view.services[alias]
    for k, name in maps.items("kvr_svc_name", abi.ct.c_uint32, abi.SvcName):
        view.names[k.value] = name.name.decode()
    for k, be in maps.items("kvr_be_v2", abi.ct.c_uint32, abi.Backend):
        v6 = abi.from_words(be.addr6)
        if be.addr4:
            addr, alt = abi.addr128(abi.be32_to_ip(be.addr4)), v6
        else:
            addr, alt = v6, 0
        view.backends[k.value] = (addr, be.port, be.proto, be.state, alt)
        view.be_addr[(addr, be.port, be.proto)] = k.value
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
    return _l4(abi.addr128(address), port, proto)


class Applier:
    """The agent's handle on the maps: its view of them, the table groups, the desired
    state they hold, and the engines' live loads. Thread-safe.

    An apply plans only the services that differ from the state applied before (by
    object identity first, which is free for a snapshot rebuilt from a delta), unless
    so many differ that a full plan is as cheap; a restarted agent's first apply is full.
    """

    # Past this share of services changed, one full plan beats per-service bookkeeping.
    FULL_PLAN_SHARE = 0.25

    def __init__(self, maps: MapSet, seed: int, max_services: int = model.MAX_SERVICES,
                 max_backends: int = model.MAX_BACKENDS, fleet: bool = False) -> None:
        self.maps = maps
        self.seed = seed
        self.fleet = fleet  # services with affinity get SVC_F_FLEET (see plan)
        self.capacity = (max_services, max_backends)
        self.lock = threading.Lock()
        self.view = read_view(maps)
        self.pool = TablePool(maps)
        self.pool.adopt(svc for _, svc in maps.items("kvr_svc_v2", abi.L4Key, abi.Svc))
        self.live_loads: dict[L4, int] = {}
        self.desired: model.DesiredState | None = None
        self.refs: Refs = {}
        self.leftover = Cleanup()  # kernel-made entries a change failed to remove

    def changed(self, desired: model.DesiredState) -> set[str] | None:
        """Names of the services that differ from the applied state; None: plan it all."""
        if self.desired is None:
            return None
        old, new = self.desired.by_name, desired.by_name
        names = {n for n, s in new.items() if (o := old.get(n)) is not s and o != s}
        names.update(n for n in old if n not in new)
        if len(names) > max(16, self.FULL_PLAN_SHARE * len(new)):
            return None
        return names

    def apply(self, desired: model.DesiredState) -> ApplyResult:
        """Raises :class:`model.ModelError`, writing nothing, for a state the maps cannot
        hold, and :class:`ApplyError` when a write failed: the maps and this applier then
        keep the state applied before, and applying again retries."""
        model.check_capacity(desired, *self.capacity)
        with self.lock:
            if self.leftover:
                # Before any plan: it may give a new object an id whose old entries these are.
                try:
                    self.leftover.run(self.maps)
                except OSError as exc:
                    raise ApplyError(f"removing the kernel's entries of removed services "
                                     f"and backends failed ({exc}); nothing else was "
                                     f"written", rolled_back=True) from None
                self.leftover = Cleanup()
            names = self.changed(desired)
            if names is None:
                p = plan(desired, self.view, self.seed, self.live_loads, self.fleet)
            else:
                assert self.desired is not None
                p = plan_changes(self.desired, desired, names, self.view, self.refs,
                                 self.seed, self.live_loads, self.fleet)
            try:
                result = execute(p, self.maps, self.pool, self.view)
            except ApplyError as exc:
                if not exc.rolled_back:
                    self._reread()
                raise
            if names is None:
                self.view, self.refs = p.target, p.refs
            else:
                self._patch(p)
            self.desired = desired
            if result.leftover is not None:
                self.leftover = result.leftover
            return result

    def _reread(self) -> None:
        """Start over from what the maps hold, as a restarted agent does: the next apply
        is a full plan against them."""
        self.view = read_view(self.maps)
        self.pool.close()
        self.pool = TablePool(self.maps)
        self.pool.adopt(svc for _, svc in self.maps.items("kvr_svc_v2", abi.L4Key, abi.Svc))
        self.desired = None
        self.refs = {}

    def _patch(self, p: Plan) -> None:
        """Bring the view and refs to what an incremental plan wrote."""
        view = self.view
        for be_id in p.diffs["backends"].delete:
            row = view.backends.pop(be_id)
            view.be_addr.pop(row[:3], None)
        for be_id, row in p.diffs["backends"].put.items():
            view.backends[be_id] = row
            view.be_addr[row[:3]] = be_id
        for name in ("members", "be_load", "svc_load", "names", "services", "aliases"):
            target = getattr(view, name)
            for key in p.diffs[name].delete:
                target.pop(key, None)
            target.update(p.diffs[name].put)
        for ep, users in p.refs.items():
            if users:
                self.refs[ep] = users
            else:
                self.refs.pop(ep, None)

    def service_id(self, name: str) -> int | None:
        """The kernel id of an applied service, by name (call under ``lock``)."""
        svc = self.desired.by_name.get(name) if self.desired is not None else None
        value = self.view.services.get(_service_key(svc)) if svc is not None else None
        return value[0] if value is not None else None

    def backend_id(self, identity: str) -> int | None:
        """The kernel id of a backend, by identity (call under ``lock``)."""
        return self.view.be_addr.get(parse_identity(identity))

    def set_loads(self, loads: Mapping[str, int]) -> int:
        """Write engines' live loads (by backend identity) and their services' mean
        loads straight into the kernel, without a plan: the bounded-load check sees a
        load change as soon as it is known. Costs what the services listing the changed
        engines cost, whatever the fleet's size. Returns entries written."""
        with self.lock:
            view = self.view
            changed_be: dict[int, int] = {}
            touched: set[str] = set()
            for ident, load in loads.items():
                key = parse_identity(ident)
                self.live_loads[key] = load
                be_id = view.be_addr.get(key)
                if be_id is not None and view.be_load.get(be_id, 0) != load:
                    changed_be[be_id] = load
                    touched.update(self.refs.get(key, ()))
            if not changed_be:
                return 0

            def load_of(be_id: int) -> int:
                return changed_be[be_id] if be_id in changed_be else view.be_load.get(be_id, 0)

            means: dict[int, int] = {}
            by_name = self.desired.by_name if self.desired is not None else {}
            for name in touched:
                svc = by_name.get(name)
                value = view.services.get(_service_key(svc)) if svc is not None else None
                if svc is None or value is None:
                    continue
                usable = []
                for ep in _endpoints(svc):
                    be_id = view.be_addr[ep]
                    if view.backends[be_id][3] in _USABLE_KSTATES:
                        usable.append(load_of(be_id))
                if usable:
                    means[value[0]] = sum(usable) // len(usable)
            zero = [be_id for be_id, load in changed_be.items() if not load]
            put = {be_id: load for be_id, load in changed_be.items() if load}
            # The view changes only once the kernel took every write (or none).
            journal = _Journal(self.maps, view)
            try:
                journal.put("be_load", put)
                journal.delete("be_load", zero)
                journal.put("svc_load", means)
            except OSError as exc:
                failed = journal.rollback()
                if failed:
                    self._reread()
                raise ApplyError(f"writing engine loads failed ({exc})"
                                 + (f", and so did undoing it ({'; '.join(failed)})"
                                    if failed else "; nothing changed"),
                                 rolled_back=not failed) from None
            view.be_load.update(put)
            for be_id in zero:
                del view.be_load[be_id]
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
