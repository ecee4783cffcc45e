"""The one desired-state model: what every node's kernel tables must hold.

Pure: no I/O, no clock, no numpy, no bcc. The controller builds these objects from
discovery and policy, the wire API (:mod:`dataplane.api`) moves them, the YAML loader
(:mod:`dataplane.config`) reads them from a file, and the agent plans kernel writes from
them (:mod:`dataplane.apply`). Each concept is defined here once: the enums, the limits,
the load unit, a backend's identity, the content hash.

Validation
----------
Every constructor checks every field and raises :class:`ModelError` naming it by path
(``backends[10.0.0.7:8000].weight: must be in [0, 65535], got 70000``); a container
prefixes the paths of what it holds (``services[llm].``). An object that exists is
valid, so nothing downstream validates again, and nothing is ever half-built: a caller
that gets an error keeps what it had.

Identity and hashing
--------------------
A :class:`DesiredState` is a set of services and the list of engines agents must scrape
(:class:`EngineRef`). Its hash is sha256 over a canonical JSON encoding (services by name,
backends by address and port, engines by identity), built from per-service digests, so
the same content gives the same hash on every controller replica and after a restart. A
:class:`Snapshot` is a desired state with the version number the controller gave it; the
version is not hashed, so an agent that holds the content needs nothing whatever number
it was told.

Deltas
------
``delta(old, new)`` carries the services that differ (whole, by name), the names removed,
the engine list when it changed, both versions and the hash of ``new``. ``apply_delta``
refuses a delta that does not start at the snapshot's version or whose result does not
hash to the announced value: the agent then asks for a full snapshot instead of drifting.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import functools
import hashlib
import ipaddress
import json
import math
import re
import socket
import urllib.parse
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any, TypeVar

# -- limits (each defined once; the C side gets the capacity ones as -D flags) ------------

PORT_MAX = 65535
# Kernel map capacity (the agent's --max-services/--max-backends default to these; the C
# side gets the values in force as -D flags): kvr_svc_v2 holds one entry per VIP (room for
# two per service: dual stack), kvr_member one per (service, backend) pair.
MAX_SERVICES = 65536
MAX_BACKENDS = 262144
WEIGHT_MAX = 65535  # Maglev weight of one backend
DEFAULT_WEIGHT = 100
LOAD_MAX = 2**32 - 1  # bounded-load units fit a u32 in the kernel
LOAD_PER_REQUEST = 1000  # load units of one request in flight
# A live session leaves its engine for load (a service's move_epsilon) only when the
# engine is also this far above the mean: near idle, one request is many times the mean.
MOVE_MIN_EXCESS = 4 * LOAD_PER_REQUEST
TABLE_SIZE_MIN = 7
TABLE_SIZE_MAX = 131071
DEFAULT_TABLE_SIZE = 16381  # Maglev M when a caller asks for "the big one"
# Sizes a service gets when it names none: the smallest that is at least
# max(TABLE_SIZE_MIN_AUTO, TABLE_SLOTS_PER_BACKEND * backends). Maglev's disruption is
# close to the ideal 1/N once M > 100 x N (the Maglev paper, and Cilium's guidance for
# its maglev.tableSize); sizes roughly double, so a service's M changes only when its
# backend count crosses a power of two, not with every endpoint that comes and goes.
AUTO_TABLE_SIZES = (251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071)
TABLE_SLOTS_PER_BACKEND = 100
TABLE_SIZE_MIN_AUTO = AUTO_TABLE_SIZES[0]
EPSILON_MAX = 10.0
MOVE_EPSILON_MIN = 0.001  # the kernel keeps a move bound in thousandths; 0 means "off"
DEFAULT_EPSILON = 0.25
DEFAULT_PROBE_SHARE = 0.05
AFFINITY_TIMEOUT_MAX = 86400  # seconds: kube-proxy's ceiling for ClientIP affinity
DEFAULT_AFFINITY_TIMEOUT = 10800  # kube-proxy's ClientIP default
NAME_MAX = 63  # struct kvr_svc_name holds 64 bytes with the NUL
VERSION_MAX = 2**64 - 1  # uint64 on the wire; 0 means "no snapshot"
IDENTITY_MAX = 256
URL_MAX = 2048

_NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")
_IDENTITY_RE = re.compile(r"([0-9.]+|\[[0-9a-f:]+\]):([0-9]{1,5})/(tcp|udp)")
_HASH_RE = re.compile(r"[0-9a-f]{64}")
# Part of the hashed bytes: a change to the encoding changes every hash instead of
# letting two encodings collide.
_SCHEMA = "kvroute/v1"


class ModelError(ValueError):
    """Invalid desired state; ``problems`` holds one line per problem, each with its path."""

    def __init__(self, problems: str | Sequence[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))

    def prefixed(self, prefix: str) -> ModelError:
        # "(value): ..." is about the whole value: under a prefix it is the prefix's.
        return ModelError([p if not prefix else f"{prefix}{p[7:]}" if p.startswith("(value):")
                           else f"{prefix}.{p}" for p in self.problems])


class Protocol(enum.StrEnum):
    TCP = "tcp"
    UDP = "udp"


class Affinity(enum.StrEnum):
    NONE = "none"  # a random backend per connection
    CLIENT = "client"  # per client (its network namespace), like kube-proxy's ClientIP
    SESSION = "session"  # per session tag the client put on its socket


class BackendState(enum.StrEnum):
    ACTIVE = "active"
    DRAINING = "draining"  # no new sessions; pinned ones stay
    OPEN = "open"  # breaker open: never chosen
    PROBING = "probing"  # half-open: probe_share of new sessions


# -- units and names ----------------------------------------------------------------------


def load_units(running: float, waiting: float, kv_usage: float) -> int:
    """Bounded-load units of one engine: one unit per thousandth of a request in flight,
    with KV usage in permille as the tie-breaker between engines with the same number of
    requests. Every writer of a load (controller policy, agent scrapes) uses this."""
    value = round(LOAD_PER_REQUEST * (running + waiting)) + round(LOAD_PER_REQUEST * kv_usage)
    return max(0, min(LOAD_MAX, value))


_N = TypeVar("_N", int, float)


def counter_increase(previous: _N, current: _N) -> _N:
    """How much a cumulative counter grew between two readings; a counter that went down
    started over (a restart), so the new reading is the increase. For the kernel's
    per-backend counters and for an engine's own (dataplane.health)."""
    return current - previous if current >= previous else current


def backend_identity(address: str, port: int, protocol: str) -> str:
    """The string a backend is hashed by in Maglev and named by on the wire, the same on
    every node: ``"10.244.1.5:8000/tcp"``, ``"[fd00:244::5]:53/udp"``. A dual-stack
    backend is named by its first address (``Backend.address``)."""
    host = f"[{address}]" if ":" in address else address
    return f"{host}:{port}/{protocol}"


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    return all(n % d for d in range(3, math.isqrt(n) + 1, 2))


def auto_table_size(affinity: Affinity | str, backends: int) -> int:
    """Table size of a service that names none (see AUTO_TABLE_SIZES). The same rule for
    every affinity: a proportional table for random keys needs the same resolution."""
    want = max(TABLE_SIZE_MIN_AUTO, TABLE_SLOTS_PER_BACKEND * backends)
    return next((m for m in AUTO_TABLE_SIZES if m >= want), AUTO_TABLE_SIZES[-1])


# -- field checks -------------------------------------------------------------------------


def check_int(path: str, value: object, low: int, high: int) -> int:
    if type(value) is not int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ModelError(f"{path}: must be an integer, got {value!r}")
        value = int(value)
    if not low <= value <= high:
        raise ModelError(f"{path}: must be in [{low}, {high}], got {value}")
    return value


def check_float(path: str, value: object, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ModelError(f"{path}: must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or not low <= number <= high:
        raise ModelError(f"{path}: must be a finite number in [{low:g}, {high:g}], got {value!r}")
    return number


def check_bool(path: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ModelError(f"{path}: must be true or false, got {value!r}")
    return value


_E = TypeVar("_E", bound=enum.StrEnum)


def _enum(path: str, value: object, kind: type[_E]) -> _E:
    try:
        return kind(value)  # type: ignore[arg-type]  # anything else is refused below
    except ValueError:
        allowed = ", ".join(m.value for m in kind)
        raise ModelError(f"{path}: must be one of {allowed}, got {value!r}") from None


def _name(path: str, value: object) -> str:
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise ModelError(f"{path}: must be lower-case letters, digits, '-' or '.', "
                         f"starting and ending with a letter or digit, got {value!r}")
    if len(value) > NAME_MAX:
        raise ModelError(f"{path}: must be at most {NAME_MAX} characters, got {len(value)}")
    return value


def check_text(path: str, value: object, limit: int, *, empty: bool = True) -> str:
    if not isinstance(value, str):
        raise ModelError(f"{path}: must be a string, got {value!r}")
    if not empty and not value:
        raise ModelError(f"{path}: must not be empty")
    if len(value) > limit:
        raise ModelError(f"{path}: must be at most {limit} characters, got {len(value)}")
    return value


_BROADCAST = 0xFFFFFFFF
_MULTICAST_NET, _MULTICAST_MASK = 0xE0000000, 0xF0000000
_LOOPBACK_NET, _LOOPBACK_MASK = 0x7F000000, 0xFF000000


def address_problem(number: int) -> str | None:
    """Why an address can be neither a VIP nor a backend, or None. ``number`` is the
    128-bit form the maps hold (IPv4 as ::ffff:a.b.c.d, see :func:`address`). The one
    rule: the model refuses these, the controller leaves such endpoints out."""
    if is_v4(number):
        v4 = number & 0xFFFFFFFF
        if v4 == 0:
            # connect() to 0.0.0.0 reaches the client's own host.
            return "the unspecified address"
        if v4 & _LOOPBACK_MASK == _LOOPBACK_NET:
            # Every host answers 127/8 itself: a backend there is the client's own
            # localhost, a VIP there would take over local services' connections.
            return "a loopback address"
        if v4 == _BROADCAST:
            return "the broadcast address"
        if v4 & _MULTICAST_MASK == _MULTICAST_NET:
            return "a multicast address"
        return None
    if number == 0:
        return "the unspecified address"
    if number == 1:
        return "a loopback address"  # ::1, for the same reason as 127/8
    if number >> 120 == 0xFF:
        return "a multicast address"
    return None


def backend_problem(address: int, vips: Collection[int]) -> str | None:
    """Why an address (128-bit form) cannot be a backend of a service on ``vips``, or
    None."""
    if address in vips:
        # A connect to the VIP rewritten to the VIP again reaches nothing.
        return "the service's own VIP"
    return address_problem(address)


def number_of(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> int:
    """An address object in the 128-bit form the maps hold (see :func:`address`)."""
    return _V4MAPPED | int(ip) if ip.version == 4 else int(ip)


def ipv4(path: str, value: object) -> int:
    """The address as an integer; refuses anything but a canonical dotted quad that can
    be a VIP or a backend (see :func:`address_problem`)."""
    if not isinstance(value, str):
        raise ModelError(f"{path}: must be an IPv4 address string, got {value!r}")
    try:
        number = int.from_bytes(socket.inet_pton(socket.AF_INET, value), "big")
    except (OSError, ValueError):  # ValueError: an embedded NUL
        raise ModelError(f"{path}: {value!r} is not an IPv4 address "
                         f"(four decimal numbers 0-255, no leading zeros)") from None
    problem = address_problem(_V4MAPPED | number)
    if problem is not None:
        raise ModelError(f"{path}: {value} is {problem}, not a unicast destination")
    return number


# IPv4 addresses in the 128-bit form of the kernel maps (::ffff:a.b.c.d, dataplane.abi).
_V4MAPPED = 0xFFFF << 32


def is_v4(number: int) -> bool:
    """True for the 128-bit form of an IPv4 address (see :func:`address`)."""
    return number >> 32 == 0xFFFF


def ipv6(path: str, value: object) -> int:
    """The address as an integer; refuses anything but an IPv6 address in its canonical
    (RFC 5952) text that can be a unicast destination and is not IPv4 in disguise."""
    if not isinstance(value, str):
        raise ModelError(f"{path}: must be an IPv6 address string, got {value!r}")
    try:
        number = int.from_bytes(socket.inet_pton(socket.AF_INET6, value), "big")
    except (OSError, ValueError):
        raise ModelError(f"{path}: {value!r} is not an IPv6 address") from None
    canonical = socket.inet_ntop(socket.AF_INET6, number.to_bytes(16, "big"))
    if is_v4(number):
        raise ModelError(f"{path}: {value} is an IPv4-mapped address: write the IPv4 "
                         f"address ({socket.inet_ntoa(number.to_bytes(16, 'big')[12:])})")
    problem = address_problem(number)
    if problem is not None:
        raise ModelError(f"{path}: {value} is {problem}, not a unicast destination")
    if canonical != value:  # "FD00::0A" would name the same address as "fd00::a"
        raise ModelError(f"{path}: not in canonical form, expected {canonical!r}")
    return number


def address(path: str, value: object) -> int:
    """An IPv4 or IPv6 address (see :func:`ipv4`, :func:`ipv6`) as one 128-bit integer,
    IPv4 as ::ffff:a.b.c.d: the form the kernel maps hold, so both families sort and
    compare together."""
    if isinstance(value, str) and ":" in value:
        return ipv6(path, value)
    return _V4MAPPED | ipv4(path, value)


def _url(path: str, value: object) -> str:
    text = check_text(path, value, URL_MAX, empty=False)
    if any(c.isspace() or not c.isprintable() for c in text):
        raise ModelError(f"{path}: must not contain spaces or control characters")
    try:
        parts = urllib.parse.urlsplit(text)
        _ = parts.port  # raises on a port that is not a number in range
    except ValueError as exc:
        raise ModelError(f"{path}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ModelError(f"{path}: must be an http(s) URL with a host, got {text!r}")
    return text


def check_identity(path: str, value: object) -> str:
    """A backend identity in canonical form (see :func:`backend_identity`)."""
    if not isinstance(value, str) or not (match := _IDENTITY_RE.fullmatch(value)):
        raise ModelError(f"{path}: must be \"<IPv4>:<port>/<tcp|udp>\" or "
                         f"\"[<IPv6>]:<port>/<tcp|udp>\", got {value!r}")
    host = match.group(1).strip("[]")
    address(path, host)
    port = check_int(path, int(match.group(2)), 1, PORT_MAX)
    canonical = backend_identity(host, port, match.group(3))
    if canonical != value:  # "…:080/tcp" would name the same backend as "…:80/tcp"
        raise ModelError(f"{path}: not in canonical form, expected {canonical!r}")
    return value


def check_hash(path: str, value: object) -> str:
    if not isinstance(value, str) or not _HASH_RE.fullmatch(value):
        raise ModelError(f"{path}: must be 64 lowercase hex digits, got {value!r}")
    return value


def set_field(obj: object, name: str, value: object) -> None:
    # Normalised values (enums, floats, canonical order) on frozen dataclasses.
    object.__setattr__(obj, name, value)


def _sequence(path: str, value: object, what: str) -> tuple[Any, ...]:
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, Iterable):
        raise ModelError(f"{path}: must be a list of {what}, got {value!r}")
    return tuple(value)


def _canonical(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode()


# -- the model ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Backend:
    """One endpoint of a service, as the kernel must use it. A dual-stack pod is one
    backend with both addresses, so its sessions stay on it whichever family a client
    uses."""

    address: str  # IPv4 (canonical dotted quad) or IPv6 (canonical RFC 5952 text)
    port: int
    weight: int = DEFAULT_WEIGHT  # Maglev weight 0..WEIGHT_MAX: share of new sessions
    state: BackendState = BackendState.ACTIVE
    load: int = 0  # bounded-load units (load_units), 0..LOAD_MAX
    address6: str | None = None  # the same pod's IPv6 address when ``address`` is IPv4
    # (address as a 128-bit integer, see model.address; port): how services sort and
    # de-duplicate backends.
    key: tuple[int, int] = dataclasses.field(init=False, repr=False, compare=False)
    # address6 as an integer, 0 if none.
    address6_number: int = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        number = address("address", self.address)
        port = check_int("port", self.port, 1, PORT_MAX)
        set_field(self, "address6_number", 0)
        if self.address6 is not None:
            set_field(self, "address6_number", ipv6("address6", self.address6))
            if not is_v4(number):
                raise ModelError("address6: only for a backend whose address is IPv4 "
                                 "(a dual-stack pod)")
        set_field(self, "key", (number, port))
        check_int("weight", self.weight, 0, WEIGHT_MAX)
        if type(self.state) is not BackendState:
            set_field(self, "state", _enum("state", self.state, BackendState))
        check_int("load", self.load, 0, LOAD_MAX)

    @property
    def label(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"

    @property
    def has_v4(self) -> bool:
        return is_v4(self.key[0])

    @property
    def has_v6(self) -> bool:
        return self.address6 is not None or not is_v4(self.key[0])

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"address": self.address, "port": self.port,
                               "weight": self.weight, "state": self.state.value,
                               "load": self.load}
        if self.address6 is not None:  # absent, not null: single-stack hashes stay as they were
            out["address6"] = self.address6
        return out


@dataclasses.dataclass(frozen=True)
class Service:
    """One (VIP, port, protocol) the kernel takes over, and its backends; a dual-stack
    service has a second VIP (``vip6``) sharing its table and sessions."""

    name: str
    vip: str  # IPv4 or IPv6, canonical text
    port: int
    protocol: Protocol = Protocol.TCP
    affinity: Affinity = Affinity.NONE
    affinity_timeout: int = DEFAULT_AFFINITY_TIMEOUT  # seconds, 1..AFFINITY_TIMEOUT_MAX
    table_size: int | None = None  # Maglev M, a prime; None: auto_table_size
    epsilon: float | None = DEFAULT_EPSILON  # bounded load; None switches the check off
    probe_share: float = DEFAULT_PROBE_SHARE  # share of new sessions a probing backend takes
    saturated: bool = False  # every engine full: new connections fail fast (ECONNREFUSED)
    # Sticky until saturated: a live session moves off an engine whose load is over
    # (1 + move_epsilon) x the mean; None: sessions move only off unusable engines.
    move_epsilon: float | None = None
    backends: tuple[Backend, ...] = ()  # sorted by (address, port) whatever the input order
    vip6: str | None = None  # dual stack: the IPv6 VIP of a service whose ``vip`` is IPv4

    def __post_init__(self) -> None:
        _name("name", self.name)
        vip_number = address("vip", self.vip)
        vips = {vip_number}
        if self.vip6 is not None:
            if not is_v4(vip_number):
                raise ModelError("vip6: only for a service whose vip is IPv4 (dual stack)")
            vips.add(ipv6("vip6", self.vip6))
        check_int("port", self.port, 1, PORT_MAX)
        set_field(self, "protocol", _enum("protocol", self.protocol, Protocol))
        set_field(self, "affinity", _enum("affinity", self.affinity, Affinity))
        check_int("affinity_timeout", self.affinity_timeout, 1, AFFINITY_TIMEOUT_MAX)
        backends = _sequence("backends", self.backends, "backends")
        seen: set[tuple[int, int]] = set()
        for i, be in enumerate(backends):
            if not isinstance(be, Backend):
                raise ModelError(f"backends[{i}]: must be a Backend, got {be!r}")
            if be.key in seen:
                raise ModelError(f"backends[{be.label}]: listed twice")
            seen.add(be.key)
        if self.table_size is None:
            set_field(self, "table_size", auto_table_size(self.affinity, len(backends)))
        else:
            check_int("table_size", self.table_size, TABLE_SIZE_MIN, TABLE_SIZE_MAX)
            if not is_prime(self.table_size):
                raise ModelError(f"table_size: must be a prime number, got {self.table_size}")
        for be in backends:
            for number in (be.key[0], be.address6_number):
                problem = backend_problem(number, vips) if number else None
                if problem is not None:  # the address itself was checked by Backend
                    raise ModelError(f"backends[{be.label}]: is {problem}")
            # A client of either VIP must reach every backend in its own family.
            if is_v4(vip_number) and not be.has_v4:
                raise ModelError(f"backends[{be.label}]: the service's VIP is IPv4, the "
                                 "backend has no IPv4 address")
            if (self.vip6 is not None or not is_v4(vip_number)) and not be.has_v6:
                raise ModelError(f"backends[{be.label}]: the service has an IPv6 VIP, the "
                                 "backend has no IPv6 address (address6)")
        if len(backends) > self.size:
            raise ModelError(f"backends: {len(backends)} backends do not fit a table of "
                             f"{self.size} slots")
        if self.epsilon is not None:
            set_field(self, "epsilon", check_float("epsilon", self.epsilon, 0.0, EPSILON_MAX))
        if self.move_epsilon is not None:
            set_field(self, "move_epsilon",
                      check_float("move_epsilon", self.move_epsilon, MOVE_EPSILON_MIN,
                                  EPSILON_MAX))
            if self.epsilon is not None and self.move_epsilon <= self.epsilon:
                # New sessions stop going to an engine at epsilon; moving live ones off it
                # any sooner would move them onto engines no fuller than it.
                raise ModelError(f"move_epsilon: must be greater than epsilon "
                                 f"({self.epsilon:g}), got {self.move_epsilon:g}")
        set_field(self, "probe_share", check_float("probe_share", self.probe_share, 0.0, 1.0))
        check_bool("saturated", self.saturated)
        set_field(self, "backends", tuple(sorted(backends, key=_backend_key)))

    @property
    def size(self) -> int:
        """The table size (never None once constructed)."""
        assert self.table_size is not None
        return self.table_size

    @property
    def l4(self) -> tuple[str, int, Protocol]:
        """The first VIP's key in the kernel's service map: (VIP, port, protocol)."""
        return self.vip, self.port, self.protocol

    @property
    def frontends(self) -> tuple[tuple[str, int, Protocol], ...]:
        """Every key the service owns in the kernel's service map, one per VIP."""
        if self.vip6 is None:
            return (self.l4,)
        return self.l4, (self.vip6, self.port, self.protocol)

    def identity(self, backend: Backend) -> str:
        return backend_identity(backend.address, backend.port, self.protocol)

    @functools.cached_property
    def digest(self) -> str:
        """Hex sha256 of this service's canonical encoding (an input of the state hash),
        computed once per object."""
        return hashlib.sha256(_canonical([_SCHEMA, self.to_dict()])).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        """Plain data (YAML/JSON ready), every field spelled out but an absent ``vip6`` or
        ``address6`` (left out, so a single-stack service hashes as it did before dual
        stack existed and agents of both versions agree); :func:`service_from_dict`
        inverts it."""
        out: dict[str, Any] = {
            "name": self.name, "vip": self.vip, "port": self.port,
            "protocol": self.protocol.value, "affinity": self.affinity.value,
            "affinity_timeout": self.affinity_timeout, "table_size": self.table_size,
            "epsilon": self.epsilon, "probe_share": self.probe_share,
            "saturated": self.saturated, "move_epsilon": self.move_epsilon,
            "backends": [b.to_dict() for b in self.backends],
        }
        if self.vip6 is not None:  # absent, not null: single-stack hashes stay as they were
            out["vip6"] = self.vip6
        return out


def _backend_key(backend: Backend) -> tuple[int, int]:
    return backend.key


@dataclasses.dataclass(frozen=True)
class EngineRef:
    """An engine the agents must scrape (and report, by ``identity``)."""

    identity: str  # the backend identity, "address:port/protocol"
    metrics_url: str  # http(s) URL of its /metrics page
    health_url: str  # http(s) URL of its health check
    node: str | None = None  # node it runs on: that node's agent scrapes it; None: any agent

    def __post_init__(self) -> None:
        check_identity("identity", self.identity)
        _url("metrics_url", self.metrics_url)
        _url("health_url", self.health_url)
        if self.node is not None:
            check_text("node", self.node, IDENTITY_MAX, empty=False)

    def to_dict(self) -> dict[str, Any]:
        return {"identity": self.identity, "metrics_url": self.metrics_url,
                "health_url": self.health_url, "node": self.node}


def _services(path: str, value: object) -> tuple[Service, ...]:
    items = _sequence(path, value, "services")
    names: set[str] = set()
    owners: dict[tuple[str, int, Protocol], str] = {}
    for i, svc in enumerate(items):
        if not isinstance(svc, Service):
            raise ModelError(f"{path}[{i}]: must be a Service, got {svc!r}")
        if svc.name in names:
            raise ModelError(f"{path}[{svc.name}]: name listed twice")
        names.add(svc.name)
        for vip, port, proto in svc.frontends:
            other = owners.setdefault((vip, port, proto), svc.name)
            if other != svc.name:
                field = "vip" if vip == svc.vip else "vip6"
                raise ModelError(f"{path}[{svc.name}].{field}: {vip}:{port}/{proto} "
                                 f"is already service {other!r}")
    return tuple(sorted(items, key=lambda s: s.name))


# Engine lists already checked and hashed, by id (each entry holds its tuple, so the id
# cannot be reused while cached): a delta that leaves the engines alone rebuilds a state
# of 100,000 engines without checking or hashing them again.
_ENGINE_LISTS: collections.OrderedDict[int, tuple[tuple[EngineRef, ...], str]] = (
    collections.OrderedDict())
_ENGINE_LISTS_MAX = 8


def _engines_digest(engines: tuple[EngineRef, ...]) -> str:
    known = _ENGINE_LISTS.get(id(engines))
    if known is not None and known[0] is engines:
        return known[1]
    digest = hashlib.sha256(_canonical([_SCHEMA, [e.to_dict() for e in engines]])).hexdigest()
    _ENGINE_LISTS[id(engines)] = (engines, digest)
    while len(_ENGINE_LISTS) > _ENGINE_LISTS_MAX:
        _ENGINE_LISTS.popitem(last=False)
    return digest


def _engines(path: str, value: object) -> tuple[EngineRef, ...]:
    if type(value) is tuple:
        known = _ENGINE_LISTS.get(id(value))
        if known is not None and known[0] is value:
            return known[0]
    items = _sequence(path, value, "engines")
    seen: set[str] = set()
    for i, ref in enumerate(items):
        if not isinstance(ref, EngineRef):
            raise ModelError(f"{path}[{i}]: must be an EngineRef, got {ref!r}")
        if ref.identity in seen:
            raise ModelError(f"{path}[{ref.identity}]: listed twice")
        seen.add(ref.identity)
    engines = tuple(sorted(items, key=lambda e: e.identity))
    _engines_digest(engines)
    return engines


@dataclasses.dataclass(frozen=True)
class DesiredState:
    """Everything a node must program: services (sorted by name) and the engines agents
    scrape (sorted by identity), so equal content compares equal whatever the order."""

    services: tuple[Service, ...] = ()
    engines: tuple[EngineRef, ...] = ()

    def __post_init__(self) -> None:
        set_field(self, "services", _services("services", self.services))
        set_field(self, "engines", _engines("engines", self.engines))

    @functools.cached_property
    def hash(self) -> str:
        """Hex sha256 of the canonical content."""
        return content_hash(self.services, self.engines)

    @functools.cached_property
    def by_name(self) -> Mapping[str, Service]:
        return {s.name: s for s in self.services}

    def service(self, name: str) -> Service | None:
        return self.by_name.get(name)

    def engine(self, identity: str) -> EngineRef | None:
        return next((e for e in self.engines if e.identity == identity), None)

    def to_dict(self, *, engines: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {"services": [s.to_dict() for s in self.services]}
        if engines:
            out["engines"] = [e.to_dict() for e in self.engines]
        return out


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """A desired state with the version the controller gave it."""

    version: int
    desired: DesiredState = DesiredState()

    def __post_init__(self) -> None:
        check_int("version", self.version, 1, VERSION_MAX)
        if not isinstance(self.desired, DesiredState):
            raise ModelError(f"desired: must be a DesiredState, got {self.desired!r}")

    @classmethod
    def of(cls, version: int, services: Iterable[Service] = (),
           engines: Iterable[EngineRef] = ()) -> Snapshot:
        return cls(version, DesiredState(tuple(services), tuple(engines)))

    @property
    def services(self) -> tuple[Service, ...]:
        return self.desired.services

    @property
    def engines(self) -> tuple[EngineRef, ...]:
        return self.desired.engines

    @property
    def hash(self) -> str:
        return self.desired.hash

    def service(self, name: str) -> Service | None:
        return self.desired.service(name)

    def engine(self, identity: str) -> EngineRef | None:
        return self.desired.engine(identity)


def content_hash(services: Iterable[Service], engines: Iterable[EngineRef] = ()) -> str:
    """sha256 over the services' own digests (by name) and the engine list. Hashing
    digests, not whole services, lets a controller that reuses unchanged Service objects
    rehash only what changed."""
    ordered = sorted(services, key=lambda s: s.name)
    known = _ENGINE_LISTS.get(id(engines))
    refs = (known[0] if known is not None and known[0] is engines
            else tuple(sorted(engines, key=lambda e: e.identity)))
    encoded = _canonical([_SCHEMA, [[s.name, s.digest] for s in ordered],
                          _engines_digest(refs)])
    return hashlib.sha256(encoded).hexdigest()


def check_loads(path: str, loads: Mapping[str, int]) -> dict[str, int]:
    """Engine loads as they travel apart from snapshots: identity -> load units."""
    if not isinstance(loads, Mapping):
        raise ModelError(f"{path}: must be a mapping of identity to load, got {loads!r}")
    return {check_identity(f"{path}[{k!r}]", k): check_int(f"{path}[{k}]", v, 0, LOAD_MAX)
            for k, v in loads.items()}


def check_capacity(state: DesiredState, max_services: int = MAX_SERVICES,
                   max_backends: int = MAX_BACKENDS) -> None:
    """Refuse a state the kernel maps cannot hold, before anything is written (the maps
    would otherwise fill up with E2BIG part-way through an apply)."""
    members = sum(len(s.backends) for s in state.services)
    problems = []
    if len(state.services) > max_services:
        problems.append(f"services: {len(state.services)} services, more than the "
                        f"{max_services} the kernel maps hold")
    if members > max_backends:
        problems.append(f"services: {members} (service, backend) pairs, more than the "
                        f"{max_backends} the kernel maps hold")
    if problems:
        raise ModelError(problems)


# -- deltas -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Delta:
    from_version: int
    to_version: int
    hash: str  # content hash of the state this delta produces
    upserted: tuple[Service, ...] = ()  # whole services, by name
    removed: tuple[str, ...] = ()  # service names
    engines: tuple[EngineRef, ...] | None = None  # the new engine list; None: unchanged

    def __post_init__(self) -> None:
        check_int("from_version", self.from_version, 1, VERSION_MAX)
        check_int("to_version", self.to_version, 1, VERSION_MAX)
        check_hash("hash", self.hash)
        upserted = _services("upserted", self.upserted)
        removed = _sequence("removed", self.removed, "names")
        for i, name in enumerate(removed):
            _name(f"removed[{i}]", name)
        if len(set(removed)) != len(removed):
            raise ModelError("removed: a name is listed twice")
        both = sorted({s.name for s in upserted} & set(removed))
        if both:
            raise ModelError(f"removed[{both[0]}]: also upserted")
        set_field(self, "upserted", upserted)
        set_field(self, "removed", tuple(sorted(removed)))
        if self.engines is not None:
            set_field(self, "engines", _engines("engines", self.engines))

    @property
    def empty(self) -> bool:
        return not self.upserted and not self.removed and self.engines is None

    @property
    def names(self) -> frozenset[str]:
        """The services this delta touches."""
        return frozenset(s.name for s in self.upserted) | frozenset(self.removed)


def delta(old: Snapshot, new: Snapshot) -> Delta:
    """What turns ``old`` into ``new``: changed or new services whole, removed names, and
    the whole engine list if it changed."""
    before = old.desired.by_name
    after = new.desired.by_name
    upserted = tuple(s for name, s in after.items() if before.get(name) != s)
    removed = tuple(name for name in before if name not in after)
    engines = new.engines if new.engines != old.engines else None
    return Delta(old.version, new.version, new.hash, upserted, removed, engines)


def apply_delta(snapshot: Snapshot, change: Delta) -> Snapshot:
    """The snapshot ``change`` leads to. Raises :class:`ModelError` when it does not start
    from ``snapshot`` or does not end at the announced hash (ask for a full one)."""
    if change.from_version != snapshot.version:
        raise ModelError(f"from_version: delta starts at version {change.from_version}, "
                         f"the snapshot is version {snapshot.version}")
    services = dict(snapshot.desired.by_name)
    for name in change.removed:
        if services.pop(name, None) is None:
            raise ModelError(f"removed[{name}]: no such service at version "
                             f"{snapshot.version}")
    for svc in change.upserted:
        services[svc.name] = svc
    engines = snapshot.engines if change.engines is None else change.engines
    try:
        result = Snapshot.of(change.to_version, services.values(), engines)
    except ModelError as exc:
        raise exc.prefixed(f"delta {change.from_version}->{change.to_version}") from None
    if result.hash != change.hash:
        raise ModelError(f"hash: delta {change.from_version}->{change.to_version} gives "
                         f"{result.hash[:12]}, the controller announced {change.hash[:12]}")
    return result


# -- plain data (YAML, JSON) -> model -----------------------------------------------------

_BACKEND_FIELDS = tuple(f.name for f in dataclasses.fields(Backend) if f.init)
_SERVICE_FIELDS = tuple(f.name for f in dataclasses.fields(Service))
_ENGINE_FIELDS = tuple(f.name for f in dataclasses.fields(EngineRef))


def _fields(data: object, allowed: Sequence[str]) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise ModelError(f"(value): must be a mapping, got {type(data).__name__}")
    unknown = sorted(str(k) for k in data if k not in allowed)
    if unknown:
        raise ModelError(f"{unknown[0]}: unknown key")
    return {str(k): v for k, v in data.items()}


def backend_from_dict(data: object) -> Backend:
    fields = _fields(data, _BACKEND_FIELDS)
    for required in ("address", "port"):
        if required not in fields:
            raise ModelError(f"{required}: required")
    return Backend(**fields)


def service_from_dict(data: object) -> Service:
    """A service from plain data; absent keys take the model's defaults. Raises
    :class:`ModelError` listing every problem (the service's own, then each backend's)."""
    fields = _fields(data, _SERVICE_FIELDS)
    missing = [f"{k}: required" for k in ("name", "vip", "port") if k not in fields]
    problems: list[str] = []  # the backends'
    raw = fields.get("backends", [])
    backends: list[Backend] = []
    if isinstance(raw, str | bytes | Mapping) or not isinstance(raw, Sequence):
        problems.append(f"backends: must be a list, got {type(raw).__name__}")
    else:
        seen: dict[tuple[int, int], int] = {}
        for i, item in enumerate(raw):
            try:
                be = backend_from_dict(item)
            except ModelError as exc:
                problems.extend(exc.prefixed(f"backends[{i}]").problems)
                continue
            if be.key in seen:
                problems.append(f"backends[{i}]: duplicate backend {be.label} "
                                f"(also backends[{seen[be.key]}])")
                continue
            seen[be.key] = i
            backends.append(be)
    fields["backends"] = tuple(backends)
    if missing:
        raise ModelError(missing + problems)
    if problems:
        # Check the service's own fields too (without the backends that failed), so a bad
        # port is reported with a bad backend, not only once the backend is fixed.
        try:
            Service(**{**fields, "backends": ()})
        except ModelError as exc:
            problems[:0] = exc.problems
        raise ModelError(problems)
    return Service(**fields)


def engine_from_dict(data: object) -> EngineRef:
    fields = _fields(data, _ENGINE_FIELDS)
    for required in ("identity", "metrics_url", "health_url"):
        if required not in fields:
            raise ModelError(f"{required}: required")
    return EngineRef(**fields)


def desired_from_dict(data: object) -> DesiredState:
    """A desired state from plain data (``{"services": [...], "engines": [...]}``),
    reporting every service's problems at once, each prefixed ``services[i]``."""
    if data is None:
        raise ModelError("(top level): the desired state is empty")
    fields = _fields(data, ("services", "engines"))
    problems: list[str] = []
    parts: dict[str, list[Any]] = {"services": [], "engines": []}
    for key, build in (("services", service_from_dict), ("engines", engine_from_dict)):
        raw = fields.get(key, [])
        if isinstance(raw, str | bytes | Mapping) or not isinstance(raw, Sequence):
            problems.append(f"{key}: must be a list, got {type(raw).__name__}")
            continue
        for i, item in enumerate(raw):
            try:
                parts[key].append(build(item))
            except ModelError as exc:
                problems.extend(exc.prefixed(f"{key}[{i}]").problems)
    if problems:
        raise ModelError(problems)
    return DesiredState(tuple(parts["services"]), tuple(parts["engines"]))
