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
- A service's VIPs are its first IPv4 and first IPv6 cluster IP (``spec.clusterIPs``,
  else ``spec.clusterIP``): a dual-stack service is one spec with both (``vip`` the IPv4
  one, ``vip6`` the IPv6 one), an IPv6-only service one with an IPv6 ``vip``. Headless
  (``None``) and ``ExternalName`` services are skipped silently, as kube-proxy does; a
  missing cluster IP is noted.
- One spec per TCP or UDP service port (``protocol`` defaults to TCP); SCTP is noted and
  skipped.
- Slices join their service by the ``kubernetes.io/service-name`` label in the same
  namespace, and a slice port joins a service port by name (both unnamed counts as the
  same name) and protocol. ``IPv4`` and ``IPv6`` slices count for the VIP families the
  service has (``FQDN`` ones never). A dual-stack service pairs a pod's IPv4 and IPv6
  endpoints (by ``targetRef``) into one endpoint, so a session finds the same engine from
  either family; an endpoint without its other family (a slice not yet updated, no
  targetRef) is left out with a note until it has both.
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
        other = next((owners[k] for k in spec.keys if k in owners), None)
        if other is not None and other != spec.name:
            notes.append(
                f"service {spec.name}: {spec.vip}:{spec.port}/{spec.protocol} is already "
                f"used by {other}; skipped"
            )
            continue
        if other is not None:
            notes.append(f"service {spec.name}: port {spec.port}/{spec.protocol} listed twice")
            continue
        for k in spec.keys:
            owners[k] = spec.name
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
    vips = _cluster_ips(name, spec, notes)
    if vips is None:
        return []
    vip, vip6 = vips
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
        families = ("IPv4", "IPv6") if vip6 is not None else (f"IPv{vip.version}",)
        endpoints = _endpoints_for(name, port, slices, notes, families)
        out.append(
            discovered.ServiceSpec.build(
                name=name,
                vip=vip,
                vip6=vip6,
                port=port.port,
                protocol=port.protocol,
                port_name=port.name,
                options=options,
                endpoints=endpoints,
                problems=problems,
            )
        )
    return out


def _cluster_ips(
    name: str, spec: Mapping[str, Any], notes: list[str]
) -> tuple[discovered.IPAddress, ipaddress.IPv6Address | None] | None:
    """(first VIP, IPv6 VIP of a dual-stack service) or None: nothing to balance."""
    candidates = [ip for ip in _list(spec.get("clusterIPs")) if isinstance(ip, str)]
    single = spec.get("clusterIP")
    if isinstance(single, str) and single not in candidates:
        candidates.insert(0, single)
    if "None" in candidates:
        return None  # headless: DNS only, nothing to balance
    if not candidates:
        notes.append(f"service {name}: no clusterIP; skipped")
        return None
    v4: ipaddress.IPv4Address | None = None
    v6: ipaddress.IPv6Address | None = None
    for text in candidates:
        try:
            addr = ipaddress.ip_address(text)
        except ValueError:
            notes.append(f"service {name}: clusterIP {text!r} is not an IP address")
            continue
        if isinstance(addr, ipaddress.IPv4Address):
            v4 = v4 or addr
        else:
            v6 = v6 or addr
    if v4 is not None:
        return v4, v6
    if v6 is not None:
        return v6, None
    notes.append(f"service {name}: no usable clusterIP; skipped")
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
    name: str, port: _Port, slices: list[Mapping[str, Any]], notes: list[str],
    families: tuple[str, ...] = ("IPv4",),
) -> tuple[discovered.Endpoint, ...]:
    best: dict[tuple[discovered.IPAddress, int], discovered.Endpoint] = {}
    for sl in slices:
        if sl.get("addressType") not in families:
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
    if len(families) == 1:
        return tuple(sorted(best.values()))
    return _pair_families(name, list(best.values()), notes)


def _pair_families(name: str, endpoints: list[discovered.Endpoint],
                   notes: list[str]) -> tuple[discovered.Endpoint, ...]:
    """A dual-stack service's endpoints: each pod's IPv4 endpoint with its IPv6 address.
    The pair takes the less useful state of the two (a pod terminating in one slice is
    terminating)."""
    v6_of: dict[tuple[str, int], discovered.Endpoint] = {}
    for ep in endpoints:
        if isinstance(ep.address, ipaddress.IPv6Address) and ep.pod is not None:
            v6_of[(ep.pod, ep.port)] = ep
    paired = []
    for ep in endpoints:
        if ep.address.version == 6:
            if ep.pod is None:
                notes.append(f"service {name}: IPv6 endpoint {ep.address} has no targetRef "
                             "to pair with an IPv4 one; skipped")
            continue
        other = v6_of.pop((ep.pod, ep.port), None) if ep.pod is not None else None
        if other is None:
            notes.append(f"service {name}: endpoint {ep.address}:{ep.port} has no IPv6 "
                         "endpoint of the same pod yet; skipped")
            continue
        worse = ep if _STATE_RANK[ep.state] >= _STATE_RANK[other.state] else other
        assert isinstance(other.address, ipaddress.IPv6Address)  # v6_of holds only those
        paired.append(dataclasses.replace(
            ep, address6=other.address, ready=worse.ready, serving=worse.serving,
            terminating=worse.terminating))
    for ep in v6_of.values():
        notes.append(f"service {name}: endpoint [{ep.address}]:{ep.port} has no IPv4 "
                     "endpoint of the same pod yet; skipped")
    return tuple(sorted(paired))


def _endpoint(entry: Mapping[str, Any], port: int) -> discovered.Endpoint | str:
    addresses = _list(entry.get("addresses"))
    if not addresses:
        return "has no addresses"
    try:
        address = ipaddress.ip_address(addresses[0])
    except ValueError:
        return f"address {addresses[0]!r} is not an IP address"
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
