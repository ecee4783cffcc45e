"""Snapshots of the agents' desired state: versioned, content-hashed, and deltas between them.

Pure: no I/O, no clock. The controller builds a :class:`Snapshot` from discovery and policy,
the gRPC layer (controller.grpc_server, dataplane.stream) moves it, and an agent turns it
into the dict of its YAML model with :meth:`Snapshot.to_dict` (``dataplane.config.from_dict``).

Identity and hashing
--------------------
A snapshot's *content* is its set of services and the list of engines agents must scrape
(:class:`EngineRef`); its *version* is a number the controller gives it. The hash covers the
content only (sha256 over a canonical JSON encoding, services sorted by name, backends by
address and port, engines by identity), so the same content gives the same hash
on every controller replica and after a controller restart: an agent that already holds
the content needs no full snapshot, whatever version number it was told.

Deltas
------
``delta(old, new)`` carries the services that differ (whole, by name), the names removed,
the whole engine list when it changed (None when not), both versions and the hash of
``new``. ``apply_delta`` refuses a delta whose ``from_version`` is not the snapshot's
version, and any result whose hash is not the one announced: a divergent agent then asks
for a full snapshot instead of drifting silently.

Validation
----------
Every constructor checks every field and raises :class:`SnapshotError` naming it
(``services[llm].backends[10.0.0.7:8000].weight: ...``). Nothing is half-built: the caller
keeps its previous snapshot.

Reports
-------
What an agent sends back (:class:`AgentReport`): the version it applied, the engines it
scraped (:class:`controller.scraper.ScrapeResult`, so the controller feeds its breakers with
``result.outcomes()``) and the kernel's cumulative per-backend counters.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import ipaddress
import json
import math
import re
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from controller import enginemetrics, policy, scraper
from dataplane import maglev

PROTOCOLS = ("tcp", "udp")
AFFINITIES = ("none", "client", "session")
BACKEND_STATES = ("active", "draining", "open", "probing")

VERSION_MAX = 2**64 - 1  # uint64 on the wire; 0 means "no snapshot"
U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1
WEIGHT_MAX = policy.WEIGHT_MAX
LOAD_MAX = policy.LOAD_MAX
# Limits below are the agent's (dataplane.config), so a snapshot the controller accepts is
# one every agent accepts; the controller learns of a bad value, not N agents.
TABLE_SIZE_MIN = 7
TABLE_SIZE_MAX = 131071
EPSILON_MAX = 10.0
AFFINITY_TIMEOUT_MAX = 86400  # seconds
NAME_MAX_BYTES = 63  # struct kvr_svc_name holds 64 bytes with the NUL
IDENTITY_MAX = 256
TEXT_MAX = 4096  # error strings in reports
URL_MAX = 2048

# Part of the hashed bytes: a change to the encoding changes every hash instead of
# letting two encodings collide.
_SCHEMA = "kvroute/v1"
_HASH_RE = re.compile(r"[0-9a-f]{64}")
_NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")  # dataplane.config's rule
# dataplane.config.backend_identity: "<IPv4>:<port>/<protocol>"
_IDENTITY_RE = re.compile(r"([0-9.]+):([0-9]{1,5})/(tcp|udp)")


class SnapshotError(ValueError):
    """A snapshot, delta or report that must not be used; the message names the field."""


# -- field checks -------------------------------------------------------------------------


def _int(path: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SnapshotError(f"{path}: must be an integer, got {value!r}")
    if not low <= value <= high:
        raise SnapshotError(f"{path}: must be in [{low}, {high}], got {value}")
    return value


def _float(path: str, value: object, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SnapshotError(f"{path}: must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or not low <= number <= high:
        raise SnapshotError(f"{path}: must be a finite number in [{low}, {high}], got {value!r}")
    return number


def _bool(path: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise SnapshotError(f"{path}: must be true or false, got {value!r}")
    return value


def _choice(path: str, value: object, allowed: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise SnapshotError(f"{path}: must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _name(path: str, value: object) -> str:
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise SnapshotError(f"{path}: must be lower-case letters, digits, '-' or '.', "
                            f"starting and ending with a letter or digit, got {value!r}")
    if len(value) > NAME_MAX_BYTES:
        raise SnapshotError(f"{path}: must be at most {NAME_MAX_BYTES} characters, "
                            f"got {len(value)}")
    return value


def _text(path: str, value: object, limit: int, *, empty: bool = True) -> str:
    if not isinstance(value, str):
        raise SnapshotError(f"{path}: must be a string, got {value!r}")
    if not empty and not value:
        raise SnapshotError(f"{path}: must not be empty")
    if len(value) > limit:
        raise SnapshotError(f"{path}: must be at most {limit} characters, got {len(value)}")
    return value


def _ipv4(path: str, value: object) -> str:
    return _ipv4_int(path, value)[0]


_MULTICAST = ipaddress.IPv4Network("224.0.0.0/4")
_BROADCAST = int(ipaddress.IPv4Address("255.255.255.255"))


def _ipv4_int(path: str, value: object) -> tuple[str, int]:
    """The normalised address and its integer (parsed once: controllers build thousands
    of backends per tick)."""
    if not isinstance(value, str):
        raise SnapshotError(f"{path}: must be an IPv4 address string, got {value!r}")
    try:
        address = ipaddress.IPv4Address(value)
    except ValueError as exc:
        raise SnapshotError(f"{path}: {exc}") from None
    number = int(address)
    if number == 0 or number == _BROADCAST or address in _MULTICAST:
        raise SnapshotError(f"{path}: {value} cannot be a unicast destination")
    return str(address), number


def _hash(path: str, value: object) -> str:
    if not isinstance(value, str) or not _HASH_RE.fullmatch(value):
        raise SnapshotError(f"{path}: must be 64 lowercase hex digits, got {value!r}")
    return value


def _url(path: str, value: object) -> str:
    _text(path, value, URL_MAX, empty=False)
    assert isinstance(value, str)
    if any(c.isspace() or not c.isprintable() for c in value):
        raise SnapshotError(f"{path}: must not contain spaces or control characters")
    try:
        parts = urllib.parse.urlsplit(value)
        _ = parts.port  # raises on a port that is not a number in range
    except ValueError as exc:
        raise SnapshotError(f"{path}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SnapshotError(f"{path}: must be an http(s) URL with a host, got {value!r}")
    return value


def _identity(path: str, value: object) -> str:
    if not isinstance(value, str) or not (match := _IDENTITY_RE.fullmatch(value)):
        raise SnapshotError(f"{path}: must be \"<IPv4>:<port>/<tcp|udp>\", got {value!r}")
    address = _ipv4(path, match.group(1))
    port = _int(path, int(match.group(2)), 1, 65535)
    canonical = f"{address}:{port}/{match.group(3)}"
    if canonical != value:
        raise SnapshotError(f"{path}: not in canonical form, expected {canonical!r}")
    return value


def _set(obj: object, name: str, value: object) -> None:
    # Normalised values (floats, canonical order) on frozen dataclasses.
    object.__setattr__(obj, name, value)


def _prefixed(prefix: str, exc: SnapshotError) -> SnapshotError:
    return SnapshotError(f"{prefix}.{exc}" if prefix else str(exc))


# -- model --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Backend:
    address: str  # IPv4, normalised
    port: int
    weight: int  # Maglev weight 0..65535
    state: str  # one of BACKEND_STATES
    load: int = 0  # bounded-load units (policy.load_units)

    def __post_init__(self) -> None:
        address, number = _ipv4_int("address", self.address)
        _set(self, "address", address)
        _int("port", self.port, 1, 65535)
        self.__dict__["key"] = (number, self.port)  # fills the cached_property below
        _int("weight", self.weight, 0, WEIGHT_MAX)
        _choice("state", self.state, BACKEND_STATES)
        _int("load", self.load, 0, LOAD_MAX)

    @functools.cached_property
    def key(self) -> tuple[int, int]:
        # Set by __post_init__ (services sort and de-duplicate backends by it on every
        # construction); computed here only for an object made without it.
        return int(ipaddress.IPv4Address(self.address)), self.port

    def to_dict(self) -> dict[str, Any]:
        return {"address": self.address, "port": self.port, "weight": self.weight,
                "state": self.state, "load": self.load}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Backend:
        fields = _exact_keys("", data, _BACKEND_KEYS, optional=("load",))
        return cls(**fields)


@dataclasses.dataclass(frozen=True)
class EngineRef:
    """An engine the agents must scrape (and report, as a ScrapeResult of ``identity``)."""

    identity: str  # the backend identity, "address:port/protocol" (dataplane.config)
    metrics_url: str  # http(s) URL of its /metrics page
    health_url: str  # http(s) URL of its health check
    node: str | None = None  # node it runs on: that node's agent scrapes it; None: any agent

    def __post_init__(self) -> None:
        _identity("identity", self.identity)
        _url("metrics_url", self.metrics_url)
        _url("health_url", self.health_url)
        if self.node is not None:
            _text("node", self.node, IDENTITY_MAX, empty=False)

    def to_dict(self) -> dict[str, Any]:
        return {"identity": self.identity, "metrics_url": self.metrics_url,
                "health_url": self.health_url, "node": self.node}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EngineRef:
        return cls(**_exact_keys("", data, _ENGINE_KEYS, optional=("node",)))


def _check_engines(engines: object, path: str) -> tuple[EngineRef, ...]:
    if isinstance(engines, str | bytes | Mapping) or not isinstance(engines, Iterable):
        raise SnapshotError(f"{path}: must be a list of engines, got {engines!r}")
    items = tuple(engines)
    seen: set[str] = set()
    for i, ref in enumerate(items):
        if not isinstance(ref, EngineRef):
            raise SnapshotError(f"{path}[{i}]: must be an EngineRef, got {ref!r}")
        if ref.identity in seen:
            raise SnapshotError(f"{path}[{ref.identity}]: listed twice")
        seen.add(ref.identity)
    return tuple(sorted(items, key=lambda e: e.identity))


@dataclasses.dataclass(frozen=True)
class ServiceState:
    """One service as the agent must program it (the dataplane.config service shape)."""

    name: str
    vip: str
    port: int
    protocol: str  # one of PROTOCOLS
    affinity: str  # one of AFFINITIES
    affinity_timeout: int  # seconds, 1..AFFINITY_TIMEOUT_MAX
    table_size: int  # Maglev M: a prime in [TABLE_SIZE_MIN, TABLE_SIZE_MAX]
    epsilon: float | None  # bounded load; None switches the check off
    probe_share: float  # share of new sessions a probing backend takes, [0, 1]
    saturated: bool = False  # every engine full: new connections fail fast
    backends: tuple[Backend, ...] = ()  # sorted by (address, port) whatever the input order

    def __post_init__(self) -> None:
        _name("name", self.name)
        _set(self, "vip", _ipv4("vip", self.vip))
        _int("port", self.port, 1, 65535)
        _choice("protocol", self.protocol, PROTOCOLS)
        _choice("affinity", self.affinity, AFFINITIES)
        _int("affinity_timeout", self.affinity_timeout, 1, AFFINITY_TIMEOUT_MAX)
        _int("table_size", self.table_size, TABLE_SIZE_MIN, TABLE_SIZE_MAX)
        if not maglev.is_prime(self.table_size):
            raise SnapshotError(f"table_size: must be a prime number, got {self.table_size}")
        if self.epsilon is not None:
            _set(self, "epsilon", _float("epsilon", self.epsilon, 0.0, EPSILON_MAX))
        _set(self, "probe_share", _float("probe_share", self.probe_share, 0.0, 1.0))
        _bool("saturated", self.saturated)
        if isinstance(self.backends, str | bytes) or not isinstance(self.backends, Iterable):
            raise SnapshotError(f"backends: must be a list of backends, got {self.backends!r}")
        backends = tuple(self.backends)
        seen: set[tuple[int, int]] = set()
        for i, be in enumerate(backends):
            if not isinstance(be, Backend):
                raise SnapshotError(f"backends[{i}]: must be a Backend, got {be!r}")
            if be.key in seen:
                raise SnapshotError(f"backends[{be.address}:{be.port}]: listed twice")
            seen.add(be.key)
        if len(backends) > self.table_size:
            raise SnapshotError(f"backends: {len(backends)} backends do not fit a Maglev "
                                f"table of {self.table_size} slots")
        _set(self, "backends", tuple(sorted(backends, key=lambda b: b.key)))

    @property
    def l4(self) -> tuple[str, int, str]:
        return self.vip, self.port, self.protocol

    @functools.cached_property
    def digest(self) -> str:
        """Hex sha256 of this service's canonical encoding (an input of the snapshot
        hash), computed once per object."""
        return hashlib.sha256(_canonical([_SCHEMA, self.to_dict()])).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        """The dataplane.config service dict (every key present)."""
        return {
            "name": self.name, "vip": self.vip, "port": self.port, "protocol": self.protocol,
            "affinity": self.affinity, "affinity_timeout": self.affinity_timeout,
            "table_size": self.table_size, "epsilon": self.epsilon,
            "probe_share": self.probe_share, "saturated": self.saturated,
            "backends": [b.to_dict() for b in self.backends],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ServiceState:
        fields = _exact_keys("", data, _SERVICE_KEYS, optional=("saturated", "backends"))
        raw = fields.get("backends", [])
        if isinstance(raw, str | bytes | Mapping) or not isinstance(raw, Sequence):
            raise SnapshotError(f"backends: must be a list, got {raw!r}")
        backends = []
        for i, item in enumerate(raw):
            try:
                backends.append(Backend.from_dict(item))
            except SnapshotError as exc:
                raise _prefixed(f"backends[{i}]", exc) from None
        fields["backends"] = tuple(backends)
        return cls(**fields)


_BACKEND_KEYS = tuple(f.name for f in dataclasses.fields(Backend))
_ENGINE_KEYS = tuple(f.name for f in dataclasses.fields(EngineRef))
_SERVICE_KEYS = tuple(f.name for f in dataclasses.fields(ServiceState))


def _exact_keys(path: str, data: object, keys: Sequence[str],
                optional: Sequence[str] = ()) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise SnapshotError(f"{path or 'value'}: must be a mapping, got {data!r}")
    unknown = sorted(str(k) for k in data if k not in keys)
    if unknown:
        raise SnapshotError(f"{path}{'.' if path else ''}{unknown[0]}: unknown field")
    missing = [k for k in keys if k not in data and k not in optional]
    if missing:
        raise SnapshotError(f"{path}{'.' if path else ''}{missing[0]}: missing")
    return dict(data)


def _service_label(item: object, i: int) -> str:
    """services[<name>] when the raw item has a usable name, else services[<index>]."""
    name = item.get("name") if isinstance(item, Mapping) else None
    if isinstance(name, str) and _NAME_RE.fullmatch(name) and len(name) <= NAME_MAX_BYTES:
        return f"services[{name}]"
    return f"services[{i}]"


def _check_services(services: object, path: str) -> tuple[ServiceState, ...]:
    if isinstance(services, str | bytes | Mapping) or not isinstance(services, Iterable):
        raise SnapshotError(f"{path}: must be a list of services, got {services!r}")
    items = tuple(services)
    names: set[str] = set()
    for i, svc in enumerate(items):
        if not isinstance(svc, ServiceState):
            raise SnapshotError(f"{path}[{i}]: must be a ServiceState, got {svc!r}")
        if svc.name in names:
            raise SnapshotError(f"{path}[{svc.name}]: name listed twice")
        names.add(svc.name)
    return tuple(sorted(items, key=lambda s: s.name))


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """Desired state of every agent at one version. Services are kept sorted by name and
    engines by identity, so equal content compares equal whatever order it was built in."""

    version: int
    services: tuple[ServiceState, ...] = ()
    engines: tuple[EngineRef, ...] = ()  # what agents scrape; not part of to_dict()

    def __post_init__(self) -> None:
        _int("version", self.version, 1, VERSION_MAX)
        services = _check_services(self.services, "services")
        _set(self, "engines", _check_engines(self.engines, "engines"))
        owners: dict[tuple[str, int, str], str] = {}
        for svc in services:
            other = owners.setdefault(svc.l4, svc.name)
            if other != svc.name:
                raise SnapshotError(f"services[{svc.name}].vip: {svc.vip}:{svc.port}/"
                                    f"{svc.protocol} is already service {other!r}")
        _set(self, "services", services)

    @functools.cached_property
    def hash(self) -> str:
        """Hex sha256 of the canonical content (the version is not part of it)."""
        return content_hash(self.services, self.engines)

    def service(self, name: str) -> ServiceState | None:
        for svc in self.services:
            if svc.name == name:
                return svc
        return None

    def engine(self, identity: str) -> EngineRef | None:
        for ref in self.engines:
            if ref.identity == identity:
                return ref
        return None

    def to_dict(self, *, engines: bool = False) -> dict[str, Any]:
        """The agent's desired-state dict, for ``dataplane.config.from_dict``; with
        ``engines=True`` also the engine list (then only :meth:`from_dict` reads it)."""
        out: dict[str, Any] = {"services": [svc.to_dict() for svc in self.services]}
        if engines:
            out["engines"] = [ref.to_dict() for ref in self.engines]
        return out

    @classmethod
    def from_dict(cls, version: int, data: Mapping[str, Any]) -> Snapshot:
        fields = _exact_keys("", data, ("services", "engines"), optional=("engines",))
        raw_engines = fields.get("engines", [])
        if isinstance(raw_engines, str | bytes | Mapping) or not isinstance(raw_engines,
                                                                               Sequence):
            raise SnapshotError(f"engines: must be a list, got {raw_engines!r}")
        engines = []
        for i, item in enumerate(raw_engines):
            try:
                engines.append(EngineRef.from_dict(item))
            except SnapshotError as exc:
                raise _prefixed(f"engines[{i}]", exc) from None
        raw = fields["services"]
        if isinstance(raw, str | bytes | Mapping) or not isinstance(raw, Sequence):
            raise SnapshotError(f"services: must be a list, got {raw!r}")
        services = []
        for i, item in enumerate(raw):
            try:
                services.append(ServiceState.from_dict(item))
            except SnapshotError as exc:
                raise _prefixed(_service_label(item, i), exc) from None
        return cls(version, tuple(services), tuple(engines))


def content_hash(services: Iterable[ServiceState], engines: Iterable[EngineRef] = ()) -> str:
    """sha256 over the services' own digests (by name) and the engine list. Hashing
    digests, not whole services, lets a controller that reuses unchanged ServiceState
    objects rehash only what changed."""
    ordered = sorted(services, key=lambda s: s.name)
    refs = sorted(engines, key=lambda e: e.identity)
    encoded = _canonical([_SCHEMA, [[s.name, s.digest] for s in ordered],
                          [e.to_dict() for e in refs]])
    return hashlib.sha256(encoded).hexdigest()


def _canonical(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode()


# -- deltas -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Delta:
    from_version: int
    to_version: int
    hash: str  # content hash of the snapshot this delta produces
    upserted: tuple[ServiceState, ...] = ()  # whole services, by name
    removed: tuple[str, ...] = ()  # service names
    engines: tuple[EngineRef, ...] | None = None  # the new engine list; None: unchanged

    def __post_init__(self) -> None:
        _int("from_version", self.from_version, 1, VERSION_MAX)
        _int("to_version", self.to_version, 1, VERSION_MAX)
        _hash("hash", self.hash)
        upserted = _check_services(self.upserted, "upserted")
        if isinstance(self.removed, str | bytes) or not isinstance(self.removed, Iterable):
            raise SnapshotError(f"removed: must be a list of names, got {self.removed!r}")
        removed = tuple(self.removed)
        for i, name in enumerate(removed):
            _name(f"removed[{i}]", name)
        if len(set(removed)) != len(removed):
            raise SnapshotError("removed: a name is listed twice")
        both = sorted({s.name for s in upserted} & set(removed))
        if both:
            raise SnapshotError(f"removed[{both[0]}]: also upserted")
        _set(self, "upserted", upserted)
        _set(self, "removed", tuple(sorted(removed)))
        if self.engines is not None:
            _set(self, "engines", _check_engines(self.engines, "engines"))

    @property
    def empty(self) -> bool:
        return not self.upserted and not self.removed and self.engines is None


def delta(old: Snapshot, new: Snapshot) -> Delta:
    """What turns ``old`` into ``new``: changed or new services whole, removed names, and
    the whole engine list if it changed."""
    before = {s.name: s for s in old.services}
    after = {s.name: s for s in new.services}
    upserted = tuple(s for name, s in after.items() if before.get(name) != s)
    removed = tuple(name for name in before if name not in after)
    engines = new.engines if new.engines != old.engines else None
    return Delta(old.version, new.version, new.hash, upserted, removed, engines)


def apply_delta(snapshot: Snapshot, change: Delta) -> Snapshot:
    """The snapshot ``change`` leads to. Raises :class:`SnapshotError` when it does not
    start from ``snapshot`` or does not end at the announced hash (ask for a full one)."""
    if change.from_version != snapshot.version:
        raise SnapshotError(f"from_version: delta starts at version {change.from_version}, "
                            f"the snapshot is version {snapshot.version}")
    services = {s.name: s for s in snapshot.services}
    for name in change.removed:
        if services.pop(name, None) is None:
            raise SnapshotError(f"removed[{name}]: no such service at version "
                                f"{snapshot.version}")
    for svc in change.upserted:
        services[svc.name] = svc
    engines = snapshot.engines if change.engines is None else change.engines
    try:
        result = Snapshot(change.to_version, tuple(services.values()), engines)
    except SnapshotError as exc:
        raise SnapshotError(f"delta {change.from_version}->{change.to_version}: {exc}") from None
    if result.hash != change.hash:
        raise SnapshotError(f"hash: delta {change.from_version}->{change.to_version} gives "
                            f"{result.hash[:12]}, the controller announced {change.hash[:12]}")
    return result


# -- reports ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BackendCounters:
    """Cumulative kernel counters of one backend (dataplane.abi.BeCounter)."""

    identity: str  # "address:port/protocol" (dataplane.apply.identity)
    selected: int = 0
    connects: int = 0
    failed: int = 0
    established: int = 0
    closed: int = 0
    trips: int = 0

    def __post_init__(self) -> None:
        _text("identity", self.identity, IDENTITY_MAX, empty=False)
        for field in COUNTER_FIELDS:
            _int(field, getattr(self, field), 0, U64_MAX)


COUNTER_FIELDS = ("selected", "connects", "failed", "established", "closed", "trips")


@dataclasses.dataclass(frozen=True)
class Observations:
    """What an agent's report source supplies each interval."""

    engines: tuple[scraper.ScrapeResult, ...] = ()
    counters: tuple[BackendCounters, ...] = ()
    errors: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class AgentReport:
    agent_id: str
    node: str
    applied_version: int  # 0: nothing applied yet
    applied_hash: str  # "" with version 0
    apply_seconds: float = 0.0
    engines: tuple[scraper.ScrapeResult, ...] = ()
    counters: tuple[BackendCounters, ...] = ()
    errors: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _text("agent_id", self.agent_id, IDENTITY_MAX, empty=False)
        _text("node", self.node, IDENTITY_MAX)
        _int("applied_version", self.applied_version, 0, VERSION_MAX)
        if self.applied_version or self.applied_hash:
            _hash("applied_hash", self.applied_hash)
        _set(self, "apply_seconds", _float("apply_seconds", self.apply_seconds, 0.0, 1e6))
        engines = tuple(self.engines)
        seen: set[str] = set()
        for i, result in enumerate(engines):
            if not isinstance(result, scraper.ScrapeResult):
                raise SnapshotError(f"engines[{i}]: must be a ScrapeResult, got {result!r}")
            _check_scrape(f"engines[{result.identity!r}]", result)
            if result.identity in seen:
                raise SnapshotError(f"engines[{result.identity!r}]: listed twice")
            seen.add(result.identity)
        counters = tuple(self.counters)
        names: set[str] = set()
        for i, c in enumerate(counters):
            if not isinstance(c, BackendCounters):
                raise SnapshotError(f"counters[{i}]: must be BackendCounters, got {c!r}")
            if c.identity in names:
                raise SnapshotError(f"counters[{c.identity!r}]: listed twice")
            names.add(c.identity)
        errors = tuple(self.errors)
        for i, text in enumerate(errors):
            _text(f"errors[{i}]", text, TEXT_MAX)
        _set(self, "engines", engines)
        _set(self, "counters", counters)
        _set(self, "errors", errors)


def _check_scrape(path: str, result: scraper.ScrapeResult) -> None:
    _text(f"{path}.identity", result.identity, IDENTITY_MAX, empty=False)
    _bool(f"{path}.metrics_ok", result.metrics_ok)
    _bool(f"{path}.health_ok", result.health_ok)
    _float(f"{path}.latency", result.latency, 0.0, 1e6)
    if result.error is not None:
        _text(f"{path}.error", result.error, TEXT_MAX)
    load = result.load
    if load is None:
        return
    if not isinstance(load, enginemetrics.EngineLoad):
        raise SnapshotError(f"{path}.load: must be an EngineLoad, got {load!r}")
    req = enginemetrics.MAX_REQUESTS
    _float(f"{path}.load.running", load.running, 0.0, req)
    _float(f"{path}.load.waiting", load.waiting, 0.0, req)
    _float(f"{path}.load.kv_usage", load.kv_usage, 0.0, 1.0 + 1e-6)
    _text(f"{path}.load.kv_family", load.kv_family, IDENTITY_MAX)
    _int(f"{path}.load.engines", load.engines, 0, U32_MAX)
    for name, limit in (("ttft_count", enginemetrics.MAX_COUNT),
                        ("ttft_sum", enginemetrics.MAX_SECONDS),
                        ("ttft_p50", enginemetrics.MAX_SECONDS),
                        ("ttft_p90", enginemetrics.MAX_SECONDS)):
        value = getattr(load, name)
        if value is not None:
            _float(f"{path}.load.{name}", value, 0.0, limit)
    for i, pair in enumerate(load.ttft_buckets):
        le, count = pair
        if le != math.inf:  # the +Inf bucket is the one infinite bound allowed
            _float(f"{path}.load.ttft_buckets[{i}].le", le, 0.0, enginemetrics.MAX_SECONDS)
        _float(f"{path}.load.ttft_buckets[{i}].count", count, 0.0, enginemetrics.MAX_COUNT)
