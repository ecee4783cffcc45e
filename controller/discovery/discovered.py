"""What discovery hands to the controller, and the kvroute.io/* annotation parser.

Pure: data classes and functions, no I/O. Both sources (static file, Kubernetes) build
:class:`ServiceSpec` through :func:`parse_options`, so a value means the same thing
whichever source it came from.

A service opts into kvroute behaviour with annotations (the static file uses the same keys
without the ``kvroute.io/`` prefix). Without any, a service is balanced the way kube-proxy
would do it: a random backend per connection, or per client when the Kubernetes service
asks for ``sessionAffinity: ClientIP``. A bad value anywhere in a service's annotations
(or an unknown ``kvroute.io/`` key, most likely a typo) drops *all* of its annotations:
the service falls back to that plain behaviour and the problems are reported, so one
mistyped knob never half-applies the others or stops the controller.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import math
import types
from collections.abc import AsyncIterator, Mapping, Set
from typing import Any, Literal, Protocol

from controller import breaker as breakermod
from dataplane import model

PREFIX = "kvroute.io/"
ENGINE = PREFIX + "engine"
AFFINITY = PREFIX + "affinity"
AFFINITY_TIMEOUT = PREFIX + "affinity-timeout"
TABLE_SIZE = PREFIX + "table-size"
EPSILON = PREFIX + "epsilon"
MOVE_EPSILON = PREFIX + "move-epsilon"
PROBE_SHARE = PREFIX + "probe-share"
BREAKER_CONSECUTIVE_FAILURES = PREFIX + "breaker-consecutive-failures"
BREAKER_FAILURE_RATIO = PREFIX + "breaker-failure-ratio"
BREAKER_COOLDOWN = PREFIX + "breaker-cooldown"
METRICS_PORT = PREFIX + "metrics-port"
METRICS_PATH = PREFIX + "metrics-path"

# Annotation → BreakerConfig field, so a spec's breaker dict feeds
# ``dataclasses.replace(BreakerConfig(), **spec.breaker)`` directly.
BREAKER_FIELDS: Mapping[str, str] = types.MappingProxyType(
    {
        BREAKER_CONSECUTIVE_FAILURES: "consecutive_failures",
        BREAKER_FAILURE_RATIO: "failure_ratio",
        BREAKER_COOLDOWN: "cooldown_base",
    }
)

KNOWN_ANNOTATIONS = frozenset(
    {
        ENGINE,
        AFFINITY,
        AFFINITY_TIMEOUT,
        TABLE_SIZE,
        EPSILON,
        MOVE_EPSILON,
        PROBE_SHARE,
        METRICS_PORT,
        METRICS_PATH,
        *BREAKER_FIELDS,
    }
)

ENGINES = frozenset({"vllm"})
Affinity = Literal["none", "client", "session"]
AFFINITIES: tuple[Affinity, ...] = ("none", "client", "session")
Protocol_ = Literal["tcp", "udp"]

# The model's limits (dataplane.model, defined there once): a value the datapath would
# refuse is refused here, where the message can name the service and annotation.
DEFAULT_AFFINITY_TIMEOUT = model.DEFAULT_AFFINITY_TIMEOUT  # kube-proxy's ClientIP default
MAX_AFFINITY_TIMEOUT = model.AFFINITY_TIMEOUT_MAX
MIN_TABLE_SIZE = model.TABLE_SIZE_MIN
MAX_TABLE_SIZE = model.TABLE_SIZE_MAX  # and prime: Maglev needs it
MAX_EPSILON = model.EPSILON_MAX
DEFAULT_METRICS_PATH = "/metrics"
_MAX_PATH_LEN = 256


class State(enum.Enum):
    """What the policy may do with an endpoint."""

    ACTIVE = "active"  # ready: may take new sessions
    DRAINING = "draining"  # terminating but still serving: keeps pinned sessions only
    EXCLUDED = "excluded"  # not serving: gets nothing


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclasses.dataclass(frozen=True, order=True)
class Endpoint:
    """One endpoint; a dual-stack pod's is one endpoint with both addresses (its IPv4
    ``address`` and ``address6``), so a session finds the same engine from either family.
    A service's endpoints are all of one ``address`` family (they sort together)."""

    address: IPAddress
    port: int
    ready: bool
    serving: bool
    terminating: bool
    node: str | None = None
    pod: str | None = None  # "<namespace>/<name>" of the pod behind it, when known
    address6: ipaddress.IPv6Address | None = None  # dual stack: the pod's IPv6 address

    def __post_init__(self) -> None:
        if not isinstance(self.address, IPAddress):
            raise ValueError(f"Endpoint.address must be an IP address, got {self.address!r}")
        if self.address6 is not None and not (
                isinstance(self.address6, ipaddress.IPv6Address)
                and isinstance(self.address, ipaddress.IPv4Address)):
            raise ValueError("Endpoint.address6 must be an IPv6Address beside an IPv4 address, "
                             f"got {self.address6!r}")
        _check_port("Endpoint.port", self.port)

    @property
    def state(self) -> State:
        # Kubernetes marks an endpoint ready only when it is serving and not terminating;
        # trust "ready" first, as kube-proxy does (publishNotReadyAddresses sets it).
        if self.ready:
            return State.ACTIVE
        if self.serving and self.terminating:
            return State.DRAINING
        return State.EXCLUDED


@dataclasses.dataclass(frozen=True)
class Options:
    """The behaviour knobs of one service, after parsing and validation."""

    llm: bool = False
    affinity: Affinity = "none"
    affinity_timeout: int = 0  # seconds; 0 when affinity is "none"
    table_size: int | None = None  # None: the controller's default
    epsilon: float | None = None  # None: the policy default
    move_epsilon: float | None = None  # None: live sessions never move for load
    probe_share: float | None = None
    breaker: Mapping[str, float] = dataclasses.field(
        default_factory=lambda: types.MappingProxyType({})
    )
    metrics_port: int | None = None  # None: scrape the endpoint's own port
    metrics_path: str = DEFAULT_METRICS_PATH


@dataclasses.dataclass(frozen=True)
class ServiceSpec:
    """One (VIP, port, protocol) the datapath balances, with its endpoints.

    A Kubernetes Service with several ports gives one spec per port, all with the same
    ``name`` and told apart by ``port_name``/``port``/``protocol``.
    """

    name: str  # "<namespace>/<name>" for Kubernetes, the entry's name in a static file
    vip: IPAddress
    port: int
    protocol: Protocol_
    endpoints: tuple[Endpoint, ...] = ()
    port_name: str = ""
    llm: bool = False
    affinity: Affinity = "none"
    affinity_timeout: int = 0
    table_size: int | None = None
    epsilon: float | None = None
    move_epsilon: float | None = None
    probe_share: float | None = None
    # Read-only view; not hashed (a mapping is not hashable), compared by content.
    breaker: Mapping[str, float] = dataclasses.field(
        default_factory=lambda: types.MappingProxyType({}), hash=False
    )
    metrics_port: int | None = None
    metrics_path: str = DEFAULT_METRICS_PATH
    # Why the annotations were dropped (empty when they were all valid).
    problems: tuple[str, ...] = ()
    vip6: ipaddress.IPv6Address | None = None  # dual stack: the IPv6 VIP beside an IPv4 one

    def __post_init__(self) -> None:
        if not isinstance(self.vip, IPAddress):
            raise ValueError(f"ServiceSpec.vip must be an IP address, got {self.vip!r}")
        if self.vip6 is not None and not (isinstance(self.vip6, ipaddress.IPv6Address)
                                          and isinstance(self.vip, ipaddress.IPv4Address)):
            raise ValueError(f"ServiceSpec.vip6 must be an IPv6Address beside an IPv4 vip, "
                             f"got {self.vip6!r}")
        _check_port("ServiceSpec.port", self.port)
        if self.protocol not in ("tcp", "udp"):
            raise ValueError(f"ServiceSpec.protocol must be tcp or udp, got {self.protocol!r}")
        if not isinstance(self.breaker, types.MappingProxyType):
            object.__setattr__(self, "breaker", types.MappingProxyType(dict(self.breaker)))

    @classmethod
    def build(
        cls,
        *,
        name: str,
        vip: IPAddress,
        port: int,
        protocol: Protocol_,
        options: Options,
        endpoints: tuple[Endpoint, ...] = (),
        port_name: str = "",
        problems: tuple[str, ...] = (),
        vip6: ipaddress.IPv6Address | None = None,
    ) -> ServiceSpec:
        return cls(
            name=name,
            vip=vip,
            vip6=vip6,
            port=port,
            protocol=protocol,
            endpoints=endpoints,
            port_name=port_name,
            problems=problems,
            **{f.name: getattr(options, f.name) for f in dataclasses.fields(Options)},
        )

    @property
    def key(self) -> tuple[IPAddress, int, str]:
        """What the kernel looks a connection up by (the first VIP's)."""
        return (self.vip, self.port, self.protocol)

    @property
    def keys(self) -> tuple[tuple[IPAddress, int, str], ...]:
        """Every VIP's key: a dual-stack service has two."""
        if self.vip6 is None:
            return (self.key,)
        return self.key, (self.vip6, self.port, self.protocol)

    def breaker_config(
        self, base: breakermod.BreakerConfig | None = None
    ) -> breakermod.BreakerConfig:
        """``base`` (or the defaults) with this service's breaker annotations applied."""
        fields: dict[str, Any] = dict(self.breaker)
        return dataclasses.replace(base or breakermod.BreakerConfig(), **fields)


class Discovery(Protocol):
    """A source of services. ``watch`` yields the full, sorted list whenever it changed."""

    def snapshot(self) -> list[ServiceSpec]: ...

    def watch(self) -> AsyncIterator[list[ServiceSpec]]: ...


DEFAULT_MAX_REMOVAL_SHARE = 0.5


def removal_refused(before: Set[object], after: Set[object],
                    max_share: float) -> str | None:
    """Why a discovery result listing the service ports ``after`` where ``before`` were
    must not be applied (None: apply it). A truncated static file or an API server answering an
    empty list would otherwise remove every service from every node's kernel; taking away
    all of them, or more than ``max_share`` at once, needs the operator's word
    (``--max-removal-share 1``)."""
    removed = len(before - after)
    if not before or not removed or max_share >= 1.0:
        return None
    if not after:
        return (f"discovery lists no service where {len(before)} were: refused, keeping them "
                f"(a truncated file or an empty answer?); run with --max-removal-share 1 "
                f"to allow it")
    if removed > max_share * len(before):
        return (f"discovery would remove {removed} of {len(before)} service ports at once, more "
                f"than --max-removal-share {max_share:g}: refused, keeping them")
    return None


class AnnotationError(ValueError):
    """One bad annotation; the message names the service and the annotation."""


def parse_options(
    service: str,
    annotations: Mapping[str, object],
    *,
    client_ip_affinity: bool = False,
    client_ip_timeout: int | None = None,
) -> tuple[Options, tuple[str, ...]]:
    """Parse a service's ``kvroute.io/*`` annotations into :class:`Options`.

    ``client_ip_affinity``/``client_ip_timeout`` carry Kubernetes' own
    ``sessionAffinity: ClientIP``; it gives ``client`` affinity unless
    ``kvroute.io/affinity`` says otherwise. Keys without the ``kvroute.io/`` prefix are
    ignored (other tools' annotations).

    Returns the options and the problems found. With any problem, the options are the
    plain fallback (as if no ``kvroute.io/`` annotation were present), never a mix.
    """
    fallback = _plain(service, client_ip_affinity, client_ip_timeout)
    problems: list[str] = []
    if fallback.problem:
        problems.append(fallback.problem)
    values: dict[str, object] = {}
    for key in sorted(k for k in annotations if k.startswith(PREFIX)):
        try:
            values[key] = _parse_one(service, key, annotations[key])
        except AnnotationError as exc:
            problems.append(str(exc))
    if problems:
        return fallback.options, tuple(problems)

    affinity = values.get(AFFINITY, fallback.options.affinity)
    assert isinstance(affinity, str)
    timeout = values.get(AFFINITY_TIMEOUT)
    if affinity == "none":
        if timeout is not None:
            return fallback.options, (
                f"service {service}: annotation {AFFINITY_TIMEOUT} is set but affinity is "
                f"'none' (set {AFFINITY} to client or session)",
            )
        timeout = 0
    elif timeout is None:
        timeout = (
            fallback.options.affinity_timeout
            if fallback.options.affinity_timeout
            else DEFAULT_AFFINITY_TIMEOUT
        )

    breaker_values: dict[str, Any] = {
        BREAKER_FIELDS[k]: v for k, v in values.items() if k in BREAKER_FIELDS
    }
    if breaker_values:
        try:
            dataclasses.replace(breakermod.BreakerConfig(), **breaker_values)
        except (ValueError, TypeError) as exc:
            names = ", ".join(k for k in sorted(values) if k in BREAKER_FIELDS)
            return fallback.options, (f"service {service}: annotations {names}: {exc}",)

    options = Options(
        llm=values.get(ENGINE) == "vllm",
        affinity=_as_affinity(affinity),
        affinity_timeout=_as_int(timeout),
        table_size=_opt_int(values.get(TABLE_SIZE)),
        epsilon=_opt_float(values.get(EPSILON)),
        move_epsilon=_opt_float(values.get(MOVE_EPSILON)),
        probe_share=_opt_float(values.get(PROBE_SHARE)),
        breaker=types.MappingProxyType(breaker_values),
        metrics_port=_opt_int(values.get(METRICS_PORT)),
        metrics_path=str(values.get(METRICS_PATH, DEFAULT_METRICS_PATH)),
    )
    return options, ()


@dataclasses.dataclass(frozen=True)
class _Plain:
    options: Options
    problem: str | None


def _plain(service: str, client_ip: bool, timeout: int | None) -> _Plain:
    if not client_ip:
        return _Plain(Options(), None)
    if timeout is None:
        return _Plain(Options(affinity="client", affinity_timeout=DEFAULT_AFFINITY_TIMEOUT), None)
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int)
        or not (1 <= timeout <= MAX_AFFINITY_TIMEOUT)
    ):
        # The API server validates this, so only a hand-made object gets here.
        return _Plain(
            Options(affinity="client", affinity_timeout=DEFAULT_AFFINITY_TIMEOUT),
            f"service {service}: sessionAffinityConfig.clientIP.timeoutSeconds must be an "
            f"integer in [1, {MAX_AFFINITY_TIMEOUT}], got {timeout!r}; using "
            f"{DEFAULT_AFFINITY_TIMEOUT}",
        )
    return _Plain(Options(affinity="client", affinity_timeout=timeout), None)


_MODEL_FIELDS = {AFFINITY_TIMEOUT: "affinity_timeout", TABLE_SIZE: "table_size",
                 EPSILON: "epsilon", MOVE_EPSILON: "move_epsilon"}
_FLOAT_FIELDS = ("epsilon", "move_epsilon")


def _parse_one(service: str, key: str, raw: object) -> object:
    def bad(why: str) -> AnnotationError:
        return AnnotationError(f"service {service}: annotation {key}={raw!r}: {why}")

    if key not in KNOWN_ANNOTATIONS:
        known = ", ".join(sorted(KNOWN_ANNOTATIONS))
        raise bad(f"unknown kvroute annotation (known: {known})")
    if isinstance(raw, bool) or not isinstance(raw, str | int | float):
        raise bad("must be a string")
    text = str(raw).strip()
    if key == ENGINE:
        if text not in ENGINES:
            raise bad(f"engine must be one of {sorted(ENGINES)}")
        return text
    if key == AFFINITY:
        if text not in AFFINITIES:
            raise bad(f"must be one of {', '.join(AFFINITIES)}")
        return text
    if key in _MODEL_FIELDS:
        # The model judges its own fields: the controller refuses what every agent would,
        # with the model's words, before anything is published.
        field = _MODEL_FIELDS[key]
        value: int | float
        try:
            value = float(text) if field in _FLOAT_FIELDS else int(text, 10)
        except ValueError:
            raise bad("must be a number" if field in _FLOAT_FIELDS
                      else "must be an integer") from None
        try:
            # Alone, with the bounded-load check off: how move_epsilon compares with the
            # service's epsilon is judged where both are known (the reconciler's Service).
            model.Service("check", "10.0.0.1", 1, affinity=model.Affinity.CLIENT,
                          **{"epsilon": None, field: value})  # type: ignore[arg-type]
        except model.ModelError as exc:
            raise bad(str(exc).removeprefix(f"{field}: ")) from None
        return value
    if key == PROBE_SHARE:
        value = _float_in(text, bad, low=0.0, high=1.0)
        if not 0.0 < value < 1.0:
            raise bad("must be strictly between 0 and 1")
        return value
    if key == BREAKER_CONSECUTIVE_FAILURES:
        return _int_in(text, 1, 1000, bad)
    if key == BREAKER_FAILURE_RATIO:
        value = _float_in(text, bad, low=0.0, high=1.0)
        if value == 0.0:
            raise bad("must be in (0, 1]")
        return value
    if key == BREAKER_COOLDOWN:
        value = _float_in(text, bad, low=0.0, high=math.inf)
        if value == 0.0:
            raise bad("must be > 0 seconds")
        return value
    if key == METRICS_PORT:
        return _int_in(text, 1, 65535, bad)
    if key == METRICS_PATH:
        if (
            not text.startswith("/")
            or len(text) > _MAX_PATH_LEN
            or any(c.isspace() or not c.isprintable() for c in text)
        ):
            raise bad(f"must be an absolute URL path ('/…', no spaces, <= {_MAX_PATH_LEN} chars)")
        return text
    raise AssertionError(key)  # every known key is handled above


def _int_in(text: str, low: int, high: int, bad: _Bad) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise bad("must be an integer") from None
    if not low <= value <= high:
        raise bad(f"must be in [{low}, {high}]")
    return value


def _float_in(text: str, bad: _Bad, *, low: float, high: float) -> float:
    try:
        value = float(text)
    except ValueError:
        raise bad("must be a number") from None
    if not math.isfinite(value) or not low <= value <= high:
        bound = "" if math.isinf(high) else f", <= {high:g}"
        raise bad(f"must be a finite number >= {low:g}{bound}")
    return value


class _Bad(Protocol):
    def __call__(self, why: str) -> AnnotationError: ...


def _check_port(what: str, port: object) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"{what} must be an integer in [1, 65535], got {port!r}")


def _as_affinity(value: str) -> Affinity:
    for a in AFFINITIES:
        if value == a:
            return a
    raise AssertionError(value)


def _as_int(value: object) -> int:
    assert isinstance(value, int)
    return value


def _opt_int(value: object) -> int | None:
    assert value is None or isinstance(value, int)
    return value


def _opt_float(value: object) -> float | None:
    assert value is None or isinstance(value, float)
    return value
