"""Kubernetes Service and EndpointSlice objects (as JSON dicts) → :class:`ServiceSpec`.

Pure: the watcher in :mod:`controller.discovery.k8s` keeps the raw objects and calls
:func:`build` whenever one changes. Objects are read as the API serves them, without the
client's typed models, because those refuse objects with missing required fields and one
odd object must not stop discovery of the others. Anything unusable is skipped with a
note (returned, for the caller to log), never raised.

Rules, following kube-proxy where it has one:

- Beside kube-proxy (``annotated_only``), only services carrying a ``kvroute.io/``
  annotation are balanced: the others stay kube-proxy's. Replacing kube-proxy, every
  service is.
- Only services with an IPv4 cluster IP are balanced (the first IPv4 address in
  ``spec.clusterIPs``, else ``spec.clusterIP``). Headless (``None``) and ``ExternalName``
  services are skipped silently, as kube-proxy does; a missing cluster IP is noted.
- One spec per TCP or UDP service port (``protocol`` defaults to TCP); SCTP is noted and
  skipped.
- Slices join their service by the ``kubernetes.io/service-name`` label in the same
  namespace, and a slice port joins a service port by name (both unnamed counts as the
  same name) and protocol. Only ``IPv4`` slices count.
- An endpoint uses its first address (kube-proxy does the same). Missing conditions read
  as Kubernetes documents: ``ready`` and ``serving`` nil mean true, ``terminating`` nil
  means false. An endpoint listed by two slices (during slice churn) is kept once, in
  its most useful state.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

from controller.discovery import discovered

SERVICE_NAME_LABEL = "kubernetes.io/service-name"

_STATE_RANK = {discovered.State.ACTIVE: 0, discovered.State.DRAINING: 1,
               discovered.State.EXCLUDED: 2}


@dataclasses.dataclass(frozen=True)
class Result:
    specs: list[discovered.ServiceSpec]  # sorted by (name, port, protocol)
    notes: list[str]  # objects or fields skipped, and annotation problems


@dataclasses.dataclass(frozen=True)
class _Port:
    name: str
    port: int
    protocol: discovered.Protocol_


def object_key(obj: object) -> tuple[str, str] | None:
    """``(namespace, name)`` of an API object, or None if it has no name."""
    meta = _dict(_dict(obj).get("metadata"))
    name, namespace = meta.get("name"), meta.get("namespace", "")
    if not isinstance(name, str) or not name or not isinstance(namespace, str):
        return None
    return (namespace, name)


def build(services: Iterable[Mapping[str, Any]], slices: Iterable[Mapping[str, Any]],
          annotated_only: bool = False) -> Result:
    notes: list[str] = []
    by_service: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for sl in slices:
        key = object_key(sl)
        labels = _dict(_dict(_dict(sl).get("metadata")).get("labels"))
        owner = labels.get(SERVICE_NAME_LABEL)
        if key is None or not isinstance(owner, str) or not owner:
            continue  # not a service's slice (or nameless): nothing to join
        by_service.setdefault((key[0], owner), []).append(sl)

    specs: list[discovered.ServiceSpec] = []
    for svc in services:
        key = object_key(svc)
        if key is None:
            notes.append("skipping a Service without metadata.name")
            continue
        name = f"{key[0]}/{key[1]}"
        if annotated_only and not is_annotated(svc):
            continue  # kube-proxy's, not ours
        try:
            own_slices = sorted(by_service.get(key, []), key=lambda s: object_key(s) or ("", ""))
            specs.extend(_service_specs(name, svc, own_slices, notes))
        except (TypeError, ValueError, AttributeError, KeyError) as exc:
            # The parsers above check types; this is the last guard against a shape
            # nobody foresaw, so one object can never stop the others.
            notes.append(f"service {name}: skipped, malformed object: {exc!r}")

    specs.sort(key=lambda s: (s.name, s.port, s.protocol))
    unique: list[discovered.ServiceSpec] = []
    owners: dict[tuple[Any, ...], str] = {}
    for spec in specs:
        if spec.key in owners and owners[spec.key] != spec.name:
            notes.append(
                f"service {spec.name}: {spec.vip}:{spec.port}/{spec.protocol} is already "
                f"used by {owners[spec.key]}; skipped"
            )
            continue
        if spec.key in owners:
            notes.append(f"service {spec.name}: port {spec.port}/{spec.protocol} listed twice")
            continue
        owners[spec.key] = spec.name
        unique.append(spec)
    # A slice's problem shows up once per service port; say it once.
    return Result(unique, list(dict.fromkeys(notes)))


def is_annotated(svc: Mapping[str, Any]) -> bool:
    """The service opted into kvroute: it carries at least one ``kvroute.io/`` annotation
    (a bad value still counts: the service is ours, balanced plainly, and noted)."""
    annotations = _dict(_dict(svc.get("metadata")).get("annotations"))
    return any(isinstance(k, str) and k.startswith(discovered.PREFIX) for k in annotations)


def _service_specs(
    name: str,
    svc: Mapping[str, Any],
    slices: list[Mapping[str, Any]],
    notes: list[str],
) -> list[discovered.ServiceSpec]:
    spec = _dict(svc.get("spec"))
    if spec.get("type") == "ExternalName":
        return []
    vip = _cluster_ipv4(name, spec, notes)
    if vip is None:
        return []
    ports = _service_ports(name, spec, notes)
    if not ports:
        return []

    meta = _dict(svc.get("metadata"))
    annotations = _dict(meta.get("annotations"))
    client_ip = spec.get("sessionAffinity") == "ClientIP"
    timeout = (
        _dict(_dict(spec.get("sessionAffinityConfig")).get("clientIP")).get("timeoutSeconds")
        if client_ip
        else None
    )
    options, problems = discovered.parse_options(
        name, annotations, client_ip_affinity=client_ip, client_ip_timeout=timeout
    )
    if problems:
        notes.extend(problems)
        notes.append(f"service {name}: annotations ignored, balanced like kube-proxy")

    out = []
    for port in ports:
        endpoints = _endpoints_for(name, port, slices, notes)
        out.append(
            discovered.ServiceSpec.build(
                name=name,
                vip=vip,
                port=port.port,
                protocol=port.protocol,
                port_name=port.name,
                options=options,
                endpoints=endpoints,
                problems=problems,
            )
        )
    return out


def _cluster_ipv4(
    name: str, spec: Mapping[str, Any], notes: list[str]
) -> ipaddress.IPv4Address | None:
    candidates = [ip for ip in _list(spec.get("clusterIPs")) if isinstance(ip, str)]
    single = spec.get("clusterIP")
    if isinstance(single, str) and single not in candidates:
        candidates.insert(0, single)
    if "None" in candidates:
        return None  # headless: DNS only, nothing to balance
    if not candidates:
        notes.append(f"service {name}: no clusterIP; skipped")
        return None
    for text in candidates:
        try:
            addr = ipaddress.ip_address(text)
        except ValueError:
            notes.append(f"service {name}: clusterIP {text!r} is not an IP address")
            continue
        if isinstance(addr, ipaddress.IPv4Address):
            return addr
    notes.append(f"service {name}: no IPv4 clusterIP (IPv6 is not balanced yet); skipped")
    return None


def _service_ports(name: str, spec: Mapping[str, Any], notes: list[str]) -> list[_Port]:
    raw = _list(spec.get("ports"))
    if not raw:
        notes.append(f"service {name}: no ports; skipped")
        return []
    ports = []
    for i, entry in enumerate(raw):
        port = _port_of(_dict(entry))
        if isinstance(port, str):
            notes.append(f"service {name}: ports[{i}] {port}; skipped")
        else:
            ports.append(port)
    return ports


def _port_of(entry: Mapping[str, Any]) -> _Port | str:
    """A port entry (service or slice) or why it cannot be used."""
    number = entry.get("port")
    if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= 65535:
        return f"has no valid port number ({number!r})"
    protocol = entry.get("protocol") or "TCP"
    if protocol not in ("TCP", "UDP"):
        return f"protocol {protocol!r} is not supported (TCP and UDP are)"
    port_name = entry.get("name") or ""
    if not isinstance(port_name, str):
        return f"has a non-string name {port_name!r}"
    return _Port(port_name, number, "udp" if protocol == "UDP" else "tcp")


def _endpoints_for(
    name: str, port: _Port, slices: list[Mapping[str, Any]], notes: list[str]
) -> tuple[discovered.Endpoint, ...]:
    best: dict[tuple[ipaddress.IPv4Address, int], discovered.Endpoint] = {}
    for sl in slices:
        if sl.get("addressType") != "IPv4":
            continue
        target = None
        for entry in _list(sl.get("ports")):
            candidate = _port_of(_dict(entry))
            if (
                isinstance(candidate, _Port)
                and candidate.name == port.name
                and candidate.protocol == port.protocol
            ):
                target = candidate.port
                break
        if target is None:
            continue
        slice_name = (object_key(sl) or ("", "?"))[1]
        for i, raw in enumerate(_list(sl.get("endpoints"))):
            ep = _endpoint(raw, target) if isinstance(raw, dict) else "is not an object"
            if isinstance(ep, str):
                notes.append(
                    f"service {name}: EndpointSlice {slice_name} endpoints[{i}] {ep}; skipped"
                )
                continue
            seen = best.get((ep.address, ep.port))
            if seen is None or _STATE_RANK[ep.state] < _STATE_RANK[seen.state]:
                best[(ep.address, ep.port)] = ep
    return tuple(sorted(best.values()))


def _endpoint(entry: Mapping[str, Any], port: int) -> discovered.Endpoint | str:
    addresses = _list(entry.get("addresses"))
    if not addresses:
        return "has no addresses"
    try:
        address = ipaddress.IPv4Address(addresses[0])
    except ValueError:
        return f"address {addresses[0]!r} is not an IPv4 address"
    conditions = entry.get("conditions")
    if conditions is None:
        conditions = {}
    if not isinstance(conditions, dict):
        return f"has malformed conditions {conditions!r}"
    flags = {}
    for flag, nil in (("ready", True), ("serving", True), ("terminating", False)):
        value = conditions.get(flag)
        if value is None:
            value = nil
        if not isinstance(value, bool):
            return f"condition {flag}={value!r} is not a boolean"
        flags[flag] = value
    node = entry.get("nodeName")
    ref = _dict(entry.get("targetRef"))
    pod = None
    if ref.get("kind") == "Pod" and isinstance(ref.get("name"), str):
        pod = f"{ref.get('namespace') or ''}/{ref['name']}"
    return discovered.Endpoint(
        address=address,
        port=port,
        ready=flags["ready"],
        serving=flags["serving"],
        terminating=flags["terminating"],
        node=node if isinstance(node, str) and node else None,
        pod=pod,
    )


def _dict(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []
