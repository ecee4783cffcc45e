"""The packet path's tables: frontends, the node's addresses, local backends, SNAT
settings and conntrack (bpf/lib/abi.h, "Packet path (tc)").

``frontends`` and ``local_members`` are pure: what the kernel must hold, from the model.
``NodePortMaps`` reads and writes the pinned maps, writing only what differs.
"""

from __future__ import annotations

import ctypes as ct
import dataclasses
import ipaddress
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from dataplane import abi, bpfsys, hashing, inspect, maps, model

SNAT_PORT_MIN, SNAT_PORT_MAX = model.SNAT_PORTS
ANY_ADDRESS = "0.0.0.0"  # a NodePort frontend's key address: any of the node's addresses

FeKey = tuple[str, int, str]  # (address, port, protocol)


@dataclasses.dataclass(frozen=True)
class Frontend:
    """One address:port/protocol the packet path answers, and the service behind it."""

    address: str  # ANY_ADDRESS for a NodePort
    port: int
    protocol: str
    service: str  # the service's name
    service_key: tuple[str, int, str]  # its (vip, port, protocol): kvr_svc_v2's key
    local: bool  # externalTrafficPolicy: Local
    node_port: bool

    @property
    def flags(self) -> int:
        return (abi.NP_F_LOCAL if self.local else 0) | (abi.NP_F_NODEPORT if self.node_port
                                                        else 0)

    @property
    def label(self) -> str:
        where = "*" if self.node_port else self.address
        return f"{where}:{self.port}/{self.protocol}"


def frontends(services: Iterable[model.Service]) -> dict[FeKey, Frontend]:
    """Every packet-path frontend of the services: a NodePort on any node address, and
    each external (or LoadBalancer) IP on the service's port."""
    out: dict[FeKey, Frontend] = {}
    for svc in services:
        local = svc.external_traffic_policy == model.TrafficPolicy.LOCAL
        proto = str(svc.protocol)
        entries = [(ip, svc.port, False) for ip in svc.external_ips]
        if svc.node_port is not None:
            entries.append((ANY_ADDRESS, svc.node_port, True))
        for address, port, is_np in entries:
            out[(address, port, proto)] = Frontend(address, port, proto, svc.name,
                                                   (svc.vip, svc.port, proto), local, is_np)
    return out


def local_members(services: Iterable[model.Service],
                  is_local: Callable[[str], bool]) -> dict[str, list[str]]:
    """Service name -> identities of its backends on this node (``is_local`` judges an
    identity), for services with a frontend; at most NP_LOCAL_MAX each, in backend
    order (the kernel's list decides SNAT and Local picks: one past the limit would be
    SNATed although local, so it is refused in the model instead)."""
    out: dict[str, list[str]] = {}
    for svc in services:
        if svc.node_port is None and not svc.external_ips:
            continue
        ids = [svc.identity(be) for be in svc.backends if is_local(svc.identity(be))]
        if ids:
            out[svc.name] = ids[:abi.NP_LOCAL_MAX]
    return out


def _fe_key(key: FeKey) -> abi.L4Key:
    return abi.l4_key(*key)


class NodePortMaps:
    """The packet path's pinned maps (dataplane.maps.NODEPORT_MAPS, but the programs'
    own), with typed reads and writes."""

    def __init__(self, pin_dir: Path) -> None:
        self.set = maps.MapSet(pin_dir, [n for n in maps.NODEPORT_MAPS
                                         if n not in ("kvr_np_progs", "kvr_np_scratch")],
                               absent="the packet path is loaded by `kvroute agent "
                                      "--external-interface IFACE`")
        self.fds = self.set.fds

    def close(self) -> None:
        self.set.close()

    def __enter__(self) -> NodePortMaps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _sync(self, name: str, key_t: Any, want: Mapping[bytes, tuple[Any, Any]]) -> int:
        """Make map ``name`` hold exactly ``want`` (raw key bytes -> (key, value)):
        writes what differs, then deletes what is gone. Returns the writes."""
        fd = self.fds[name]
        have = {bytes(k): k for k in self.set.keys(name, key_t)}
        writes = 0
        for raw, (key, val) in want.items():
            old = type(val)()
            if raw in have and bpfsys.lookup(fd, key, old) and bytes(old) == bytes(val):
                continue
            bpfsys.update(fd, key, val)
            writes += 1
        for raw, key in have.items():
            if raw not in want:
                bpfsys.delete(fd, key)
                writes += 1
        return writes

    # -- writes ---------------------------------------------------------------------------
    def set_config(self, snat_addr: str | None, port_min: int = SNAT_PORT_MIN,
                   port_max: int = SNAT_PORT_MAX) -> None:
        if not 1 <= port_min <= port_max <= 65535:
            raise ValueError(f"SNAT ports: need 1 <= min <= max <= 65535, got "
                             f"{port_min}-{port_max}")
        cfg = abi.NpConfig(snat_addr=abi.ip_to_be32(snat_addr) if snat_addr else 0,
                           snat_min=port_min, snat_max=port_max)
        bpfsys.update(self.fds["kvr_np_cfg"], ct.c_uint32(0), cfg)

    def set_node_addresses(self, addresses: Iterable[str]) -> int:
        want = {}
        for text in addresses:
            key = ct.c_uint32(abi.ip_to_be32(text))
            want[bytes(key)] = (key, ct.c_uint32(1))
        return self._sync("kvr_np_addr", ct.c_uint32, want)

    def set_frontends(self, fes: Mapping[FeKey, Frontend]) -> int:
        want = {}
        for key, fe in fes.items():
            k = _fe_key(key)
            val = abi.NpFrontend(svc=abi.l4_key(*fe.service_key), flags=fe.flags)
            want[bytes(k)] = (k, val)
        return self._sync("kvr_np_fe_v1", abi.L4Key, want)

    def set_local(self, local: Mapping[int, list[int]]) -> int:
        """Service id -> ids of its backends on this node."""
        want = {}
        for svc_id, be_ids in local.items():
            if len(be_ids) > abi.NP_LOCAL_MAX:
                raise ValueError(f"service {svc_id}: {len(be_ids)} local backends, more "
                                 f"than the {abi.NP_LOCAL_MAX} the kernel keeps")
            val = abi.NpLocal(n=len(be_ids))
            for i, be_id in enumerate(be_ids):
                val.be_id[i] = be_id
            k = ct.c_uint32(svc_id)
            want[bytes(k)] = (k, val)
        return self._sync("kvr_np_local_v1", ct.c_uint32, want)

    def prune_counters(self, keep: Iterable[int]) -> int:
        """Remove the counters of services not in ``keep`` (ids are reused: a new service
        must not inherit a removed one's counts)."""
        keep = set(keep)
        gone = [k for k in self.set.keys("kvr_np_cnt", ct.c_uint32) if k.value not in keep]
        for key in gone:
            bpfsys.delete(self.fds["kvr_np_cnt"], key)
        return len(gone)

    # -- reads ----------------------------------------------------------------------------
    def config(self) -> abi.NpConfig:
        cfg = self.set.get("kvr_np_cfg", ct.c_uint32(0), abi.NpConfig)
        assert cfg is not None  # an array always has its entry
        return cfg

    def frontends(self) -> list[tuple[abi.L4Key, abi.NpFrontend]]:
        return list(self.set.items("kvr_np_fe_v1", abi.L4Key, abi.NpFrontend))

    def local(self, svc_id: int) -> list[int]:
        val = self.set.get("kvr_np_local_v1", ct.c_uint32(svc_id), abi.NpLocal)
        return [] if val is None else list(val.be_id[:min(val.n, abi.NP_LOCAL_MAX)])

    def conntrack(self) -> list[tuple[abi.CtKey, abi.Ct]]:
        return list(self.set.items("kvr_ct_v1", abi.CtKey, abi.Ct))

    def counters(self, svc_id: int) -> list[int]:
        got = self.set.percpu_sum("kvr_np_cnt", ct.c_uint32(svc_id), abi.NpCounters)
        return got if got is not None else [0] * len(abi.NpCounter)

    def reasons(self) -> dict[str, int]:
        return self.set.reasons("kvr_np_reasons", abi.NpReason)


def ct_state(val: abi.Ct, proto: int, now_ns: int | None = None) -> str:
    """A conntrack entry's state, for people: syn (no answer yet), established, closing
    (a FIN each way), fin (this direction's), or expired (dead, not yet removed)."""
    now_ns = time.monotonic_ns() if now_ns is None else now_ns
    if now_ns - val.last_ns > val.lifetime_s * 1_000_000_000:
        return "expired"
    if val.flags & abi.CT_F_CLOSING:
        return "closing"
    if val.flags & abi.CT_F_FIN:
        return "fin"
    if val.flags & abi.CT_F_SEEN_REPLY:
        return "established"
    return "syn" if proto == 6 else "new"


def ct_rows(entries: Iterable[tuple[abi.CtKey, abi.Ct]],
            now_ns: int | None = None) -> list[dict[str, Any]]:
    """Conntrack entries as rows for the CLI: tuple as it arrives, rewrite, state, age."""
    now_ns = time.monotonic_ns() if now_ns is None else now_ns
    rows = []
    for key, val in entries:
        proto = abi.PROTO_NAME.get(key.proto, str(key.proto))

        def ep(addr: int, port: int) -> str:
            return f"{abi.be32_to_ip(addr)}:{abi.be16_to_port(port)}"

        src, dst = ep(key.saddr[0], key.sport), ep(key.daddr[0], key.dport)
        new_src = ep(val.nat_saddr[0], val.nat_sport) if val.flags & abi.CT_F_SRC else src
        new_dst = ep(val.nat_daddr[0], val.nat_dport) if val.flags & abi.CT_F_DST else dst
        rows.append({
            "dir": "orig" if key.dir == abi.CT_ORIG else "reply", "proto": proto,
            "src": src, "dst": dst, "to_src": new_src, "to_dst": new_dst,
            "svc_id": val.svc_id, "be_id": val.be_id,
            "state": ct_state(val, key.proto, now_ns),
            "age_s": round(max(0, now_ns - val.created_ns) / 1e9, 1),
            "idle_s": round(max(0, now_ns - val.last_ns) / 1e9, 1),
            "packets": val.packets,
        })
    rows.sort(key=lambda r: (r["svc_id"], r["src"], r["dir"]))
    return rows


def _addresses(netns: str | None, ifname: str | None) -> list[str]:
    import pyroute2
    ipr = pyroute2.NetNS(netns) if netns else pyroute2.IPRoute()
    try:
        kw = {}
        if ifname is not None:
            links = ipr.link_lookup(ifname=ifname)
            if not links:
                raise ValueError(f"no interface {ifname!r}")
            kw["index"] = links[0]
        out = []
        for msg in ipr.get_addr(family=2, **kw):
            addr = msg.get_attr("IFA_ADDRESS")
            if addr and not ipaddress.IPv4Address(addr).is_loopback:
                out.append(addr)
        return out
    finally:
        ipr.close()


def node_addresses(netns: str | None = None) -> list[str]:
    """The IPv4 addresses of a network namespace's interfaces (loopback's excepted): the
    addresses a NodePort answers on."""
    return sorted(set(_addresses(netns, None)))


def interface_addresses(ifname: str, netns: str | None = None) -> list[str]:
    """An interface's IPv4 addresses, in the kernel's order (the primary first)."""
    return _addresses(netns, ifname)


def apply(npm: NodePortMaps, services: Iterable[model.Service],
          service_id: Callable[[str], int | None], backend_id: Callable[[str], int | None],
          is_local: Callable[[str], bool]) -> int:
    """Write the packet path's frontends and local backend lists for ``services`` (after
    the services and backends themselves are in the kernel: the ids come from the
    applier). Frontends of services without an id yet are left out. Returns the writes."""
    services = list(services)
    known = {s.name for s in services if service_id(s.name) is not None}
    fes = {k: fe for k, fe in frontends(services).items() if fe.service in known}
    local: dict[int, list[int]] = {}
    for name, identities in local_members(services, is_local).items():
        svc_id = service_id(name)
        be_ids = [i for i in (backend_id(ident) for ident in identities) if i is not None]
        if svc_id is not None and be_ids:
            local[svc_id] = be_ids
    # Local lists before frontends: a new Local frontend finds its backends at once.
    writes = npm.set_local(local) + npm.set_frontends(fes)
    svc_ids = (service_id(s.name) for s in services)
    return writes + npm.prune_counters(i for i in svc_ids if i is not None)


def client_key(address: str) -> int:
    """The affinity key the packet path gives a client (KVR_AFF_KEY_IP4)."""
    return (1 << 63) | abi.ip_to_be32(address)


def find_frontend(mapset: maps.MapSet, npm: NodePortMaps,
                  ref: str) -> tuple[str, abi.NpFrontend]:
    """A frontend by ADDRESS:PORT[/proto] as a packet would hit it: an external IP, or
    one of the node's addresses (or ``*``) and a NodePort. Raises LookupError_."""
    text = ref.replace("*", ANY_ADDRESS, 1) if ref.startswith("*:") else ref
    try:
        addr, port, proto = abi.parse_endpoint(text)
    except ValueError as exc:
        raise inspect.LookupError_(str(exc)) from None
    if addr.version != 4:
        raise inspect.LookupError_(f"{ref}: the packet path serves IPv4 frontends only")
    # Frontend keys hold the maps' 128-bit form (np4_frontend): compare in it.
    fes = {(abi.from_words(k.addr), k.port, k.proto): v for k, v in npm.frontends()}
    key = abi.l4_key(addr, port, proto)
    fe = fes.get((abi.addr128(addr), key.port, key.proto))
    node_addr = ct.c_uint32(abi.ip_to_be32(str(addr)))  # kvr_np_addr holds bare IPv4
    if fe is None and (str(addr) == ANY_ADDRESS or
                       bpfsys.lookup(npm.fds["kvr_np_addr"], node_addr, ct.c_uint32())):
        fe = fes.get((abi.addr128(ANY_ADDRESS), key.port, key.proto))
    if fe is None:
        raise inspect.LookupError_(f"no NodePort or external IP answers {addr}:{port}/{proto}")
    return f"{addr}:{port}/{proto}", fe


def explain(mapset: maps.MapSet, npm: NodePortMaps, ref: str, client: str) -> dict[str, Any]:
    """Walk the packet path's choice for a new flow from ``client`` to frontend ``ref``
    without sending a packet (a tracked flow keeps the backend it has)."""
    label, fe = find_frontend(mapset, npm, ref)
    svc_ref = abi.format_endpoint(abi.from_words(fe.svc.addr), fe.svc.port, fe.svc.proto)
    _, svc = inspect.find_service(mapset, svc_ref)
    local_ids = npm.local(svc.id)
    policy = "local" if fe.flags & abi.NP_F_LOCAL else "cluster"
    key = client_key(client)
    head = [{"what": "frontend", "detail": f"{label} -> service {svc_ref} "
                                           f"(externalTrafficPolicy {policy})"},
            {"what": "local", "detail": f"backends on this node: {local_ids or 'none'}"}]
    if policy == "local":
        bes = {b["id"]: b for b in inspect.backends(mapset)}
        ident = svc.ident  # the kernel's own: what np_pick_local hashes with
        meta = mapset.meta()
        chosen = None
        steps = list(head)
        if local_ids:
            first = local_ids[hashing.slot_hash(key, ident, 0, meta.hash_seed) % len(local_ids)]
            for be_id in [first, *local_ids]:
                be = bes.get(be_id)
                ok = be is not None and be["state"] not in ("draining", "open")
                steps.append({"what": "local pick", "detail": f"backend {be_id}: "
                              f"{be['state'] if be else 'gone'}"})
                if ok:
                    chosen = be_id
                    break
        return {"service": svc.id, "key": f"{key:016x}", "key_kind": f"client {client}",
                "steps": steps, "backend": bes[chosen]["address"] if chosen is not None else None,
                "backend_id": chosen, "snat": False,
                "reason": "local backend, client address kept" if chosen is not None
                else "no usable local backend: packets dropped"}
    data = inspect.explain(mapset, svc_ref, key, f"client {client}")
    data["steps"] = head + data["steps"]
    cfg = npm.config()
    chosen = data["backend_id"]
    if chosen is None:
        data["reason"] = "no usable backend: packets dropped"
        data["snat"] = False
    elif chosen in local_ids:
        data["snat"] = False
        data["reason"] += "; on this node: client address kept"
    else:
        data["snat"] = True
        snat = str(abi.be32_to_ip(cfg.snat_addr)) if cfg.snat_addr else None
        data["reason"] += (f"; on another node: SNAT to {snat}:{cfg.snat_min}-{cfg.snat_max}"
                           if snat else "; on another node, but no SNAT address: left alone")
    return data

