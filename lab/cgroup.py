"""Throw-away cgroup v2 groups for lab clients and tests.

kvroute's connect hook attaches to a cgroup, so every lab and test puts its clients in a cgroup
of its own, never the root: what is attached there then only sees the lab's sockets.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dataplane.host

# How long remove() waits for killed processes to leave before giving up on the rmdir.
_DRAIN_SECONDS = 5.0


class CgroupError(RuntimeError):
    """A lab cgroup could not be made or removed; the message says why."""


@dataclass(frozen=True)
class Cgroup:
    """One cgroup v2 directory. The object only names it; create() and remove() change the
    hierarchy."""

    path: Path

    @classmethod
    def create(cls, name: str, parent: Path | None = None) -> Cgroup:
        """Make ``<parent>/<name>-<random>`` (parent defaults to the cgroup v2 root).

        The random tail keeps concurrent labs and tests apart, so two callers with the same
        name never share a group.
        """
        if "/" in name or not name:
            raise ValueError(f"cgroup name must be one path component, got {name!r}")
        base = parent if parent is not None else dataplane.host.cgroup2_root()
        for _ in range(8):
            path = base / f"{name}-{secrets.token_hex(3)}"
            try:
                path.mkdir()
            except FileExistsError:
                continue
            return cls(path)
        raise CgroupError(f"could not find a free cgroup name for {name!r} under {base}")

    def add_pid(self, pid: int) -> None:
        """Move ``pid`` (0: the calling process) into this group."""
        # One write per pid: cgroup.procs takes exactly one id per write(2).
        with open(self.path / "cgroup.procs", "w", encoding="ascii") as f:
            f.write(str(pid))

    def pids(self) -> list[int]:
        """Processes in this group itself (not in its children)."""
        try:
            text = (self.path / "cgroup.procs").read_text(encoding="ascii")
        except FileNotFoundError:
            return []
        return [int(line) for line in text.split()]

    def fd(self) -> int:
        """A new ``O_RDONLY | O_DIRECTORY`` descriptor on the group, as BPF attach wants.

        The caller owns it and must ``os.close`` it; :meth:`opened` does that for you.
        """
        return os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    @contextlib.contextmanager
    def opened(self) -> Iterator[int]:
        """``with cg.opened() as fd:`` — :meth:`fd` closed on exit."""
        fd = self.fd()
        try:
            yield fd
        finally:
            os.close(fd)

    def child(self, name: str) -> Cgroup:
        """A new unique sub-group (removed with this one)."""
        return Cgroup.create(name, parent=self.path)

    def remove(self) -> None:
        """Kill every process in the group and its sub-groups, then remove the directories.

        Tolerates a group that is already gone, so it is safe in any teardown order.
        """
        if not self.path.exists():
            return
        # Children first: rmdir refuses a group that still has sub-groups.
        for sub in sorted((p for p in self.path.iterdir() if p.is_dir()), reverse=True):
            Cgroup(sub).remove()
        self._kill_all()
        deadline = time.monotonic() + _DRAIN_SECONDS
        while True:
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError as e:
                # EBUSY: killed tasks are still exiting (zombies not yet reaped count).
                if e.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise CgroupError(
                        f"cannot remove {self.path}: {e.strerror}; still in it: {self.pids()}"
                    ) from e
                self._kill_all()
                time.sleep(0.01)

    def _kill_all(self) -> None:
        kill_file = self.path / "cgroup.kill"
        if kill_file.exists():
            # Kernel 5.14+: one write kills the whole group, racing forks included.
            with contextlib.suppress(FileNotFoundError):
                kill_file.write_text("1", encoding="ascii")
            return
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def current(pid: int | str = "self") -> str:
    """The cgroup v2 path of ``pid`` relative to the v2 root (``"/"`` for the root)."""
    with open(f"/proc/{pid}/cgroup", encoding="ascii") as f:
        for line in f:
            hierarchy, _controllers, path = line.rstrip("\n").split(":", 2)
            if hierarchy == "0":
                return path
    raise CgroupError(f"process {pid} has no cgroup v2 membership")


def relative(cg: Cgroup) -> str:
    """``cg`` as it appears in /proc/PID/cgroup, for comparing with :func:`current`."""
    return "/" + str(cg.path.relative_to(dataplane.host.cgroup2_root()))
