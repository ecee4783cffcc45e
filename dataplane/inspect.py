"""Read-side core of the CLI: the pinned maps as plain data, and `explain`,
which predicts the connect hook's choice for a key step by step."""

from __future__ import annotations

import ctypes as ct
import dataclasses
import os
import socket
import time
from typing import Any

from dataplane import abi, hashing
from dataplane.maps import MapSet

U32 = ct.c_uint32
SO_NETNS_COOKIE = 71  # include/uapi/asm-generic/socket.h, Linux 5.14+


class LookupError_(LookupError):
    """A named service or backend is not in the maps."""


def frontend(key: abi.L4Key) -> str:
    """A service map key as text: '10.96.0.10:53/udp', '[fd00::a]:53/udp'."""
    return abi.format_endpoint(abi.from_words(key.addr), key.port, key.proto)


def backend_addresses(be: abi.Backend) -> list[str]:
    """A backend's endpoint(s): one per address it has, IPv4 first."""
    out = []
    proto = abi.PROTO_NAME.get(be.proto, str(be.proto))
    port = abi.be16_to_port(be.port)
    if be.addr4:
        out.append(f"{abi.be32_to_ip(be.addr4)}:{port}/{proto}")
    v6 = abi.from_words(be.addr6)
    if v6:
        out.append(f"[{abi.ip_of(v6)}]:{port}/{proto}")
    return out


def services(maps: MapSet) -> list[dict[str, Any]]:
    """One row per service; a dual-stack service lists both VIPs."""
    names = {k.value: v.name.decode() for k, v in maps.items("kvr_svc_name", U32, abi.SvcName)}
    vips: dict[int, list[str]] = {}
    values: dict[int, abi.Svc] = {}
    for key, svc in maps.items("kvr_svc_v2", abi.L4Key, abi.Svc):
        vips.setdefault(svc.id, []).append(frontend(key))
        values[svc.id] = svc
    out = []
    for svc_id, svc in values.items():
        # IPv4 first, as the model names them (vip, then vip6).
        fronts = sorted(vips[svc_id], key=lambda f: f.startswith("["))
        counters = maps.percpu_sum("kvr_svc_cnt_v3", U32(svc.id), abi.SvcCounters) or []
        out.append({
            "id": svc.id, "name": names.get(svc.id, ""),
            "frontend": fronts[0], "frontends": fronts,
            "affinity": abi.Affinity(svc.affinity).name.lower(),
            "affinity_timeout": svc.aff_timeout, "table_size": svc.table_size,
            "epsilon": None if svc.eps_milli == abi.EPS_OFF else svc.eps_milli / 1000,
            "probe_share": svc.probe_milli / 1000, "backends": svc.n_backends,
            "saturated": bool(svc.flags & abi.SVC_F_SATURATED),
            "fleet": bool(svc.flags & abi.SVC_F_FLEET),
            "move_epsilon": svc.move_eps_milli / 1000 if svc.move_eps_milli else None,
            "revision": f"{svc.revision:016x}",
            "counters": {c.name.lower(): counters[c] if counters else 0 for c in abi.SvcCounter},
        })
    return sorted(out, key=lambda s: s["id"])


def backends(maps: MapSet) -> list[dict[str, Any]]:
    members: dict[int, list[int]] = {}
    for mk, _ in maps.items("kvr_member", abi.MemberKey, U32):
        members.setdefault(mk.be_id, []).append(mk.svc_id)
    out = []
    for k, be in maps.items("kvr_be_v2", U32, abi.Backend):
        health = maps.get("kvr_health", k, abi.Health) or abi.Health()
        load = maps.get("kvr_be_load", k, U32)
        sessions = maps.get("kvr_be_sess", k, U32)
        counters = maps.percpu_sum("kvr_be_cnt", k, abi.BeCounters) or []
        tripped = bool(health.flags & abi.HEALTH_TRIPPED)
        addresses = backend_addresses(be)
        out.append({
            "id": k.value, "address": addresses[0] if addresses else "", "addresses": addresses,
            "state": "open" if tripped else abi.BackendState(be.state).name.lower(),
            "configured_state": abi.BackendState(be.state).name.lower(),
            "kernel_tripped": tripped, "consecutive_failures": health.consec_fail,
            "srtt_us": health.srtt_us, "load": load.value if load else 0,
            "sessions": sessions.value if sessions else 0,
            "services": sorted(members.get(k.value, [])),
            "counters": {c.name.lower(): counters[c] if counters else 0 for c in abi.BeCounter},
        })
    return sorted(out, key=lambda b: b["id"])


def affinity(maps: MapSet, svc_id: int | None = None) -> list[dict[str, Any]]:
    now = time.monotonic_ns()
    out = []
    for key, val in maps.items("kvr_affinity", abi.AffKey, abi.AffVal):
        if svc_id is not None and key.svc_id != svc_id:
            continue
        out.append({"service": key.svc_id, "key": f"{key.key:016x}", "backend": val.be_id,
                    "idle_seconds": round(max(0, now - val.last_ns) / 1e9, 3),
                    # Fleet services: seconds since the kernel last announced it.
                    "reported_seconds": max(0, now // 10**9 - val.reported_s)})
    return sorted(out, key=lambda a: (a["service"], a["key"]))


def stats(maps: MapSet) -> dict[str, Any]:
    reasons = maps.reasons()
    live = len(maps.keys("kvr_udp_v1", ct.c_uint64))
    return {
        "services": {s["name"] or str(s["id"]): s["counters"] for s in services(maps)},
        "backends": {b["address"]: b["counters"] for b in backends(maps)},
        "reasons": reasons,
        # UDP sockets' reverse translations: made, freed as sockets closed, open now, and
        # what the LRU evicted (made - freed - open: its bound was reached).
        "udp_sockets": {"created": reasons["udp_new"], "freed": reasons["udp_freed"],
                        "live": live,
                        "evicted": max(0, reasons["udp_new"] - reasons["udp_freed"] - live)},
    }


def find_service(maps: MapSet, ref: str) -> tuple[abi.L4Key, abi.Svc]:
    """A service by name or VIP:PORT[/proto]."""
    if ":" in ref:
        addr, port, proto = abi.parse_endpoint(ref)
        key = abi.l4_key(addr, port, proto)
        svc = maps.get("kvr_svc_v2", key, abi.Svc)
        if svc is None:
            raise LookupError_(f"no service at {abi.format_host(addr)}:{port}/{proto}")
        return key, svc
    for k, name in maps.items("kvr_svc_name", U32, abi.SvcName):
        if name.name.decode() == ref:
            for key, svc in maps.items("kvr_svc_v2", abi.L4Key, abi.Svc):
                if svc.id == k.value:
                    return key, svc
    raise LookupError_(f"no service named {ref!r}")


def maglev(maps: MapSet, ref: str) -> dict[str, Any]:
    key, svc = find_service(maps, ref)
    table = maps.table(svc) or []
    counts: dict[int, int] = {}
    for be_id in table:
        counts[be_id] = counts.get(be_id, 0) + 1
    addr = {b["id"]: b["address"] for b in backends(maps)}
    return {
        "service": svc.id, "frontend": frontend(key),
        "table_size": len(table),
        "slots": {addr.get(b, str(b)) if b != abi.NO_BACKEND else "none": n
                  for b, n in sorted(counts.items())},
        "table": table,
    }


def netns_cookie(netns: str) -> int:
    """The network-namespace cookie the connect hook sees for clients in `netns`
    (a name under /run/netns or a path such as /proc/PID/ns/net)."""
    path = netns if netns.startswith("/") else f"/run/netns/{netns}"
    if not os.path.exists(path):
        raise LookupError_(f"no network namespace {netns!r} ({path} does not exist)")
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: enter the namespace, ask a socket for its cookie
        code = 0
        try:
            fd = os.open(path, os.O_RDONLY)
            libc = ct.CDLL(None, use_errno=True)
            if libc.setns(fd, 0) != 0:
                raise OSError(ct.get_errno(), "setns")
            with socket.socket() as s:
                raw = s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
            os.write(write_fd, raw)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write_fd)
    raw = os.read(read_fd, 8)
    os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    if status != 0 or len(raw) != 8:
        raise LookupError_(f"could not read the cookie of network namespace {netns!r}")
    return int.from_bytes(raw, "little")


@dataclasses.dataclass
class Step:
    what: str
    detail: str


def explain(maps: MapSet, ref: str, key: int, key_kind: str) -> dict[str, Any]:
    """Walk the connect hook's decision for `key` without connecting."""
    _, svc = find_service(maps, ref)
    meta = maps.meta()
    bes = {b["id"]: b for b in backends(maps)}
    mean = maps.get("kvr_svc_load", U32(svc.id), U32)
    mean_v = mean.value if mean else 0
    steps: list[Step] = []

    def bound_ok(be_id: int) -> tuple[bool, str]:
        load = bes[be_id]["load"]
        if svc.eps_milli == abi.EPS_OFF or mean_v == 0:
            return True, f"load {load} (no bound)"
        limit = mean_v * (1000 + svc.eps_milli) / 1000
        return load <= limit, f"load {load} vs bound {limit:.0f}"

    def usable(be_id: int, new: bool) -> tuple[bool, str]:
        be = bes.get(be_id)
        if be is None:
            return False, "not in the backend map"
        if be["state"] in ("draining", "open"):
            return False, be["state"] + (" (kernel trip)" if be["kernel_tripped"] else "")
        if be["state"] == "probing" and new:
            return True, f"probing: admitted for {svc.probe_milli / 10:.1f}% of new sessions"
        return True, be["state"]

    steps.append(Step("service", f"{ref} -> id {svc.id}, affinity "
                      f"{abi.Affinity(svc.affinity).name.lower()}, M={svc.table_size}"))
    steps.append(Step("key", f"{key_kind} {key:#018x}"))
    chosen: int | None = None
    how = ""
    if svc.affinity != abi.Affinity.NONE:
        aff = maps.get("kvr_affinity", abi.AffKey(svc_id=svc.id, key=key), abi.AffVal)
        if aff is None:
            steps.append(Step("affinity", "miss: no entry"))
        else:
            idle = (time.monotonic_ns() - aff.last_ns) / 1e9
            member = maps.get("kvr_member", abi.MemberKey(svc_id=svc.id, be_id=aff.be_id), U32)
            ok, why = usable(aff.be_id, False)
            if svc.aff_timeout and idle > svc.aff_timeout:
                steps.append(Step("affinity", f"expired: backend {aff.be_id}, idle {idle:.1f}s"))
            elif member is None or not ok:
                steps.append(Step("affinity", f"moves: backend {aff.be_id} is {why}"))
            else:
                chosen, how = aff.be_id, f"affinity hit (idle {idle:.1f}s)"
    if chosen is None:
        table = maps.table(svc) or []
        ident = svc.ident  # the service's, whichever of its VIPs was named
        seen: list[int] = []
        fallback: tuple[int, int] | None = None
        for n in range(32):
            slot = hashing.slot_hash(key, ident, n, meta.hash_seed) % max(len(table), 1)
            be_id = table[slot] if table else abi.NO_BACKEND
            if be_id in seen:
                steps.append(Step(f"candidate {n}", f"slot {slot} -> backend {be_id}: compared"))
                continue
            ok, why = usable(be_id, True)
            if not ok:
                steps.append(Step(f"candidate {n}", f"slot {slot} -> backend {be_id}: {why}"))
                continue
            within, load_why = bound_ok(be_id)
            steps.append(Step(f"candidate {n}",
                              f"slot {slot} -> backend {be_id} ({why}), {load_why}"))
            if within:
                chosen = be_id
                how = "table owner" if n == 0 else f"candidate {n} (spill)"
                break
            if fallback is None or bes[be_id]["load"] < fallback[1]:
                fallback = (be_id, bes[be_id]["load"])
            seen.append(be_id)
            if len(seen) >= meta.candidates:
                break
        if chosen is None and fallback is not None:
            chosen, how = fallback[0], "least loaded candidate (all over the bound)"
    result = {
        "service": svc.id, "key": f"{key:016x}", "key_kind": key_kind,
        "steps": [dataclasses.asdict(s) for s in steps],
        "backend": None if chosen is None else bes[chosen]["address"],
        "backend_id": chosen, "reason": how or "no usable backend: connect fails (ECONNREFUSED)",
    }
    return result
