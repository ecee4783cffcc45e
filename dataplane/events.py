"""The kernel's binding announcements: records of the pinned kvr_events ring
(struct kvr_event), read from the agent. Works from the pinned map alone, so a
restarted agent picks up where the ring is, and needs no bcc."""

from __future__ import annotations

import ctypes as ct
import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from dataplane import abi, bpfsys
from dataplane.maps import MapSet


class Event(NamedTuple):
    """One struct kvr_event. Ids are this node's (kvr_svc_name, kvr_be_v2)."""

    kind: int  # abi.EV_BIND or abi.EV_TOUCH
    svc_id: int
    be_id: int
    prev_be_id: int  # abi.NO_BACKEND for a new binding; BIND only
    key: int


_SIZE = ct.sizeof(abi.Event)


def decode(data: bytes) -> Event:
    """A ring record -> Event; a ValueError for a record of the wrong size."""
    if len(data) < _SIZE:
        raise ValueError(f"kvr_event record of {len(data)} bytes, expected {_SIZE}")
    raw = abi.Event.from_buffer_copy(data[:_SIZE])
    return Event(raw.kind, raw.svc_id, raw.be_id, raw.prev_be_id, raw.key)


class EventReader:
    """Calls ``on_event`` for each record on kvr_events, inside poll()/consume().

    ``source`` is a MapSet (its kvr_events fd is used), a ring buffer map fd (neither
    is owned by the reader), or a pin dir (the reader opens <pin_dir>/kvr_events and
    closes it). For an event loop, wait for fileno() to be readable, then consume().
    """

    def __init__(self, source: MapSet | int | Path, on_event: Callable[[Event], None]) -> None:
        self._own_fd: int | None = None
        if isinstance(source, MapSet):
            fd = source.fd("kvr_events")
        elif isinstance(source, Path):
            fd = self._own_fd = bpfsys.obj_get(source / "kvr_events")
        else:
            fd = source
        self._on_event = on_event
        try:
            self._ring = bpfsys.RingBuffer(fd, self._sample)
        except OSError:
            self._close_fd()
            raise

    def _close_fd(self) -> None:
        if self._own_fd is not None:
            os.close(self._own_fd)
            self._own_fd = None

    def _sample(self, data: bytes) -> None:
        self._on_event(decode(data))

    def poll(self, timeout_ms: int) -> int:
        """Wait up to timeout_ms; returns the events consumed."""
        return self._ring.poll(timeout_ms)

    def consume(self) -> int:
        """Handle what is waiting, without blocking; returns the events consumed."""
        return self._ring.consume()

    def fileno(self) -> int:
        """Readable when events wait (an epoll fd: add it to a selector or event loop)."""
        return self._ring.epoll_fd()

    def close(self) -> None:
        self._ring.close()
        self._close_fd()

    def __enter__(self) -> EventReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
