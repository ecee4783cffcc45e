"""Desired state -> kernel maps.

`plan` is pure: from the validated desired state and what the maps hold now
it computes the target contents of every map (ids, values, Maglev tables) and
the difference. `execute` writes only that difference, with batch updates, in
an order that keeps every connect() consistent: backends before the tables
that name them, tables before the services that use them, removals last.
Nothing is written before the whole plan exists, so bad input changes nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import struct
import time
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np

from dataplane import abi, bpfsys, config, maglev
from dataplane.maps import MapSet

# Raw map keys and values as tuples of the C fields, in declaration order.
L4 = tuple[int, int, int]                               # kvr_l4_key minus pad
SvcVal = tuple[int, int, int, int, int, int, int, int, int]  # kvr_svc minus pad
BeVal = tuple[int, int, int, int]                       # kvr_backend

# A backend serving several services with different states takes the most
# restrictive one: an endpoint is one pod, whatever Service names it.
_SEVERITY = {
    config.BackendState.ACTIVE: 0, config.BackendState.PROBING: 1,
    config.BackendState.DRAINING: 2, config.BackendState.OPEN: 3,
}
_KSTATE = {
    config.BackendState.ACTIVE: abi.BackendState.ACTIVE,
    config.BackendState.DRAINING: abi.BackendState.DRAINING,
    config.BackendState.OPEN: abi.BackendState.OPEN,
    config.BackendState.PROBING: abi.BackendState.PROBING,
}
_KAFF = {
    config.Affinity.NONE: abi.Affinity.NONE,
    config.Affinity.CLIENT: abi.Affinity.CLIENT,
    config.Affinity.SESSION: abi.Affinity.SESSION,
}
# Only these states get Maglev slots; draining and open backends are left out
# of the table, which moves only their own keys.
_IN_TABLE = (config.BackendState.ACTIVE, config.BackendState.PROBING)


@dataclasses.dataclass
class View:
    """The user-space-owned contents of the maps (kernel-owned ones are not diffed)."""

    services: dict[L4, SvcVal] = dataclasses.field(default_factory=dict)
    names: dict[int, str] = dataclasses.field(default_factory=dict)
    backends: dict[int, BeVal] = dataclasses.field(default_factory=dict)
    be_addr: dict[L4, int] = dataclasses.field(default_factory=dict)
    members: dict[tuple[int, int], int] = dataclasses.field(default_factory=dict)
    be_load: dict[int, int] = dataclasses.field(default_factory=dict)
    svc_load: dict[int, int] = dataclasses.field(default_factory=dict)
    tables: set[int] = dataclasses.field(default_factory=set)


@dataclasses.dataclass
class Diff:
    put: dict[Any, Any]
    delete: list[Any]


@dataclasses.dataclass
class Plan:
    target: View
    diffs: dict[str, Diff]
    tables: dict[int, np.ndarray]           # svc id -> backend ids by slot, to build and swap
    tables_delete: list[int]
    new_services: list[int]                 # ids that need counter entries
    new_backends: list[int]                 # ids that need counter and health entries
    gone_services: list[int]
    gone_backends: list[int]
    build_seconds: float

    @property
    def empty(self) -> bool:
        return not (self.tables or self.tables_delete or any(
            d.put or d.delete for d in self.diffs.values()))

    def summary(self) -> dict[str, int]:
        out = {f"{name}_put": len(d.put) for name, d in self.diffs.items() if d.put}
        out.update({f"{name}_delete": len(d.delete) for name, d in self.diffs.items() if d.delete})
        if self.tables:
            out["tables_built"] = len(self.tables)
        if self.tables_delete:
            out["tables_delete"] = len(self.tables_delete)
        return out


def identity(svc: config.Service, be: config.Backend) -> str:
    """A backend's name for Maglev: the same string on every node."""
    return f"{be.address}:{be.port}/{svc.protocol}"


def _l4(addr: Any, port: int, proto: str) -> L4:
    return (abi.ip_to_be32(addr), abi.port_to_be16(port), abi.IPPROTO[proto])


def _alloc(wanted: list[Hashable], existing: Mapping[Hashable, int], taken: set[int]
           ) -> dict[Hashable, int]:
    """Keep existing ids; give new objects the lowest ids never in use in this
    apply (an id freed now is not reused now: affinity entries may still name it)."""
    out: dict[Hashable, int] = {}
    nxt = 1
    for obj in wanted:
        if obj in existing:
            out[obj] = existing[obj]
            continue
        while nxt in taken:
            nxt += 1
        out[obj] = nxt
        taken.add(nxt)
    return out


def _revision(size: int, seed: int, entries: list[tuple[str, int, int]]) -> int:
    h = hashlib.blake2b(digest_size=8)
    h.update(struct.pack("=IQ", size, seed))
    for ident, weight, be_id in entries:
        h.update(f"{ident}|{weight}|{be_id};".encode())
    return int.from_bytes(h.digest(), "little")


def plan(desired: config.DesiredState, current: View, seed: int) -> Plan:
    """Compute the target maps and what differs from `current`. Pure."""
    target = View()

    # Endpoints: one backend id per (address, port, protocol), shared by services.
    ep_state: dict[L4, config.BackendState] = {}
    ep_load: dict[L4, int] = {}
    order: list[Hashable] = []
    for svc in desired.services:
        for be in svc.backends:
            key = _l4(be.address, be.port, svc.protocol)
            if key not in ep_state:
                order.append(key)
                ep_state[key] = be.state
                ep_load[key] = be.load
            else:
                if _SEVERITY[be.state] > _SEVERITY[ep_state[key]]:
                    ep_state[key] = be.state
                ep_load[key] = max(ep_load[key], be.load)
    be_ids = _alloc(order, current.be_addr, set(current.backends))
    for key, be_id in be_ids.items():
        addr, port, proto = key  # type: ignore[misc]
        target.backends[be_id] = (addr, port, proto, int(_KSTATE[ep_state[key]]))  # type: ignore[index]
        target.be_addr[key] = be_id  # type: ignore[index]
        if ep_load[key]:  # type: ignore[index]
            target.be_load[be_id] = ep_load[key]  # type: ignore[index]

    current_svc_ids = {k: v[0] for k, v in current.services.items()}
    svc_keys = [_l4(s.vip, s.port, s.protocol) for s in desired.services]
    svc_ids = _alloc(list(svc_keys), current_svc_ids, {v[0] for v in current.services.values()})

    # Maglev inputs per service, grouped by table size for batched builds.
    groups: dict[int, list[tuple[int, list[str], list[int], list[int]]]] = {}
    tables: dict[int, np.ndarray] = {}
    for svc, key in zip(desired.services, svc_keys, strict=True):
        svc_id = svc_ids[key]
        entries = []
        loads = []
        for be in svc.backends:
            ep = _l4(be.address, be.port, svc.protocol)
            be_id = be_ids[ep]
            state = ep_state[ep]
            weight = be.weight if state in _IN_TABLE else 0
            entries.append((identity(svc, be), weight, be_id))
            target.members[(svc_id, be_id)] = be.weight
            if state in _IN_TABLE:
                loads.append(target.be_load.get(be_id, 0))
        entries.sort()
        revision = _revision(svc.table_size, seed, entries)
        eps = abi.EPS_OFF if svc.epsilon is None else min(round(svc.epsilon * 1000), 0xFFFE)
        target.services[key] = (
            svc_id, svc.table_size, svc.affinity_timeout, eps, round(svc.probe_share * 1000),
            int(_KAFF[svc.affinity]), 0, len(svc.backends), revision)
        target.names[svc_id] = svc.name
        target.tables.add(svc_id)
        if loads and sum(loads):
            target.svc_load[svc_id] = sum(loads) // len(loads)
        old = current.services.get(key)
        if old is None or old[0] != svc_id or old[8] != revision or svc_id not in current.tables:
            groups.setdefault(svc.table_size, []).append(
                (svc_id, [e[0] for e in entries], [e[1] for e in entries], [e[2] for e in entries]))

    started = time.perf_counter()
    for size, members in groups.items():
        built = maglev.build_many([(idents, weights) for _, idents, weights, _ in members],
                                  size, seed)
        for (svc_id, _, _, ids), idx in zip(members, built, strict=True):
            if len(idx) == 0:
                # No backend may take a slot: every entry names no backend, so
                # connects fail fast with ECONNREFUSED.
                tables[svc_id] = np.full(size, abi.NO_BACKEND, dtype=np.uint32)
            else:
                tables[svc_id] = np.asarray(ids, dtype=np.uint32)[idx]
    build_seconds = time.perf_counter() - started

    diffs = {
        name: _diff(getattr(current, name), getattr(target, name))
        for name in ("backends", "be_addr", "members", "be_load", "svc_load", "names", "services")
    }
    return Plan(
        target=target, diffs=diffs, tables=tables,
        tables_delete=sorted(current.tables - target.tables),
        new_services=sorted(set(target.names) - set(current.names)),
        new_backends=sorted(set(target.backends) - set(current.backends)),
        gone_services=sorted(set(current.names) - set(target.names)),
        gone_backends=sorted(set(current.backends) - set(target.backends)),
        build_seconds=build_seconds,
    )


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


def _l4_array(keys: list[L4]) -> np.ndarray:
    arr = np.zeros(len(keys), dtype=_DT_L4)
    if keys:
        cols = np.array(keys, dtype=np.int64).reshape(-1, 3)
        arr["addr"], arr["port"], arr["proto"] = cols[:, 0], cols[:, 1], cols[:, 2]
    return arr


def _svc_array(vals: list[SvcVal]) -> np.ndarray:
    arr = np.zeros(len(vals), dtype=_DT_SVC)
    if vals:
        cols = np.array(vals, dtype=np.uint64).reshape(-1, 9)
        for i, field in enumerate(("id", "table_size", "aff_timeout", "eps_milli", "probe_milli",
                                   "affinity", "flags", "n_backends", "revision")):
            arr[field] = cols[:, i]
    return arr


def _be_array(vals: list[BeVal]) -> np.ndarray:
    arr = np.zeros(len(vals), dtype=_DT_BE)
    if vals:
        cols = np.array(vals, dtype=np.int64).reshape(-1, 4)
        for i, field in enumerate(("addr", "port", "proto", "state")):
            arr[field] = cols[:, i]
    return arr


def _member_array(keys: list[tuple[int, int]]) -> np.ndarray:
    arr = np.zeros(len(keys), dtype=_DT_MEMBER)
    if keys:
        cols = np.array(keys, dtype=np.int64).reshape(-1, 2)
        arr["svc_id"], arr["be_id"] = cols[:, 0], cols[:, 1]
    return arr


def _put(maps: MapSet, name: str, keys: np.ndarray, vals: np.ndarray) -> None:
    bpfsys.update_batch(maps.fd(name), keys.ctypes.data, vals.ctypes.data, len(keys))


def _delete(maps: MapSet, name: str, keys: np.ndarray) -> None:
    bpfsys.delete_batch(maps.fd(name), keys.ctypes.data, len(keys))


def _u32(values: list[int] | Any) -> np.ndarray:
    return np.asarray(list(values), dtype=_U32)


@dataclasses.dataclass
class ApplyResult:
    summary: dict[str, int]
    build_seconds: float
    write_seconds: float


def execute(p: Plan, maps: MapSet) -> ApplyResult:
    """Write a plan's difference to the maps, in a connect-safe order."""
    started = time.perf_counter()
    d = p.diffs

    # 1. Backends, their reverse index, kernel-owned entries for new ones, loads.
    if d["backends"].put:
        _put(maps, "kvr_be_v1", _u32(d["backends"].put),
             _be_array(list(d["backends"].put.values())))
    if d["be_addr"].put:
        _put(maps, "kvr_be_addr", _l4_array(list(d["be_addr"].put)),
             _u32(d["be_addr"].put.values()))
    for be_id in p.new_backends:
        bpfsys.update(maps.fd("kvr_health"), abi.ct.c_uint32(be_id), abi.Health())
        bpfsys.update(maps.fd("kvr_be_cnt"), abi.ct.c_uint32(be_id),
                      maps.percpu_zero(abi.BeCounters))
    if d["be_load"].put:
        _put(maps, "kvr_be_load", _u32(d["be_load"].put), _u32(d["be_load"].put.values()))
    if d["svc_load"].put:
        _put(maps, "kvr_svc_load", _u32(d["svc_load"].put), _u32(d["svc_load"].put.values()))
    if d["members"].put:
        _put(maps, "kvr_member", _member_array(list(d["members"].put)),
             _u32(d["members"].put.values()))

    # 2. Tables: each a new inner map, filled, then swapped in whole.
    if p.tables:
        svc_ids = sorted(p.tables)
        fds = []
        try:
            for svc_id in svc_ids:
                table = p.tables[svc_id]
                fd = bpfsys.create_inner_table(len(table), f"kvr_t{svc_id}")
                fds.append(fd)
                slots = np.arange(len(table), dtype=_U32)
                bpfsys.update_batch(fd, slots.ctypes.data, table.ctypes.data, len(table))
            _put(maps, "kvr_maglev_v1", _u32(svc_ids), _u32(fds))
        finally:
            for fd in fds:
                os.close(fd)

    # 3. Services last: a new service appears only once its table exists.
    if d["names"].put:
        raw = b"".join(n.encode()[:63].ljust(_DT_NAME.itemsize, b"\0")
                       for n in d["names"].put.values())
        _put(maps, "kvr_svc_name", _u32(d["names"].put), np.frombuffer(raw, dtype=np.uint8))
    for svc_id in p.new_services:
        bpfsys.update(maps.fd("kvr_svc_cnt"), abi.ct.c_uint32(svc_id),
                      maps.percpu_zero(abi.SvcCounters))
    if d["services"].put:
        _put(maps, "kvr_svc_v1", _l4_array(list(d["services"].put)),
             _svc_array(list(d["services"].put.values())))

    # 4. Removals: services first (no new connect can reach them), then what they used.
    if d["services"].delete:
        _delete(maps, "kvr_svc_v1", _l4_array(d["services"].delete))
    if p.tables_delete:
        _delete(maps, "kvr_maglev_v1", _u32(p.tables_delete))
    for name, mapname, conv in (
        ("names", "kvr_svc_name", _u32), ("svc_load", "kvr_svc_load", _u32),
        ("members", "kvr_member", _member_array), ("be_addr", "kvr_be_addr", _l4_array),
        ("backends", "kvr_be_v1", _u32), ("be_load", "kvr_be_load", _u32),
    ):
        if d[name].delete:
            _delete(maps, mapname, conv(d[name].delete))
    if p.gone_services:
        _delete(maps, "kvr_svc_cnt", _u32(p.gone_services))
        _purge_affinity(maps, set(p.gone_services))
    if p.gone_backends:
        _delete(maps, "kvr_health", _u32(p.gone_backends))
        _delete(maps, "kvr_be_cnt", _u32(p.gone_backends))
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
        view.services[(key.addr, key.port, key.proto)] = (
            svc.id, svc.table_size, svc.aff_timeout, svc.eps_milli, svc.probe_milli,
            svc.affinity, svc.flags, svc.n_backends, svc.revision)
    for k, name in maps.items("kvr_svc_name", abi.ct.c_uint32, abi.SvcName):
        view.names[k.value] = name.name.decode()
    for k, be in maps.items("kvr_be_v1", abi.ct.c_uint32, abi.Backend):
        view.backends[k.value] = (be.addr, be.port, be.proto, be.state)
    for key, v in maps.items("kvr_be_addr", abi.L4Key, abi.ct.c_uint32):
        view.be_addr[(key.addr, key.port, key.proto)] = v.value
    for mk, w in maps.items("kvr_member", abi.MemberKey, abi.ct.c_uint32):
        view.members[(mk.svc_id, mk.be_id)] = w.value
    for k, v in maps.items("kvr_be_load", abi.ct.c_uint32, abi.ct.c_uint32):
        view.be_load[k.value] = v.value
    for k, v in maps.items("kvr_svc_load", abi.ct.c_uint32, abi.ct.c_uint32):
        view.svc_load[k.value] = v.value
    view.tables = {k.value for k in maps.keys("kvr_maglev_v1", abi.ct.c_uint32)}
    return view


def apply(desired: config.DesiredState, maps: MapSet, current: View, seed: int
          ) -> tuple[View, ApplyResult]:
    """Plan and execute; returns the new view for the next diff."""
    p = plan(desired, current, seed)
    result = execute(p, maps)
    return p.target, result
