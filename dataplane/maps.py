"""Typed access to kvroute's pinned maps, by path: used by the agent and the CLI
alike, while the agent runs or after it died."""

from __future__ import annotations

import ctypes as ct
import enum
import errno
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np

from dataplane import abi, bpfsys

MAP_NAMES = (
    "kvr_svc_v2", "kvr_svc_name", "kvr_tables", "kvr_be_v2", "kvr_member",
    "kvr_be_load", "kvr_svc_load", "kvr_health", "kvr_affinity", "kvr_sock_v2",
    "kvr_udp_v1", "kvr_svc_cnt_v3", "kvr_be_cnt",
    "kvr_reasons_v2", "kvr_meta", "kvr_be_sess", "kvr_events",
)
# Pinned too, but never opened through a MapSet: socket storage is keyed by socket fds;
# the program arrays and the entry point -> pick program hand-over belong to the programs.
SOCKET_MAPS = ("kvr_sk",)
PROGRAM_MAPS = ("kvr_pick_c4", "kvr_pick_c6", "kvr_pick_s4", "kvr_pick_s6", "kvr_walk_c4",
                "kvr_walk_c6", "kvr_walk_s4", "kvr_walk_s6", "kvr_scratch")
# Every map the programs pin (bpf/lib/maps.h): what uninstall may remove.
PINNED_MAPS = (*MAP_NAMES, *SOCKET_MAPS, *PROGRAM_MAPS)
# Pinned by the packet path's programs (bpf/tc_nodeport.c), when it is loaded: opened by
# dataplane.nodeport, removed by uninstall.
NODEPORT_MAPS = ("kvr_np_fe_v1", "kvr_np_addr", "kvr_np_local_v1", "kvr_np_cfg", "kvr_ct_v1",
                 "kvr_np_cnt", "kvr_np_reasons", "kvr_np_progs", "kvr_np_scratch")
# Pinned by earlier versions under names since replaced (a layout change gets a new
# name): uninstall removes them too.
RETIRED_MAPS = ("kvr_svc_cnt", "kvr_reasons", "kvr_svc_cnt_v2", "kvr_svc_v1", "kvr_be_v1",
                "kvr_sock", "kvr_progs")

K = TypeVar("K", bound=ct.Structure | ct.c_uint32 | ct.c_uint64)
V = TypeVar("V", bound=ct.Structure | ct.c_uint32 | ct.c_uint64)
U32 = ct.c_uint32
_DT_AFF_KEY = np.dtype(abi.AffKey)
_DT_AFF_VAL = np.dtype(abi.AffVal)


class NotPinned(RuntimeError):
    """kvroute's maps are not pinned at the given path."""


class MapSet:
    """File descriptors of every pinned map under a pin dir."""

    def __init__(self, pin_dir: Path, names: Sequence[str] = MAP_NAMES,
                 absent: str = "is the agent installed on this node? `kvroute agent` pins "
                               "them") -> None:
        """Open ``names`` (every map the socket programs pin, unless told); ``absent``
        says why they might not be pinned."""
        self.pin_dir = pin_dir
        self.fds: dict[str, int] = {}
        self._max_entries: dict[str, int] = {}
        try:
            for name in names:
                self.fds[name] = bpfsys.obj_get(pin_dir / name)
        except OSError as exc:
            self.close()
            if exc.errno == errno.ENOENT:
                raise NotPinned(f"kvroute maps are not pinned under {pin_dir} ({absent})"
                                ) from exc
            if exc.errno == errno.EPERM or exc.errno == errno.EACCES:
                raise NotPinned(f"no permission to open {pin_dir}: kvroute needs root") from exc
            raise

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def __enter__(self) -> MapSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fd(self, name: str) -> int:
        return self.fds[name]

    def max_entries(self, name: str) -> int:
        """The map's capacity, as the kernel holds it (the programs' build options)."""
        known = self._max_entries.get(name)
        if known is None:
            known = self._max_entries[name] = bpfsys.map_max_entries(self.fds[name])
        return known

    # -- generic typed operations ---------------------------------------------------------
    def items(self, name: str, key_t: type[K], val_t: type[V]) -> Iterator[tuple[K, V]]:
        fd = self.fds[name]
        key: K | None = None
        nxt = key_t()
        while bpfsys.next_key(fd, key, nxt):
            val = val_t()
            cur: K = key_t.from_buffer_copy(nxt)  # type: ignore[assignment]
            if bpfsys.lookup(fd, cur, val):
                yield cur, val
            key = cur
            nxt = key_t()

    def keys(self, name: str, key_t: type[K]) -> list[K]:
        fd = self.fds[name]
        out: list[K] = []
        key: K | None = None
        nxt = key_t()
        while bpfsys.next_key(fd, key, nxt):
            cur: K = key_t.from_buffer_copy(nxt)  # type: ignore[assignment]
            out.append(cur)
            key = cur
            nxt = key_t()
        return out

    def get(self, name: str, key: ct.Structure | ct.c_uint32, val_t: type[V]) -> V | None:
        val = val_t()
        return val if bpfsys.lookup(self.fds[name], key, val) else None

    def percpu_sum(self, name: str, key: ct.Structure | ct.c_uint32,
                   val_t: type[ct.Structure]) -> list[int] | None:
        """Sum a per-CPU counter struct (one u64 array field `c`) over all CPUs."""
        ncpu = bpfsys.possible_cpus()
        buf = (val_t * ncpu)()
        if not bpfsys.lookup(self.fds[name], key, buf):
            return None
        width = len(buf[0].c)
        return [sum(buf[cpu].c[i] for cpu in range(ncpu)) for i in range(width)]

    def reasons(self, name: str = "kvr_reasons_v2",
                kinds: type[enum.IntEnum] = abi.Reason) -> dict[str, int]:
        """A per-CPU array of reason counters, summed: the socket programs' unless told."""
        ncpu = bpfsys.possible_cpus()
        out = {}
        for reason in kinds:
            buf = (ct.c_uint64 * ncpu)()
            bpfsys.lookup(self.fds[name], U32(reason), buf)
            out[reason.name.lower()] = sum(buf)
        return out

    def meta(self) -> abi.Meta:
        meta = self.get("kvr_meta", U32(0), abi.Meta)
        assert meta is not None  # an array always has its entry
        return meta

    # -- fleet-wide bindings (written by the agent from the controller's stream) ---------
    def write_bindings(self, entries: Sequence[tuple[int, int, int]]) -> None:
        """(svc_id, key, be_id) -> kvr_affinity, in one batch, as fresh bindings: last_ns
        is now on the kernel's clock (CLOCK_MONOTONIC, what bpf_ktime_get_ns reads) and
        reported_s now in seconds, so the kernel does not announce them again at once."""
        if not entries:
            return
        now_ns = time.monotonic_ns()
        keys = np.zeros(len(entries), dtype=_DT_AFF_KEY)
        vals = np.zeros(len(entries), dtype=_DT_AFF_VAL)
        cols = np.array(entries, dtype=np.uint64).reshape(-1, 3)
        keys["svc_id"] = cols[:, 0]
        keys["key"] = cols[:, 1]
        vals["be_id"] = cols[:, 2]
        vals["reported_s"] = now_ns // 1_000_000_000
        vals["last_ns"] = now_ns
        bpfsys.update_batch(self.fds["kvr_affinity"], keys, vals)

    def delete_bindings(self, keys: Sequence[tuple[int, int]]) -> None:
        """Remove (svc_id, key) bindings; absent ones are fine."""
        fd = self.fds["kvr_affinity"]
        for svc_id, key in keys:
            bpfsys.delete(fd, abi.AffKey(svc_id=svc_id, pad=0, key=key))

    def set_sessions(self, counts: Mapping[int, int]) -> None:
        """be_id -> fleet-wide sessions bound to it (kvr_be_sess), in one batch. Counts
        above 2**32 - 1 are capped."""
        if not counts:
            return
        ids = np.fromiter(counts.keys(), dtype=np.uint32, count=len(counts))
        vals = np.fromiter((min(c, 0xFFFFFFFF) for c in counts.values()), dtype=np.uint32,
                           count=len(counts))
        bpfsys.update_batch(self.fds["kvr_be_sess"], ids, vals)

    def sessions(self) -> dict[int, int]:
        """kvr_be_sess as it is: be_id -> sessions."""
        return {k.value: v.value for k, v in self.items("kvr_be_sess", U32, U32)}

    def table(self, svc: abi.Svc) -> list[int] | None:
        """A service's table (backend ids by slot), read from its table group."""
        from dataplane import tables
        return tables.read(self, svc)
