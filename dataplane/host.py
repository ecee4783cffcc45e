"""Facts about the host the dataplane needs, found rather than assumed.

Every check raises :class:`HostError` with a message a person can act on.
"""

from __future__ import annotations

import os
from pathlib import Path

BPFFS_DEFAULT = Path("/sys/fs/bpf")


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


def bpffs_mounted(path: Path = BPFFS_DEFAULT, mountinfo: str = "/proc/self/mountinfo") -> bool:
    return any(mp == str(path) and fstype == "bpf" for mp, fstype in _mounts(mountinfo))


def require_root() -> None:
    if os.geteuid() != 0:
        raise HostError("kvroute needs root (CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN) for this")


def require_bpffs(path: Path = BPFFS_DEFAULT) -> None:
    if not bpffs_mounted(path):
        raise HostError(
            f"bpffs is not mounted at {path}; pinned maps live there "
            f"(mount it with: mount -t bpf bpf {path}, or run deploy/node-setup.sh)"
        )


def require_kernel_headers() -> None:
    build = Path("/lib/modules") / os.uname().release / "build"
    if not (build / "include").exists():
        raise HostError(
            f"no kernel headers at {build}; bcc compiles the programs at load time "
            "(run deploy/node-setup.sh, or install the node's linux-headers package)"
        )
