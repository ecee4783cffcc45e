"""UDP and IPv6 through the socket load balancer, on real sockets in the lab: replies come
from the VIP, dual-stack services keep a session on one engine from either family,
IPv4-mapped addresses work, and a closed UDP socket leaves nothing behind."""

from __future__ import annotations

import collections
import os
import socket
import threading
from pathlib import Path
from typing import Any

from dataplane import abi, client, model
from dataplane.maps import MapSet
from tests.kernel.conftest import POD_PORT, Node

VIP4 = "10.96.20.1"
VIP6 = "fd00:96::20:1"
SO_COOKIE = 57  # include/uapi/asm-generic/socket.h


def udp_svc(name: str, vip: str, backends: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
    return {"name": name, "vip": vip, "port": 53, "protocol": "udp", "backends": backends,
            **kw}


def model_state(*services: dict[str, Any]) -> model.DesiredState:
    return model.desired_from_dict({"services": list(services)})


def v6(kv: Node, pod: str, **kw: Any) -> dict[str, Any]:
    return {"address": str(kv.pod(pod).address6), "port": POD_PORT, **kw}


def dual(kv: Node, pod: str, **kw: Any) -> dict[str, Any]:
    return {**kv.backend(pod), "address6": str(kv.pod(pod).address6), **kw}


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _query(sock: socket.socket, dest: tuple[str, int] | None) -> tuple[str, str, int]:
    """One datagram out, one back: (pod that answered, reply source address, port)."""
    if dest is None:
        sock.send(b"q")
    else:
        sock.sendto(b"q", dest)
    data, src = sock.recvfrom(512)
    return data.decode(), src[0], src[1]


def unconnected(host: str, port: int, sockets: int, per_socket: int) -> list[list[tuple[str, str,
                                                                                        int]]]:
    """``sockets`` unconnected UDP sockets, each sending ``per_socket`` queries."""
    out = []
    for _ in range(sockets):
        with socket.socket(_family(host), socket.SOCK_DGRAM) as s:
            s.settimeout(2)
            out.append([_query(s, (host, port)) for _ in range(per_socket)])
    return out


def connected(host: str, port: int) -> dict[str, Any]:
    with socket.socket(_family(host), socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.connect((host, port))
        name, src, sport = _query(s, None)
        return {"name": name, "src": (src, sport), "peer": s.getpeername()[:2]}


def tcp(host: str, port: int, session: str | None = None,
        family: socket.AddressFamily | None = None) -> tuple[str, tuple[str, int]]:
    from lab import podserver
    with socket.socket(family or _family(host), socket.SOCK_STREAM) as s:
        s.settimeout(2)
        if session is not None:
            client.tag_session(s, session)
        s.connect((host, port))
        peer = s.getpeername()[:2]
        return podserver.ask_on(s), peer


def udp_session(host: str, port: int, session: str) -> str:
    with socket.socket(_family(host), socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        client.tag_session(s, session)
        return _query(s, (host, port))[0]


# -- UDP ----------------------------------------------------------------------------------

def test_udp_query_reaches_a_backend_and_the_reply_comes_from_the_vip(kv: Node) -> None:
    kv.apply([udp_svc("dns", VIP4, [kv.backend("gpu0"), kv.backend("gpu1")])])
    runs = kv.run(unconnected, VIP4, 53, 40, 3)
    seen = collections.Counter()
    for replies in runs:
        assert {(src, sport) for _, src, sport in replies} == {(VIP4, 53)}
        # A socket's queries to a VIP stay on one backend (its flow).
        assert len({name for name, _, _ in replies}) == 1
        seen[replies[0][0]] += 1
    assert set(seen) == {"gpu0", "gpu1"}, seen  # new sockets are spread (affinity none)
    svc_id = kv.applier.service_id("dns")
    counters = kv.maps.percpu_sum("kvr_svc_cnt_v3", abi.ct.c_uint32(svc_id), abi.SvcCounters)
    assert counters is not None
    assert counters[abi.SvcCounter.DGRAMS] == 120
    assert counters[abi.SvcCounter.REPLIES] == 120
    assert counters[abi.SvcCounter.SELECTED] == 120


def test_connected_udp_peer_and_reply_source_are_the_vip(kv: Node) -> None:
    kv.apply([udp_svc("dns", VIP4, [kv.backend("gpu2")])])
    got = kv.run(connected, VIP4, 53)
    assert got == {"name": "gpu2", "src": (VIP4, 53), "peer": (VIP4, 53)}


def _query_twice(host: str, ready: int, go: int) -> tuple[tuple[str, str, int], ...]:
    """Two queries on one socket; between them, tell the parent (``ready``) and wait for
    it (``go``)."""
    with socket.socket(_family(host), socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        first = _query(s, (host, 53))
        os.write(ready, b"x")
        os.read(go, 1)
        return first, _query(s, (host, 53))


def test_udp_flow_leaves_a_draining_backend(kv: Node) -> None:
    """A socket's flow sticks to its backend only while that backend is usable."""
    kv.apply([udp_svc("dns", VIP4, [kv.backend("gpu0")])])
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    result: dict[str, Any] = {}
    worker = threading.Thread(
        target=lambda: result.update(out=kv.run(_query_twice, VIP4, ready_w, go_r)))
    worker.start()
    try:
        os.read(ready_r, 1)
        kv.apply([udp_svc("dns", VIP4, [kv.backend("gpu0", state="draining"),
                                        kv.backend("gpu1")])])
    finally:
        os.write(go_w, b"x")
        worker.join(30)
        for fd in (ready_r, ready_w, go_r, go_w):
            os.close(fd)
    assert result["out"] == (("gpu0", VIP4, 53), ("gpu1", VIP4, 53))


# -- IPv6 ---------------------------------------------------------------------------------

def test_ipv6_tcp_vip_is_rewritten_and_getpeername_shows_it(kv: Node) -> None:
    kv.apply([{"name": "web6", "vip": VIP6, "port": 80, "backends": [v6(kv, "gpu3")]}])
    name, peer = kv.run(tcp, VIP6, 80)
    assert (name, peer) == ("gpu3", (VIP6, 80))


def test_ipv6_udp_unconnected_and_connected(kv: Node) -> None:
    kv.apply([udp_svc("dns6", VIP6, [v6(kv, "gpu1"), v6(kv, "gpu4")])])
    runs = kv.run(unconnected, VIP6, 53, 20, 2)
    assert {(src, sport) for replies in runs for _, src, sport in replies} == {(VIP6, 53)}
    assert {replies[0][0] for replies in runs} == {"gpu1", "gpu4"}
    got = kv.run(connected, VIP6, 53)
    assert got["src"] == (VIP6, 53) and got["peer"] == (VIP6, 53)
    assert got["name"] in {"gpu1", "gpu4"}


def test_dual_stack_session_lands_on_one_engine_from_either_family(kv: Node) -> None:
    """One Service, two VIPs: the table and the sessions are the service's."""
    pods = ["gpu0", "gpu1", "gpu2", "gpu3"]
    kv.apply([{"name": "chat", "vip": VIP4, "vip6": VIP6, "port": 80, "affinity": "session",
               "backends": [dual(kv, p) for p in pods]}])
    sessions = [f"s-{i}" for i in range(40)]

    def both(sessions: list[str]) -> list[tuple[str, str]]:
        return [(tcp(VIP4, 80, s)[0], tcp(VIP6, 80, s)[0]) for s in sessions]

    pairs = kv.run(both, sessions)
    assert all(a == b for a, b in pairs), pairs
    assert len({a for a, _ in pairs}) >= 3  # the sessions are spread, not all on one
    # A new session first seen over IPv6 finds the same engine over IPv4, and UDP shares
    # the model's rules (a separate service, its own table).
    fresh = kv.run(both, [f"late-{i}" for i in range(10)])
    assert all(a == b for a, b in fresh)
    assert kv.maps.get("kvr_svc_v2", abi.l4_key(VIP4, 80, "tcp"), abi.Svc).id == \
        kv.maps.get("kvr_svc_v2", abi.l4_key(VIP6, 80, "tcp"), abi.Svc).id


def test_dual_stack_udp_session_from_either_family(kv: Node) -> None:
    kv.apply([udp_svc("dns", VIP4, [dual(kv, p) for p in ("gpu0", "gpu1", "gpu2")],
                      vip6=VIP6, affinity="session")])

    def both(sessions: list[str]) -> list[tuple[str, str]]:
        return [(udp_session(VIP4, 53, s), udp_session(VIP6, 53, s)) for s in sessions]

    pairs = kv.run(both, [f"u-{i}" for i in range(30)])
    assert all(a == b for a, b in pairs), pairs
    assert len({a for a, _ in pairs}) >= 2


# -- IPv4-mapped --------------------------------------------------------------------------

def test_v4_mapped_tcp_connect_to_an_ipv4_vip(kv: Node) -> None:
    kv.apply([{"name": "web", "vip": VIP4, "port": 80, "backends": [kv.backend("gpu5")]}])
    name, peer = kv.run(tcp, f"::ffff:{VIP4}", 80)
    assert (name, peer) == ("gpu5", (f"::ffff:{VIP4}", 80))


def test_v4_mapped_udp_to_an_ipv4_vip(kv: Node) -> None:
    kv.apply([udp_svc("dns", VIP4, [kv.backend("gpu5")])])
    runs = kv.run(unconnected, f"::ffff:{VIP4}", 53, 3, 2)
    assert {r for replies in runs for r in replies} == {("gpu5", f"::ffff:{VIP4}", 53)}
    got = kv.run(connected, f"::ffff:{VIP4}", 53)
    assert got == {"name": "gpu5", "src": (f"::ffff:{VIP4}", 53),
                   "peer": (f"::ffff:{VIP4}", 53)}


# -- per-socket state ---------------------------------------------------------------------

def _records_follow_the_socket(pin_dir: Path, host: str, connect: bool) -> dict[str, bool]:
    """While a UDP socket is open its cookie has a kvr_udp_v1 entry (and, connected, a
    kvr_sock_v2 one); once closed, neither."""
    with MapSet(pin_dir) as maps:
        s = socket.socket(_family(host), socket.SOCK_DGRAM)
        s.settimeout(2)
        if connect:
            s.connect((host, 53))
            _query(s, None)
        else:
            _query(s, (host, 53))
        cookie = abi.ct.c_uint64(int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8),
                                                "little"))
        open_udp = maps.get("kvr_udp_v1", cookie, abi.Udp) is not None
        open_sock = maps.get("kvr_sock_v2", cookie, abi.Sock) is not None
        s.close()
        return {"open_udp": open_udp, "open_sock": open_sock,
                "closed_udp": maps.get("kvr_udp_v1", cookie, abi.Udp) is not None,
                "closed_sock": maps.get("kvr_sock_v2", cookie, abi.Sock) is not None}


def test_a_closed_udp_socket_leaves_no_translation_behind(kv: Node) -> None:
    kv.apply([udp_svc("dns", VIP4, [kv.backend("gpu0")])])
    freed = kv.maps.reasons()["udp_freed"]
    pin = kv.settings.pin_dir
    assert kv.run(_records_follow_the_socket, pin, VIP4, False) == {
        "open_udp": True, "open_sock": False, "closed_udp": False, "closed_sock": False}
    assert kv.run(_records_follow_the_socket, pin, VIP4, True) == {
        "open_udp": True, "open_sock": True, "closed_udp": False, "closed_sock": False}
    assert kv.maps.reasons()["udp_freed"] == freed + 2

    def churn(n: int) -> None:
        for _ in range(n):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(2)
                _query(s, (VIP4, 53))

    before = len(kv.maps.keys("kvr_udp_v1", abi.ct.c_uint64))
    kv.run(churn, 300)
    assert len(kv.maps.keys("kvr_udp_v1", abi.ct.c_uint64)) == before


def _hold_open(host: str, n: int) -> None:
    """``n`` UDP sockets to the VIP, all open at once, then closed."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(_family(host), socket.SOCK_DGRAM)
            socks.append(s)
            s.settimeout(2)
            _query(s, (host, 53))
    finally:
        for s in socks:
            s.close()


def test_the_lru_bound_is_counted_when_too_many_udp_sockets_are_open(lab: Any) -> None:
    """With room for 16 UDP sockets and 40 open at once, the LRU evicts; created - freed -
    live says how many, and once all are closed nothing is left."""
    from dataplane import apply, inspect, loader
    from dataplane.settings import Settings
    from lab.cgroup import Cgroup

    group = Cgroup.create(f"{lab.names}-udplru", parent=lab.cgroup.path.parent)
    lab.own_cgroup(group)
    pin_dir = Path(f"/sys/fs/bpf/kvrlru-{os.urandom(3).hex()}")
    lab.own_pin_dir(pin_dir)
    settings = Settings(pin_dir=pin_dir, udp_entries=16)
    datapath = loader.Datapath(settings)
    try:
        datapath.attach(group.path)
        with MapSet(pin_dir) as maps:
            applier = apply.Applier(maps, settings.hash_seed)
            pod = lab.pods["gpu0"]
            applier.apply(model_state(udp_svc("dns", VIP4, [
                {"address": str(pod.address), "port": POD_PORT}])))
            lab.clients["client"].call(_hold_open, VIP4, 40, cgroup=group, timeout=120)
            udp = inspect.stats(maps)["udp_sockets"]
            applier.close()
        assert udp["created"] == 40 and udp["live"] == 0
        assert udp["freed"] <= 16 and udp["evicted"] == 40 - udp["freed"] >= 24, udp
    finally:
        datapath.close()
        loader.uninstall(pin_dir)
        group.remove()
