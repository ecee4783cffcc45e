"""Facts about the host the dataplane needs, found rather than assumed.

Every check raises :class:`HostError` with a message a person can act on.
"""

from __future__ import annotations

import ctypes as ct
import os
from functools import cache
from pathlib import Path

BPFFS_DEFAULT = Path("/sys/fs/bpf")
BPF_FS_MAGIC = 0xCAFE4A11  # statfs f_type of bpffs (linux/magic.h)


class HostError(RuntimeError):
    """The host cannot run the kvroute dataplane as it is; the message says why."""


def _mounts(mountinfo: str = "/proc/self/mountinfo") -> list[tuple[str, str]]:
    """(mount point, filesystem type) for every mount, in mount order."""
    out: list[tuple[str, str]] = []
    with open(mountinfo, encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            # Fields after the " - " separator: fstype, source, super options.
            sep = fields.index("-")
            mount_point = fields[4].replace("\\040", " ")
            out.append((mount_point, fields[sep + 1]))
    return out


def cgroup2_root(mountinfo: str = "/proc/self/mountinfo") -> Path:
    """The cgroup v2 mount: /sys/fs/cgroup on unified hosts, often /sys/fs/cgroup/unified on
    hybrid ones. The shortest mount point wins when several exist."""
    found = sorted((mp for mp, fstype in _mounts(mountinfo) if fstype == "cgroup2"), key=len)
    if not found:
        raise HostError(
            "no cgroup v2 hierarchy is mounted; kvroute attaches to cgroup v2 "
            "(mount one with: mount -t cgroup2 none /sys/fs/cgroup/unified)"
        )
    return Path(found[0])


@cache
def _libc() -> ct.CDLL:
    libc = ct.CDLL(None, use_errno=True)
    libc.statfs.argtypes = [ct.c_char_p, ct.c_void_p]
    libc.statfs.restype = ct.c_int
    return libc


def fs_type(path: Path) -> int:
    """statfs(2) f_type of the filesystem holding ``path`` (os.statvfs lacks it)."""
    # struct statfs is 120 bytes on 64-bit Linux; f_type, a native long, comes first everywhere.
    buf = (ct.c_long * 32)()
    if _libc().statfs(os.fsencode(path), buf) != 0:
        err = ct.get_errno()
        raise OSError(err, f"statfs {path}: {os.strerror(err)}")
    return int(buf[0]) & 0xFFFFFFFF


def check_pin_dir(path: Path) -> None:
    """``path`` can be kvroute's pin dir: a folder on bpffs (or a name not made yet whose
    nearest existing parent is on bpffs), and not the root of a bpffs mount, which every BPF
    tool on the node shares. Changes nothing."""
    try:
        if path.exists() and not path.is_dir():
            raise HostError(f"--pin-dir {path} is a file; give the bpffs folder kvroute pins "
                            f"into (default {BPFFS_DEFAULT / 'kvroute'})")
        existing = path
        while not existing.exists():
            existing = existing.parent
        on_bpffs = fs_type(existing) == BPF_FS_MAGIC
        mount_root = existing == path and os.path.ismount(path)
    except OSError as exc:
        raise HostError(f"--pin-dir {path}: {exc.strerror or exc}") from None
    if not on_bpffs:
        raise HostError(f"--pin-dir {path} is not on a bpffs mount; give a folder under one "
                        f"(mount it with: mount -t bpf bpf {BPFFS_DEFAULT})")
    if mount_root:
        raise HostError(f"--pin-dir {path} is the root of a bpffs mount, shared by every BPF "
                        f"tool on the node; give kvroute a folder of its own, e.g. "
                        f"{path / 'kvroute'}")


CGROUP2_MAGIC = 0x63677270  # statfs f_type of cgroup2 (linux/magic.h)


def check_cgroup(path: Path) -> None:
    """``path`` is a cgroup v2 folder the programs can attach to. Checked before anything
    is loaded or pinned, so a wrong --cgroup changes nothing. Changes nothing."""
    try:
        if not path.is_dir():
            raise HostError(f"--cgroup {path}: not a folder (give a cgroup v2 folder, e.g. "
                            f"{cgroup2_root()})")
        kind = fs_type(path)
    except OSError as exc:
        raise HostError(f"--cgroup {path}: {exc.strerror or exc}") from None
    if kind != CGROUP2_MAGIC:
        raise HostError(f"--cgroup {path} is not on a cgroup v2 mount (found in "
                        f"/proc/self/mountinfo as type cgroup2)")


def require_root() -> None:
    if os.geteuid() != 0:
        raise HostError("kvroute needs root (CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN) for this")
