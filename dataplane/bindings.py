"""Fleet-wide session bindings: the messages agents and the controller exchange.

A binding says that a session (a service and a key: the session hash or the client's
cookie) belongs to one backend. Each node's kernel makes bindings on its own when a new
session connects through it; for a session to reach the same engine, and its KV cache,
through any node, every binding a kernel makes travels to the controller, which decides
which binding of a session wins and sends the winners to every agent:

- ``bound``: new sessions, and sessions that moved (``prev`` names the backend they left).
  Up, from the node that made them; down, the winners (and corrections for a node whose
  own binding lost).
- ``touched`` (up only): live bindings a node used again. Bindings in fleet mode do not
  expire in the kernel; the controller expires a binding an affinity timeout after the
  last touch any node reported, and sends ``expired`` (down only) to every node.

Keys of one service and one backend travel together (:class:`Group`), so a binding costs
its 8-byte key on the wire. Everything here is checked on construction, so a message
from the wire is validated once, where it is decoded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

from dataplane import model

KEY_MAX = 2**64 - 1
# One message's ceiling in keys: a report or a fan-out batch larger than this is split
# (8 bytes a key: 1 MiB of keys, far under the channel's message limit).
KEYS_PER_MESSAGE = 131072


@dataclasses.dataclass(frozen=True)
class Group:
    """Keys of ``service`` bound to ``backend`` (moved from ``prev`` when set)."""

    service: str
    backend: str  # identity; "" only in an expiry
    keys: tuple[int, ...]
    prev: str = ""

    def __post_init__(self) -> None:
        model.check_text("service", self.service, model.NAME_MAX, empty=False)
        if self.backend:
            model.check_identity("backend", self.backend)
        if self.prev:
            model.check_identity("prev_backend", self.prev)
        if not isinstance(self.keys, tuple):
            raise model.ModelError(f"keys: expected a tuple, got {type(self.keys).__name__}")
        for key in self.keys:
            if type(key) is not int or not 0 < key <= KEY_MAX:
                raise model.ModelError(f"keys: {key!r} is not a session key (1..2^64-1)")


@dataclasses.dataclass(frozen=True)
class Report:
    """Agent -> controller."""

    agent_id: str
    node: str
    bound: tuple[Group, ...] = ()
    touched: tuple[Group, ...] = ()

    def __post_init__(self) -> None:
        model.check_text("agent_id", self.agent_id, model.IDENTITY_MAX, empty=False)
        model.check_text("node", self.node, model.IDENTITY_MAX)
        for g in self.touched:
            if not g.backend or g.prev:
                raise model.ModelError("touched: a touch names its backend and no prev")
        for g in self.bound:
            if not g.backend:
                raise model.ModelError("bound: a binding names its backend")

    @property
    def keys(self) -> int:
        return sum(len(g.keys) for g in (*self.bound, *self.touched))


@dataclasses.dataclass(frozen=True)
class Fanout:
    """Controller -> every agent."""

    bound: tuple[Group, ...] = ()
    expired: tuple[Group, ...] = ()
    sessions: Mapping[str, int] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for g in self.bound:
            if not g.backend:
                raise model.ModelError("bound: a binding names its backend")
        for g in self.expired:
            if g.backend or g.prev:
                raise model.ModelError("expired: an expiry names only service and keys")
        for ident, count in self.sessions.items():
            model.check_identity("sessions", ident)
            model.check_int(f"sessions[{ident}]", count, 0, 2**32 - 1)

    def __bool__(self) -> bool:
        return bool(self.bound or self.expired or self.sessions)

    @property
    def keys(self) -> int:
        return sum(len(g.keys) for g in (*self.bound, *self.expired))


def group(entries: Iterable[tuple[str, str, str, int]]) -> tuple[Group, ...]:
    """(service, backend, prev, key) rows -> groups, one per (service, backend, prev),
    in first-seen order."""
    out: dict[tuple[str, str, str], list[int]] = {}
    for service, backend, prev, key in entries:
        out.setdefault((service, backend, prev), []).append(key)
    return tuple(Group(s, b, tuple(keys), p) for (s, b, p), keys in out.items())
