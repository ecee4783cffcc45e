"""Desired state of the node dataplane, read from YAML and validated as a whole.

The file lists services (a VIP, port and protocol that kvroute takes over) and
their backends.  Everything is checked before anything is used: a file with a
typo or an impossible value is rejected whole, with every problem reported at
once, each prefixed by its field path (``services[1].backends[0].port: must be
between 1 and 65535``).

Shape (defaults in brackets)::

    table_size: 16381               # [16381] M for services with affinity
    services:
      - name: llm-chat              # [a-z0-9]([-a-z0-9.]*[a-z0-9])?, <= 63 chars, unique
        vip: 10.96.0.10             # IPv4
        port: 8000                  # 1..65535
        protocol: tcp               # [tcp] tcp | udp
        affinity: session           # [none] none | client | session
        affinity_timeout: 10800     # [10800] seconds, 1..86400 (kube-proxy's ClientIP default)
        table_size: 16381           # prime, 7..131071; default below
        epsilon: 0.25               # [0.25] bounded-load epsilon, 0..10, null disables
        probe_share: 0.05           # [0.05] share of new sessions a probing backend may take
        backends:                   # [] (a service without backends fails connects fast)
          - address: 10.244.1.5     # IPv4
            port: 8000              # 1..65535
            weight: 100             # [100] 0..65535
            state: active           # [active] active | draining | open | probing
            load: 0                 # [0] integer >= 0, the bounded-load input

Default ``table_size`` of a service: with affinity, the top-level ``table_size``
(sessions must keep their slot as backends come and go, so the table is big);
without, the smallest of 251, 509, 1021, ..., 131071 that is at least
``max(251, 64 * backends)``.

Backends do not carry the protocol (it belongs to the service): the identity a
backend is hashed by in the Maglev table is ``backend_identity(service, backend)``,
``"<address>:<port>/<protocol>"``.

The public models are plain frozen dataclasses; pydantic only validates input.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any

import pydantic
import yaml

from dataplane import maglev

DEFAULT_TABLE_SIZE = 16381
AUTO_TABLE_SIZES = (251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071)
MIN_TABLE_SIZE = 7
MAX_TABLE_SIZE = 131071
DEFAULT_AFFINITY_TIMEOUT = 10800
DEFAULT_EPSILON = 0.25
DEFAULT_PROBE_SHARE = 0.05
DEFAULT_WEIGHT = 100

_NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")


class ConfigError(ValueError):
    """The desired state is invalid; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class Protocol(enum.StrEnum):
    TCP = "tcp"
    UDP = "udp"


class Affinity(enum.StrEnum):
    NONE = "none"
    CLIENT = "client"
    SESSION = "session"


class BackendState(enum.StrEnum):
    ACTIVE = "active"
    DRAINING = "draining"
    OPEN = "open"
    PROBING = "probing"


@dataclasses.dataclass(frozen=True)
class Backend:
    address: ipaddress.IPv4Address
    port: int
    weight: int = DEFAULT_WEIGHT
    state: BackendState = BackendState.ACTIVE
    load: int = 0


@dataclasses.dataclass(frozen=True)
class Service:
    name: str
    vip: ipaddress.IPv4Address
    port: int
    protocol: Protocol
    affinity: Affinity
    affinity_timeout: int
    table_size: int
    epsilon: float | None
    probe_share: float
    backends: tuple[Backend, ...]
    # Every engine is over its queue and KV limits (the controller's policy): new
    # connections fail fast with ECONNREFUSED instead of queueing without end.
    saturated: bool = False

    @property
    def key(self) -> tuple[ipaddress.IPv4Address, int, str]:
        """What the kernel's service map is keyed by: (VIP, port, protocol)."""
        return (self.vip, self.port, self.protocol.value)


@dataclasses.dataclass(frozen=True)
class DesiredState:
    services: tuple[Service, ...] = ()


def backend_identity(service: Service, backend: Backend) -> str:
    """The string a backend is hashed by in Maglev, e.g. ``"10.244.1.5:8000/tcp"``."""
    return f"{backend.address}:{backend.port}/{service.protocol.value}"


def auto_table_size(affinity: Affinity, backends: int, default: int = DEFAULT_TABLE_SIZE) -> int:
    """Table size of a service that does not set one (see the module docstring)."""
    if affinity is not Affinity.NONE:
        return default
    want = max(AUTO_TABLE_SIZES[0], 64 * backends)
    return next((m for m in AUTO_TABLE_SIZES if m >= want), AUTO_TABLE_SIZES[-1])


# --- input validation (pydantic) -------------------------------------------


def _between(lo: float, hi: float) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if not lo <= value <= hi:
            raise ValueError(f"must be between {lo} and {hi}")
        return value

    return check


def _check_name(value: str) -> str:
    if len(value) > 63:
        raise ValueError("must be at most 63 characters")
    if not _NAME_RE.fullmatch(value):
        raise ValueError(
            "must be lower-case letters, digits, '-' or '.', "
            "starting and ending with a letter or digit"
        )
    return value


def _check_table_size(value: int) -> int:
    if not MIN_TABLE_SIZE <= value <= MAX_TABLE_SIZE:
        raise ValueError(f"must be between {MIN_TABLE_SIZE} and {MAX_TABLE_SIZE}")
    if not maglev.is_prime(value):
        raise ValueError("must be a prime number")
    return value


_Port = Annotated[pydantic.StrictInt, pydantic.AfterValidator(_between(1, 65535))]
_TableSize = Annotated[pydantic.StrictInt, pydantic.AfterValidator(_check_table_size)]
_Fraction = Annotated[float, pydantic.Field(strict=True), pydantic.AfterValidator(_between(0, 1))]
_Epsilon = Annotated[float, pydantic.Field(strict=True), pydantic.AfterValidator(_between(0, 10))]
_Strict = pydantic.ConfigDict(extra="forbid", frozen=True)


class _BackendIn(pydantic.BaseModel):
    model_config = _Strict
    address: ipaddress.IPv4Address
    port: _Port
    weight: Annotated[pydantic.StrictInt, pydantic.AfterValidator(_between(0, 65535))] = (
        DEFAULT_WEIGHT
    )
    state: BackendState = BackendState.ACTIVE
    load: Annotated[pydantic.StrictInt, pydantic.Field(ge=0)] = 0


class _ServiceIn(pydantic.BaseModel):
    model_config = _Strict
    name: Annotated[pydantic.StrictStr, pydantic.AfterValidator(_check_name)]
    vip: ipaddress.IPv4Address
    port: _Port
    protocol: Protocol = Protocol.TCP
    affinity: Affinity = Affinity.NONE
    affinity_timeout: Annotated[pydantic.StrictInt, pydantic.AfterValidator(_between(1, 86400))] = (
        DEFAULT_AFFINITY_TIMEOUT
    )
    table_size: _TableSize | None = None
    epsilon: _Epsilon | None = DEFAULT_EPSILON
    probe_share: _Fraction = DEFAULT_PROBE_SHARE
    saturated: pydantic.StrictBool = False
    backends: list[_BackendIn] = []


class _StateIn(pydantic.BaseModel):
    model_config = _Strict
    table_size: _TableSize = DEFAULT_TABLE_SIZE
    services: list[Any] = []


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _problem(prefix: tuple[int | str, ...], err: Mapping[str, Any]) -> str:
    loc = tuple(err["loc"])
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind == "value_error":
        msg = str(ctx.get("error", err["msg"]))
    elif kind == "extra_forbidden":
        msg = "unknown key"
    elif kind == "missing":
        msg = "required"
    elif kind in ("model_type", "dict_type"):
        msg = "must be a mapping"
    elif kind == "list_type":
        msg = "must be a list"
    elif kind in ("string_type", "str_type"):
        msg = "must be a string"
    elif kind == "enum":
        msg = f"must be one of {ctx.get('expected', '')}".replace("'", "")
    elif kind.startswith("int"):
        msg = "must be an integer"
    elif kind.startswith("float"):
        msg = "must be a number"
    elif kind.startswith("ip_v4"):
        msg = "must be an IPv4 address"
    elif kind == "greater_than_equal":
        msg = f"must be at least {ctx.get('ge')}"
    else:
        msg = err["msg"][:1].lower() + err["msg"][1:]
    return f"{_path(prefix + loc)}: {msg}"


def _validate(
    model: type[pydantic.BaseModel], data: Any, prefix: tuple[int | str, ...], problems: list[str]
) -> Any:
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        problems.extend(_problem(prefix, e) for e in exc.errors())
        return None


def from_dict(data: Any) -> DesiredState:
    """Validate a parsed document; raise ``ConfigError`` listing every problem."""
    if data is None:
        raise ConfigError(["(top level): the desired state is empty"])
    if not isinstance(data, Mapping):
        raise ConfigError(["(top level): must be a mapping with a 'services' list"])
    problems: list[str] = []
    top = _validate(_StateIn, data, (), problems)
    if top is None:
        # Still look at the services, so that one run reports everything.
        raw = data.get("services")
        top_size = DEFAULT_TABLE_SIZE
        raw_services = raw if isinstance(raw, list) else []
    else:
        top_size, raw_services = top.table_size, top.services
    services: list[Service] = []
    for i, raw_service in enumerate(raw_services):
        spec = _validate(_ServiceIn, raw_service, ("services", i), problems)
        if spec is not None:
            services.append(_service(spec, top_size))
    _check_unique(raw_services, problems)
    if problems:
        raise ConfigError(problems)
    return DesiredState(services=tuple(services))


def _service(spec: _ServiceIn, top_size: int) -> Service:
    return Service(
        name=spec.name,
        vip=spec.vip,
        port=spec.port,
        protocol=spec.protocol,
        affinity=spec.affinity,
        affinity_timeout=spec.affinity_timeout,
        table_size=spec.table_size or auto_table_size(spec.affinity, len(spec.backends), top_size),
        epsilon=spec.epsilon,
        probe_share=spec.probe_share,
        saturated=spec.saturated,
        backends=tuple(
            Backend(address=b.address, port=b.port, weight=b.weight, state=b.state, load=b.load)
            for b in spec.backends
        ),
    )


def _raw_ip(value: Any) -> ipaddress.IPv4Address | None:
    try:
        return ipaddress.IPv4Address(value) if isinstance(value, str) else None
    except ValueError:
        return None


def _check_unique(raw_services: list[Any], problems: list[str]) -> None:
    """Cross-service and cross-backend duplicates.

    Runs on the raw input, field by field, so that a duplicate is reported even
    when the entries involved have other problems too.
    """
    names: dict[str, int] = {}
    keys: dict[tuple[ipaddress.IPv4Address, int, str], tuple[int, Any]] = {}
    for i, raw in enumerate(raw_services):
        if not isinstance(raw, Mapping):
            continue
        name = raw.get("name")
        if isinstance(name, str):
            if name in names:
                problems.append(
                    f"services[{i}].name: duplicate name {name!r} (also services[{names[name]}])"
                )
            else:
                names[name] = i
        vip, port, proto = _raw_ip(raw.get("vip")), raw.get("port"), raw.get("protocol", "tcp")
        if vip is not None and type(port) is int and proto in ("tcp", "udp"):
            key = (vip, port, proto)
            if key in keys:
                j, other = keys[key]
                problems.append(
                    f"services[{i}]: {vip}:{port}/{proto} of service {name!r} is already "
                    f"used by service {other!r} (services[{j}])"
                )
            else:
                keys[key] = (i, name)
        backends = raw.get("backends")
        if not isinstance(backends, list):
            continue
        seen: dict[tuple[ipaddress.IPv4Address, int], int] = {}
        for k, b in enumerate(backends):
            if not isinstance(b, Mapping):
                continue
            addr, bport = _raw_ip(b.get("address")), b.get("port")
            if addr is None or type(bport) is not int:
                continue
            if (addr, bport) in seen:
                problems.append(
                    f"services[{i}].backends[{k}]: duplicate backend {addr}:{bport} "
                    f"(also backends[{seen[(addr, bport)]}]) in service {name!r}"
                )
            else:
                seen[(addr, bport)] = k


def parse(text: str) -> DesiredState:
    """Parse and validate YAML text."""
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise ConfigError([f"YAML syntax error at {where}: {exc.problem or exc}"]) from exc
    except yaml.YAMLError as exc:
        raise ConfigError([f"YAML error: {exc}"]) from exc
    return from_dict(data)


def load_file(path: str | Path) -> DesiredState:
    """Read and validate a YAML file (``ConfigError`` names the file on failure)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{p}: cannot read: {exc.strerror or exc}"]) from exc
    try:
        return parse(text)
    except ConfigError as exc:
        raise ConfigError([f"{p}: {line}" for line in exc.problems]) from exc


def to_dict(state: DesiredState) -> dict[str, Any]:
    """Plain data (YAML/JSON ready) with every default spelled out; ``from_dict`` inverts it."""
    return {
        "services": [
            {
                "name": s.name,
                "vip": str(s.vip),
                "port": s.port,
                "protocol": s.protocol.value,
                "affinity": s.affinity.value,
                "affinity_timeout": s.affinity_timeout,
                "table_size": s.table_size,
                "epsilon": s.epsilon,
                "probe_share": s.probe_share,
                "saturated": s.saturated,
                "backends": [
                    {
                        "address": str(b.address),
                        "port": b.port,
                        "weight": b.weight,
                        "state": b.state.value,
                        "load": b.load,
                    }
                    for b in s.backends
                ],
            }
            for s in state.services
        ]
    }
