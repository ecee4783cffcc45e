"""Typed access to kvroute's pinned maps, by path: used by the agent and the CLI
alike, while the agent runs or after it died."""

from __future__ import annotations

import ctypes as ct
import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

from dataplane import abi, bpfsys

MAP_NAMES = (
    "kvr_svc_v1", "kvr_svc_name", "kvr_tables", "kvr_be_v1", "kvr_member",
    "kvr_be_load", "kvr_svc_load", "kvr_health", "kvr_affinity", "kvr_sock", "kvr_svc_cnt",
    "kvr_be_cnt",
    "kvr_reasons", "kvr_meta",
)
# Pinned too, but never opened through a MapSet: socket storage is keyed by socket fds.
SOCKET_MAPS = ("kvr_sk",)
# Every map the programs pin (bpf/lib/maps.h): what uninstall may remove.
PINNED_MAPS = (*MAP_NAMES, *SOCKET_MAPS)

K = TypeVar("K", bound=ct.Structure | ct.c_uint32)
V = TypeVar("V", bound=ct.Structure | ct.c_uint32 | ct.c_uint64)
U32 = ct.c_uint32


class NotPinned(RuntimeError):
    """kvroute's maps are not pinned at the given path."""


class MapSet:
    """File descriptors of every pinned map under a pin dir."""

    def __init__(self, pin_dir: Path) -> None:
        self.pin_dir = pin_dir
        self.fds: dict[str, int] = {}
        try:
            for name in MAP_NAMES:
                self.fds[name] = bpfsys.obj_get(pin_dir / name)
        except OSError as exc:
            self.close()
            if exc.errno == errno.ENOENT:
                raise NotPinned(
                    f"kvroute maps are not pinned under {pin_dir} "
                    "(is the agent installed on this node? `kvroute agent` pins them)") from exc
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

    def reasons(self) -> dict[str, int]:
        ncpu = bpfsys.possible_cpus()
        out = {}
        for reason in abi.Reason:
            buf = (ct.c_uint64 * ncpu)()
            bpfsys.lookup(self.fds["kvr_reasons"], U32(reason), buf)
            out[reason.name.lower()] = sum(buf)
        return out

    def meta(self) -> abi.Meta:
        meta = self.get("kvr_meta", U32(0), abi.Meta)
        assert meta is not None  # an array always has its entry
        return meta

    def table(self, svc: abi.Svc) -> list[int] | None:
        """A service's table (backend ids by slot), read from its table group."""
        from dataplane import tables
        return tables.read(self, svc)
