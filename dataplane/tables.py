"""Service tables packed into table groups.

A table group is one mmap-able BPF array holding the tables of many services
of the same size side by side; kvr_tables maps group ids to groups. Writing a
table is a memcpy into the mapping (no syscall per slot), and memory grows a
group (about 1 MiB) at a time as services appear, and shrinks as groups empty.

A new table always goes to a free region: the service's map value is then
switched to it in one update, so a connect() reads the old table or the new
one, never a mix. A region given up is reused only after QUARANTINE seconds,
far longer than any program holds a pointer into it.
"""

from __future__ import annotations

import ctypes as ct
import dataclasses
import mmap
import os
import time
from collections.abc import Iterable

import numpy as np

from dataplane import abi, bpfsys
from dataplane.maps import MapSet

GROUP_SLOTS = 1 << 17      # slots per group (1 MiB), unless one table is larger
QUARANTINE = 1.0           # seconds before a released region is reused
# A BPF array stores each value 8-byte aligned: a u32 slot takes 8 bytes of the mapping.
_SLOT_BYTES = 8
_PAGE_SLOTS = mmap.PAGESIZE // _SLOT_BYTES


def _slot_view(mm: mmap.mmap) -> np.ndarray:
    """The group's slots as a uint32 array (every other u32 of the mapping)."""
    return np.frombuffer(mm, dtype=np.uint32)[::2]


@dataclasses.dataclass
class Group:
    gid: int
    size: int               # table size M of every table in the group
    capacity: int           # tables the group holds
    fd: int
    mm: mmap.mmap
    slots: np.ndarray       # the whole group's slots (a strided uint32 view), writable
    free: list[int]         # region indices ready for use
    quarantined: list[tuple[float, int]]  # (released at, region)
    used: set[int]


def _group_slots(size: int, existing: int) -> tuple[int, int]:
    """Groups double in size as a table size gains groups (up to 16x), so memory
    follows the services while a large fleet needs few groups (few RCU waits)."""
    capacity = max(1, (GROUP_SLOTS << min(existing, 4)) // size)
    slots = -(-capacity * size // _PAGE_SLOTS) * _PAGE_SLOTS  # mmap wants whole pages
    return capacity, slots


# What one change did to the pool, for rollback: ("write", group, region), or
# ("group", group, 0) for a group it made. Releases come after a change is written.
_Step = tuple[str, Group, int]


class TablePool:
    def __init__(self, maps: MapSet) -> None:
        self.maps = maps
        self.groups: dict[int, Group] = {}
        self._unpublished: list[Group] = []
        self._journal: list[_Step] | None = None

    # -- one change at a time, all or nothing ---------------------------------------------
    def begin(self) -> None:
        """Record the writes and new groups that follow, until commit or rollback."""
        self._journal = []

    def commit(self) -> None:
        self._journal = None

    def rollback(self) -> None:
        """Undo what was recorded since begin, newest first: regions written go back to
        free (no connect read them: no service value named them), groups made are
        unpublished and unmapped. Call it only once no service value names a new region.
        Raises OSError if a group cannot be taken out of kvr_tables (the caller then
        re-adopts the pool from the maps)."""
        journal, self._journal = self._journal or [], None
        for kind, group, region in reversed(journal):
            if kind == "write":
                group.used.discard(region)
                group.free.append(region)
            else:
                # Groups compare by identity here: their fields hold numpy arrays.
                waiting = [g for g in self._unpublished if g is not group]
                if len(waiting) < len(self._unpublished):
                    self._unpublished = waiting
                else:
                    bpfsys.delete_each(self.maps.fd("kvr_tables"),
                                       np.array([group.gid], dtype=np.uint32))
                del self.groups[group.gid]
                self._unmap(group)

    def _record(self, kind: str, group: Group, region: int = 0) -> None:
        if self._journal is not None:
            self._journal.append((kind, group, region))

    def adopt(self, services: Iterable[abi.Svc]) -> None:
        """Map the groups already pinned (a restarted agent), marking the regions the
        services use; groups no service uses are dropped."""
        by_group: dict[int, list[abi.Svc]] = {}
        for svc in services:
            by_group.setdefault(svc.tbl_group, []).append(svc)
        for key in self.maps.keys("kvr_tables", ct.c_uint32):
            gid = key.value
            users = by_group.get(gid)
            if not users:
                bpfsys.delete(self.maps.fd("kvr_tables"), key)
                continue
            size = users[0].table_size
            inner = self.maps.get("kvr_tables", key, ct.c_uint32)
            assert inner is not None
            fd = bpfsys.map_fd_by_id(inner.value)
            slots = bpfsys.map_max_entries(fd)
            capacity = max(1, slots // size) if size <= GROUP_SLOTS else 1
            group = self._map(gid, size, capacity, fd, slots)
            group.used = {svc.tbl_base // size for svc in users}
            group.free = [r for r in range(capacity - 1, -1, -1) if r not in group.used]
            self.groups[gid] = group

    def _map(self, gid: int, size: int, capacity: int, fd: int, slots: int) -> Group:
        mm = mmap.mmap(fd, slots * _SLOT_BYTES, mmap.MAP_SHARED,
                       mmap.PROT_READ | mmap.PROT_WRITE)
        return Group(gid=gid, size=size, capacity=capacity, fd=fd, mm=mm,
                     slots=_slot_view(mm), free=list(range(capacity - 1, -1, -1)),
                     quarantined=[], used=set())

    def _new_group(self, size: int) -> Group:
        gid = 1
        while gid in self.groups:
            gid += 1
        capacity, slots = _group_slots(size, sum(1 for g in self.groups.values()
                                                 if g.size == size))
        fd = bpfsys.create_table_group(slots, f"kvr_g{gid}")
        try:
            group = self._map(gid, size, capacity, fd, slots)
        except BaseException:
            os.close(fd)
            raise
        self.groups[gid] = group
        self._unpublished.append(group)
        self._record("group", group)
        return group

    def publish(self) -> None:
        """Add new groups to kvr_tables, in one batch: every map-in-map update waits
        for an RCU grace period (milliseconds), so one wait serves them all."""
        if not self._unpublished:
            return
        keys = np.array([g.gid for g in self._unpublished], dtype=np.uint32)
        fds = np.array([g.fd for g in self._unpublished], dtype=np.uint32)
        try:
            bpfsys.update_batch(self.maps.fd("kvr_tables"), keys, fds)
        except OSError:
            # Some may be in kvr_tables: rollback takes them out, present or not.
            self._unpublished.clear()
            raise
        self._unpublished.clear()

    def write(self, table: np.ndarray) -> tuple[int, int]:
        """Store a table in a free region; returns (group id, base slot)."""
        size = len(table)
        now = time.monotonic()
        group = None
        for g in self.groups.values():
            if g.size != size:
                continue
            if g.quarantined and now - g.quarantined[0][0] >= QUARANTINE:
                ready = [r for at, r in g.quarantined if now - at >= QUARANTINE]
                g.quarantined = [(at, r) for at, r in g.quarantined if now - at < QUARANTINE]
                g.free.extend(ready)
            if g.free:
                group = g
                break
        if group is None:
            group = self._new_group(size)
        region = group.free.pop()
        group.used.add(region)
        self._record("write", group, region)
        base = region * size
        group.slots[base:base + size] = table
        return group.gid, base

    def release(self, gid: int, base: int) -> None:
        group = self.groups.get(gid)
        if group is None:
            return
        region = base // group.size
        if region in group.used:
            group.used.discard(region)
            group.quarantined.append((time.monotonic(), region))

    def collect(self) -> None:
        """Drop groups that hold no table and no quarantined region."""
        now = time.monotonic()
        empty = [g for g in self.groups.values()
                 if not g.used and all(now - at >= QUARANTINE for at, _ in g.quarantined)]
        if empty:
            # One by one, absent ones included: a collect cut short part-way (its groups
            # stay here) is simply run again by the next change.
            bpfsys.delete_each(self.maps.fd("kvr_tables"),
                               np.array([g.gid for g in empty], dtype=np.uint32))
        for g in empty:
            self._unmap(g)
            del self.groups[g.gid]

    def _unmap(self, g: Group) -> None:
        del g.slots
        g.mm.close()
        os.close(g.fd)

    def close(self) -> None:
        for g in self.groups.values():
            self._unmap(g)
        self.groups.clear()


def read(maps: MapSet, svc: abi.Svc) -> list[int] | None:
    """A service's table, read through its group (for the CLI: no mmap, no writes)."""
    inner = maps.get("kvr_tables", ct.c_uint32(svc.tbl_group), ct.c_uint32)
    if inner is None or svc.table_size == 0:
        return None
    fd = bpfsys.map_fd_by_id(inner.value)
    try:
        slots = bpfsys.map_max_entries(fd)
        mm = mmap.mmap(fd, -(-slots // _PAGE_SLOTS) * _PAGE_SLOTS * _SLOT_BYTES,
                       mmap.MAP_SHARED, mmap.PROT_READ)
        try:
            view = _slot_view(mm)
            out = view[svc.tbl_base:svc.tbl_base + svc.table_size].tolist()
            del view
            return out
        finally:
            mm.close()
    finally:
        os.close(fd)
