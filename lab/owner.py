"""Who owns a lab and what it made: one record per lab under /run/kvroute-lab.

A lab writes its record before it makes anything, adds each thing as it makes it, and drops
the record last in down(). So a record names everything its lab may have left behind, and
nothing else: when its owner is gone (a run killed by SIGKILL, a timeout, Ctrl-C past the
teardown), the next lab or test session removes exactly what the record names
(:func:`lab.netns.sweep`), and leaves alone what other tools or live labs made.

The owner is a pid with its start time (field 22 of /proc/PID/stat): a pid the kernel has
given to a new process since is not taken for the owner. Not a lock held while the lab
lives: every fork of the owner (lab.run.call) would hold it too.

/run is a tmpfs: records go at reboot, with the namespaces, links and cgroups they name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import ipaddress
import json
import os
import secrets
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Literal, get_args

RUN_DIR = Path("/run/kvroute-lab")
# Labs that pick their own subnet take a free /24 from here, away from the fixed subnets
# older callers (and other checkouts of kvroute) still use below 10.77.100.0.
AUTO_SUBNETS = [ipaddress.IPv4Network(f"10.77.{n}.0/24") for n in range(100, 250)]

# What a record names, in the order a sweep removes it: processes first (they hold the
# rest), then pins, links (newest first: veths before their bridge), namespaces, cgroups.
Kind = Literal["process", "pin_dir", "link", "netns", "cgroup"]
KINDS: tuple[Kind, ...] = get_args(Kind)


class RecordError(RuntimeError):
    """A record could not be made as asked; the message says why."""


@dataclasses.dataclass
class Record:
    names: str  # the lab's name prefix (kvr + tag); also the record's file name
    subnet: str
    owner_pid: int
    owner_start: int
    made: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def add(self, kind: Kind, value: str) -> None:
        self.made.setdefault(kind, []).append(value)

    def items(self, kind: Kind) -> list[str]:
        return list(self.made.get(kind, []))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Record:
        data = json.loads(text)
        return cls(names=str(data["names"]), subnet=str(data["subnet"]),
                   owner_pid=int(data["owner_pid"]), owner_start=int(data["owner_start"]),
                   made={str(k): [str(v) for v in vs] for k, vs in data["made"].items()})


def start_time_of(stat: str) -> int | None:
    """Field 22 (starttime) of a /proc/PID/stat line; None for a zombie, which has ended
    though its parent has not reaped it yet. The command name (field 2) is in parentheses
    and may hold spaces or ')', so fields are counted after its last ')'."""
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])


def process_start(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot), or None if it is not running."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return start_time_of(f.read())
    except (FileNotFoundError, ProcessLookupError):
        return None


def process_value(pid: int) -> str | None:
    """A process as a record names it: ``PID:START``, so a reused pid never matches (None
    if it is gone already)."""
    start = process_start(pid)
    return None if start is None else f"{pid}:{start}"


def is_running(value: str) -> int | None:
    """The pid of a recorded ``PID:START`` if that very process still runs, else None."""
    pid, _, start = value.partition(":")
    return int(pid) if process_start(int(pid)) == int(start) else None


def owner_alive(record: Record) -> bool:
    return process_start(record.owner_pid) == record.owner_start


def pick_subnet(used: Collection[ipaddress.IPv4Network]) -> ipaddress.IPv4Network | None:
    """A random AUTO_SUBNETS entry overlapping nothing in ``used``: random, so that labs of
    callers who do not take the allocation lock (older kvroute) rarely meet."""
    free = [n for n in AUTO_SUBNETS if not any(n.overlaps(u) for u in used)]
    return free[secrets.randbelow(len(free))] if free else None


class Store:
    """The records under one folder (RUN_DIR unless a test says otherwise)."""

    def __init__(self, root: Path = RUN_DIR) -> None:
        self.root = root

    def path(self, names: str) -> Path:
        return self.root / f"{names}.json"

    @contextlib.contextmanager
    def allocation(self) -> Iterator[None]:
        """Held while a lab picks its subnet and writes its first record, so two labs
        starting at once never take the same subnet or name."""
        self.root.mkdir(mode=0o755, parents=True, exist_ok=True)
        fd = os.open(self.root / ".allocate.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def create(self, record: Record) -> None:
        """Write a new record; a lab of that name existing already is an error."""
        try:
            fd = os.open(self.path(record.names), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            raise RecordError(f"a lab named {record.names} exists already") from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(record.to_json())

    def save(self, record: Record) -> None:
        """Replace a record atomically: a reader sees the old one or the new one."""
        tmp = self.root / f".{record.names}.{os.getpid()}.tmp"
        tmp.write_text(record.to_json(), encoding="utf-8")
        os.replace(tmp, self.path(record.names))

    def remove(self, record: Record) -> None:
        self.path(record.names).unlink(missing_ok=True)

    def load_all(self) -> list[Record]:
        """Every record that can be read (one written by hand and broken is skipped)."""
        out = []
        for path in sorted(self.root.glob("*.json")) if self.root.is_dir() else []:
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                out.append(Record.from_json(path.read_text(encoding="utf-8")))
        return out

    @contextlib.contextmanager
    def claim(self, record: Record) -> Iterator[bool]:
        """True while this process alone removes ``record``'s lab: two sessions starting
        at once both find a dead lab, and only one of them sweeps it."""
        try:
            fd = os.open(self.path(record.names), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            yield False
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                yield False
                return
            # Unlinked meanwhile: another sweeper finished it before we locked.
            yield os.fstat(fd).st_nlink > 0
        finally:
            os.close(fd)
