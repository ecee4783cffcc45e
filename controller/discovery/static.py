"""Discovery from a YAML file, for labs and bare metal (no Kubernetes).

The file, in the spirit of the agent's::

    services:
      - name: llm                 # shows up as ServiceSpec.name
        vip: 10.96.0.10           # IPv4 or IPv6
        vip6: fd00:96::a          # optional: dual stack, the IPv6 VIP beside an IPv4 vip
        port: 80
        protocol: tcp             # tcp (default) or udp
        # Behaviour: the kvroute.io/* annotation keys without the prefix ("-" or "_").
        engine: vllm
        affinity: session         # none (default) | client | session
        affinity-timeout: 600
        table-size: 16381
        epsilon: 0.25
        probe-share: 0.05
        breaker: {consecutive-failures: 3, failure-ratio: 0.5, cooldown: 2}  # failed scrape rounds
        metrics-port: 8000
        metrics-path: /metrics
        endpoints:
          - {address: 10.0.0.1, port: 8000, node: node-a, pod: default/gpu0}
          # address6: a dual-stack pod's IPv6 address (needed by a service with vip6)
          - {address: 10.0.0.3, address6: "fd00::3", port: 8000}
          - {address: 10.0.0.2, port: 8000, ready: false, serving: true, terminating: true}

Endpoint conditions default as Kubernetes reads missing ones: ready and serving true,
terminating false.

Unlike Kubernetes annotations, the file is checked as a whole: any problem (a bad
behaviour value included) rejects the file, and the previous list stays in force. One
person edits one file, so telling them at once beats quietly dropping a service's
affinity; Kubernetes objects, owned by many teams, instead fall back per service.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import os
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import yaml

from controller.discovery import discovered

log = logging.getLogger(__name__)

DEFAULT_POLL_INTERVAL = 1.0
DEFAULT_DEBOUNCE = 0.1

_SERVICE_KEYS = frozenset({"name", "vip", "vip6", "port", "protocol", "endpoints"})
_OPTION_KEYS = frozenset(
    k.removeprefix(discovered.PREFIX)
    for k in discovered.KNOWN_ANNOTATIONS
    if k not in discovered.BREAKER_FIELDS
)
_BREAKER_KEYS = frozenset(
    k.removeprefix(discovered.PREFIX + "breaker-") for k in discovered.BREAKER_FIELDS
)
_ENDPOINT_KEYS = frozenset({"address", "address6", "port", "ready", "serving", "terminating",
                            "node", "pod"})


def parse(text: str, source: str = "<static>") -> list[discovered.ServiceSpec]:
    """Parse a whole file; raise ValueError listing every problem found."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{source}: not valid YAML: {exc}") from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ValueError(f"{source}: the top level must be a mapping with a 'services' list")
    unknown = set(doc) - {"services"}
    if unknown:
        raise ValueError(f"{source}: unknown top-level keys {sorted(map(str, unknown))}")
    entries = doc.get("services") or []
    if not isinstance(entries, list):
        raise ValueError(f"{source}: 'services' must be a list")

    problems: list[str] = []
    specs: list[discovered.ServiceSpec] = []
    for i, entry in enumerate(entries):
        try:
            specs.append(_service(entry, f"{source}: services[{i}]"))
        except ValueError as exc:
            problems.append(str(exc))

    seen_keys: dict[tuple[Any, ...], str] = {}
    seen_names: set[tuple[str, int, str]] = set()
    for spec in specs:
        for key in spec.keys:  # a dual-stack service's IPv6 VIP too
            if key in seen_keys:
                problems.append(
                    f"{source}: services {seen_keys[key]!r} and {spec.name!r} both use "
                    f"{key[0]}:{spec.port}/{spec.protocol}"
                )
            seen_keys.setdefault(key, spec.name)
        ident = (spec.name, spec.port, spec.protocol)
        if ident in seen_names:
            problems.append(
                f"{source}: service {spec.name!r} port {spec.port}/{spec.protocol} listed twice"
            )
        seen_names.add(ident)
    if problems:
        raise ValueError("; ".join(problems))
    return sorted(specs, key=_order)


def _order(spec: discovered.ServiceSpec) -> tuple[str, int, str]:
    return (spec.name, spec.port, spec.protocol)


def _service(entry: object, where: str) -> discovered.ServiceSpec:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: must be a mapping")
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{where}: 'name' must be a non-empty string")
    where = f"{where} ({name})"
    annotations: dict[str, object] = {}
    for raw_key, value in entry.items():
        key = str(raw_key)
        norm = key.replace("_", "-")
        if key in _SERVICE_KEYS:
            continue
        if norm == "breaker":
            annotations.update(_breaker(value, where))
        elif norm in _OPTION_KEYS:
            annotations[discovered.PREFIX + norm] = _scalar(value, f"{where}: {key!r}")
        else:
            known = sorted(_SERVICE_KEYS | _OPTION_KEYS | {"breaker"})
            raise ValueError(f"{where}: unknown key {key!r} (known: {', '.join(known)})")
    options, problems = discovered.parse_options(name, annotations)
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems))

    vip = _ip(entry.get("vip"), f"{where}: 'vip'")
    vip6 = _ipv6(entry.get("vip6"), f"{where}: 'vip6'") if "vip6" in entry else None
    port = _port(entry.get("port"), f"{where}: 'port'")
    protocol = entry.get("protocol", "tcp")
    if not isinstance(protocol, str) or protocol.lower() not in ("tcp", "udp"):
        raise ValueError(f"{where}: 'protocol' must be tcp or udp, got {protocol!r}")
    raw_endpoints = entry.get("endpoints") or []
    if not isinstance(raw_endpoints, list):
        raise ValueError(f"{where}: 'endpoints' must be a list")
    endpoints = [_endpoint(e, f"{where}: endpoints[{j}]") for j, e in enumerate(raw_endpoints)]
    addrs = [(e.address, e.port) for e in endpoints]
    dups = sorted({a for a in addrs if addrs.count(a) > 1})
    if dups:
        listed = ", ".join(f"{a}:{p}" for a, p in dups)
        raise ValueError(f"{where}: endpoints listed twice: {listed}")
    return discovered.ServiceSpec.build(
        name=name,
        vip=vip,
        port=port,
        protocol="udp" if protocol.lower() == "udp" else "tcp",
        options=options,
        endpoints=tuple(sorted(endpoints)),
        vip6=vip6,
    )


def _breaker(value: object, where: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise ValueError(f"{where}: 'breaker' must be a mapping")
    out: dict[str, object] = {}
    for raw_key, v in value.items():
        key = str(raw_key).replace("_", "-")
        if key not in _BREAKER_KEYS:
            known = ", ".join(sorted(_BREAKER_KEYS))
            raise ValueError(f"{where}: unknown breaker key {raw_key!r} (known: {known})")
        out[discovered.PREFIX + "breaker-" + key] = _scalar(v, f"{where}: breaker {raw_key!r}")
    return out


def _scalar(value: object, what: str) -> str:
    # Annotations are strings; YAML gives ints and floats, which read back the same.
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"{what} must be a string or a number, got {value!r}")
    return str(value)


def _endpoint(entry: object, where: str) -> discovered.Endpoint:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: must be a mapping")
    unknown = set(map(str, entry)) - _ENDPOINT_KEYS
    if unknown:
        raise ValueError(
            f"{where}: unknown keys {sorted(unknown)} (known: {', '.join(sorted(_ENDPOINT_KEYS))})"
        )
    flags = {}
    for flag, default in (("ready", True), ("serving", True), ("terminating", False)):
        value = entry.get(flag, default)
        if not isinstance(value, bool):
            raise ValueError(f"{where}: {flag!r} must be true or false, got {value!r}")
        flags[flag] = value
    labels: dict[str, str | None] = {}
    for key in ("node", "pod"):
        value = entry.get(key)
        if value is not None and (not isinstance(value, str) or not value):
            raise ValueError(f"{where}: {key!r} must be a non-empty string")
        labels[key] = value
    return discovered.Endpoint(
        address=_ip(entry.get("address"), f"{where}: 'address'"),
        address6=(_ipv6(entry.get("address6"), f"{where}: 'address6'")
                  if "address6" in entry else None),
        port=_port(entry.get("port"), f"{where}: 'port'"),
        ready=flags["ready"],
        serving=flags["serving"],
        terminating=flags["terminating"],
        node=labels["node"],
        pod=labels["pod"],
    )


def _ip(value: object, what: str) -> discovered.IPAddress:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be an IP address string, got {value!r}")
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"{what} must be an IPv4 or IPv6 address, got {value!r}") from None


def _ipv6(value: object, what: str) -> ipaddress.IPv6Address:
    address = _ip(value, what)
    if not isinstance(address, ipaddress.IPv6Address):
        raise ValueError(f"{what} must be an IPv6 address, got {value!r}")
    return address


def _port(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError(f"{what} must be an integer in [1, 65535], got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class _Signature:
    """What tells a rewritten file apart, even within one mtime tick."""

    mtime_ns: int
    size: int
    inode: int


class StaticDiscovery:
    """Services from a YAML file, re-read when it changes.

    The constructor reads the file and raises ValueError/OSError if it cannot (nothing to
    fall back to yet). Afterwards a file that cannot be read or parsed is logged and
    ignored: the previous list stays until a good file appears.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        debounce: float = DEFAULT_DEBOUNCE,
    ) -> None:
        if not poll_interval > 0 or debounce < 0:
            raise ValueError("poll_interval must be > 0 and debounce >= 0")
        self.path = Path(path)
        self.poll_interval = poll_interval
        self.debounce = debounce
        self.last_error: str | None = None
        self._signature: _Signature | None = self._stat()
        self._specs = parse(self.path.read_text(), str(self.path))

    def snapshot(self) -> list[discovered.ServiceSpec]:
        return list(self._specs)

    def reload(self) -> bool:
        """Re-read the file now. True when the list changed; False when it is the same or
        the file is bad (then :attr:`last_error` says why and the old list stays)."""
        try:
            # Remember what was read even if it is bad, so polling reports it only once.
            self._signature = None
            self._signature = self._stat()
            specs = parse(self.path.read_text(), str(self.path))
        except (OSError, ValueError) as exc:
            message = str(exc)
            if message != self.last_error:
                log.error("static discovery: keeping the previous services: %s", message)
            self.last_error = message
            return False
        if self.last_error is not None:
            log.info("static discovery: %s is valid again", self.path)
        self.last_error = None
        changed = specs != self._specs
        self._specs = specs
        if changed:
            log.info("static discovery: %d service ports from %s", len(specs), self.path)
        return changed

    def changed_on_disk(self) -> bool:
        try:
            return self._stat() != self._signature
        except OSError:
            # Gone (or unreadable) now but not when last read: worth a reload to say so.
            return self._signature is not None

    async def watch(self) -> AsyncGenerator[list[discovered.ServiceSpec], None]:
        """Yield the list now, then again each time it changes (file edits picked up by
        polling every ``poll_interval``, or explicit :meth:`reload` calls)."""
        last: list[discovered.ServiceSpec] | None = None
        while True:
            if self.changed_on_disk():
                # Let a writer that is not atomic finish before reading.
                await asyncio.sleep(self.debounce)
                self.reload()
            current = self.snapshot()
            if current != last:
                last = current
                yield list(current)
            await asyncio.sleep(self.poll_interval)

    def _stat(self) -> _Signature:
        st = self.path.stat()
        return _Signature(st.st_mtime_ns, st.st_size, st.st_ino)
