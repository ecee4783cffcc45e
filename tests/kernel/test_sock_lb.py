"""The socket load balancer on real sockets: translation, affinity, weights,
states, the kernel's own breaker trip, bounded load."""

from __future__ import annotations

import collections
import socket
import time
from typing import Any

import pytest

from dataplane import abi, client, hashing, inspect
from tests.kernel.conftest import POD_PORT, Node, connect_names, errno_name

# The tests marked kernel_matrix run again inside every supported kernel (make
# test-kernels): one per hook and per refusal path, few because an emulated guest is slow.
matrix = pytest.mark.kernel_matrix

VIP = "10.96.10.1"


def svc(name: str, vip: str, backends: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
    return {"name": name, "vip": vip, "port": 80, "backends": backends, **kw}


def _peer_and_name(vip: str, port: int) -> tuple[tuple[str, int], str]:
    from lab import podserver
    with socket.create_connection((vip, port), timeout=2) as s:
        return s.getpeername(), podserver.ask_on(s)


@matrix
def test_vip_is_rewritten_and_getpeername_shows_the_vip(kv: Node) -> None:
    kv.apply([svc("one", VIP, [kv.backend("gpu0")])])
    peer, name = kv.run(_peer_and_name, VIP, 80)
    assert name == "gpu0"
    assert tuple(peer) == (VIP, 80)
    assert kv.maps.reasons()["reversed"] >= 1


def test_connects_to_other_addresses_are_untouched(kv: Node) -> None:
    kv.apply([svc("one", VIP, [kv.backend("gpu0")])])
    pod1 = str(kv.pod("gpu1").address)
    peer, name = kv.run(_peer_and_name, pod1, POD_PORT)
    assert name == "gpu1" and tuple(peer) == (pod1, POD_PORT)
    # Same VIP, another port: not a service, so the kernel routes it as usual (nowhere).
    assert kv.run(connect_names, VIP, 81, 1, sock_timeout=0.5)[0].startswith("error:")


def test_weights_are_honoured_over_5000_connects(kv: Node) -> None:
    weights = {"gpu0": 100, "gpu1": 200, "gpu2": 300, "gpu3": 400}
    kv.apply([svc("w", VIP, [kv.backend(p, weight=w) for p, w in weights.items()])])
    names = kv.run(connect_names, VIP, 80, 5000)
    counts = collections.Counter(names)
    assert sum(counts[p] for p in weights) == 5000, counts
    total = sum(weights.values())
    for pod, w in weights.items():
        expected = 5000 * w / total
        # Binomial standard deviation is at most 35 here; 4 sigma keeps this from flaking.
        assert abs(counts[pod] - expected) < 4 * (5000 * 0.25) ** 0.5, (pod, counts)


def test_session_affinity_is_stable_for_1000_sessions(kv: Node) -> None:
    kv.apply([svc("s", VIP, [kv.backend(f"gpu{i}") for i in range(5)], affinity="session")])
    sessions = [f"user-{i}" for i in range(1000)]
    first = kv.run(connect_names, VIP, 80, 0, sessions)
    again = kv.run(connect_names, VIP, 80, 0, sessions)
    assert not [n for n in first if n.startswith("error")]
    assert first == again
    assert len(set(first)) == 5
    # Each session went to its Maglev table owner, as predicted in Python (the
    # hashing `kvroute explain` uses), so a node without the entry picks the same.
    address = {b["id"]: b["address"] for b in inspect.backends(kv.maps)}
    for session, name in zip(sessions, first, strict=True):
        owner = _maglev_owner(kv, VIP, client.session_hash(session))
        assert address[owner] == f"{kv.pod(name).address}:{POD_PORT}/tcp"


def _maglev_owner(kv: Node, vip: str, key: int) -> int:
    table = kv.maps.table(inspect.find_service(kv.maps, f"{vip}:80")[1])
    assert table
    ident = hashing.svc_ident(vip, 80, "tcp")
    return table[hashing.slot_hash(key, ident, 0, kv.settings.hash_seed) % len(table)]


def test_client_affinity_honours_its_timeout(kv: Node) -> None:
    backends = [kv.backend("gpu0"), kv.backend("gpu1")]
    kv.apply([svc("c", VIP, backends, affinity="client", affinity_timeout=1)])
    first = kv.run(connect_names, VIP, 80, 1)[0]
    assert first in ("gpu0", "gpu1")
    other = "gpu1" if first == "gpu0" else "gpu0"
    # Take the client's backend out of the table but keep it a member: within the
    # timeout the affinity entry still wins...
    kv.apply([svc("c", VIP, [kv.backend(first, weight=0), kv.backend(other)],
                  affinity="client", affinity_timeout=1)])
    assert kv.run(connect_names, VIP, 80, 3) == [first] * 3
    # ...once the client has been idle longer than the timeout, the table decides.
    time.sleep(1.3)
    assert kv.run(connect_names, VIP, 80, 1) == [other]


def test_removing_one_of_n_backends_moves_only_its_sessions(kv: Node) -> None:
    n = 5
    pods = [f"gpu{i}" for i in range(n)]
    kv.apply([svc("r", VIP, [kv.backend(p) for p in pods], affinity="session")])
    sessions = [f"r-{i}" for i in range(2000)]
    before = kv.run(connect_names, VIP, 80, 0, sessions)
    kv.apply([svc("r", VIP, [kv.backend(p) for p in pods[:-1]], affinity="session")])
    after = kv.run(connect_names, VIP, 80, 0, sessions)
    moved = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
    on_removed = [i for i, a in enumerate(before) if a == pods[-1]]
    assert moved == on_removed
    assert len(moved) / len(sessions) <= 1 / n + 0.03  # 3 sigma of sampling noise at 2,000
    # Without any affinity entry, the Maglev table alone keeps the promise.
    stats = inspect.maglev(kv.maps, f"{VIP}:80")
    assert len(stats["slots"]) == n - 1


def test_draining_gets_no_new_sessions_and_its_sessions_move(kv: Node) -> None:
    pods = ["gpu0", "gpu1", "gpu2"]
    kv.apply([svc("d", VIP, [kv.backend(p) for p in pods], affinity="session")])
    old = [f"d-old-{i}" for i in range(300)]
    before = kv.run(connect_names, VIP, 80, 0, old)
    kv.apply([svc("d", VIP, [kv.backend("gpu0", state="draining"), kv.backend("gpu1"),
                             kv.backend("gpu2")], affinity="session")])
    new = kv.run(connect_names, VIP, 80, 0, [f"d-new-{i}" for i in range(500)])
    assert "gpu0" not in new and set(new) == {"gpu1", "gpu2"}
    after = kv.run(connect_names, VIP, 80, 0, old)
    assert "gpu0" in before and "gpu0" not in after
    assert all(a == b for a, b in zip(before, after, strict=True) if a != "gpu0")


def test_open_backend_is_never_chosen(kv: Node) -> None:
    kv.apply([svc("o", VIP, [kv.backend("gpu0", state="open"), kv.backend("gpu1"),
                             kv.backend("gpu2")])])
    names = kv.run(connect_names, VIP, 80, 1000)
    assert collections.Counter(names).keys() == {"gpu1", "gpu2"}


@matrix
def test_all_backends_unusable_fails_fast_with_econnrefused(kv: Node) -> None:
    kv.apply([svc("x", VIP, [kv.backend("gpu0", state="open"),
                             kv.backend("gpu1", state="draining")]),
              svc("empty", "10.96.10.2", [])])
    started = time.monotonic()
    refused = f"error:{kv.refused('ECONNREFUSED')}"
    assert kv.run(connect_names, VIP, 80, 5) == [refused] * 5
    assert kv.run(connect_names, "10.96.10.2", 80, 2) == [refused] * 2
    assert time.monotonic() - started < 5
    counters = {s["name"]: s["counters"] for s in inspect.services(kv.maps)}
    assert counters["x"]["no_backend"] == 5 and counters["empty"]["no_backend"] == 2


@matrix
def test_k_failed_connects_trip_a_dead_pod_open_in_the_kernel(kv: Node) -> None:
    kv.apply([svc("k", VIP, [kv.backend("dead"), kv.backend("gpu0")])])
    names = kv.run(connect_names, VIP, 80, 300)
    failures = [n for n in names if n.startswith("error")]
    # The kernel trips the dead pod after fail_k consecutive refusals; every
    # connect after that goes to the live one.
    assert len(failures) == kv.settings.fail_k, collections.Counter(names)
    first_ok_after = max(i for i, n in enumerate(names) if n.startswith("error")) + 1
    assert set(names[first_ok_after:]) == {"gpu0"}
    dead = next(b for b in inspect.backends(kv.maps) if b["address"].startswith(
        str(kv.pod("dead").address)))
    assert dead["kernel_tripped"] and dead["state"] == "open"
    assert dead["counters"]["failed"] == kv.settings.fail_k
    assert dead["counters"]["trips"] == 1


def test_bounded_load_spills_from_an_overloaded_owner(kv: Node) -> None:
    pods = ["gpu0", "gpu1", "gpu2", "gpu3"]
    kv.apply([svc("b", VIP, [kv.backend(p, load=10) for p in pods], affinity="session",
                  epsilon=0.25)])
    sessions = [f"b-{i}" for i in range(400)]
    owners = [_maglev_owner(kv, VIP, client.session_hash(s)) for s in sessions]
    hot_id = collections.Counter(owners).most_common(1)[0][0]
    hot = next(b for b in inspect.backends(kv.maps) if b["id"] == hot_id)
    hot_pod = next(p for p in pods if hot["address"].startswith(f"{kv.pod(p).address}:"))
    kv.apply([svc("b", VIP, [kv.backend(p, load=1000 if p == hot_pod else 10) for p in pods],
                  affinity="session", epsilon=0.25)])
    names = kv.run(connect_names, VIP, 80, 0, sessions)
    assert hot_pod not in names
    assert not [n for n in names if n.startswith("error")]
    counters = {s["name"]: s["counters"] for s in inspect.services(kv.maps)}
    assert counters["b"]["spilled"] == owners.count(hot_id)


@matrix
def test_session_tag_reaches_the_kernel(kv: Node) -> None:
    kv.apply([svc("t", VIP, [kv.backend("gpu0")], affinity="session")])
    kv.run(connect_names, VIP, 80, 0, ["tagged"])
    (entry,) = inspect.affinity(kv.maps)
    assert entry["key"] == f"{client.session_hash('tagged'):016x}"


def _bad_sockopt() -> str:
    s = socket.socket()
    try:
        s.setsockopt(abi.SOL_KVROUTE, abi.KVROUTE_SESSION, b"\x01\x02")
        return "accepted"
    except OSError as exc:
        return errno_name(exc)
    finally:
        s.close()


def test_malformed_session_tag_is_rejected(kv: Node) -> None:
    assert kv.run(_bad_sockopt) == kv.refused("EINVAL")


def test_saturated_service_fails_fast(kv: Node) -> None:
    kv.apply([svc("sat", VIP, [kv.backend("gpu0")], saturated=True)])
    assert kv.run(connect_names, VIP, 80, 3) == [f"error:{kv.refused('ECONNREFUSED')}"] * 3
    counters = {s["name"]: s["counters"] for s in inspect.services(kv.maps)}
    assert counters["sat"]["saturated"] == 3 and counters["sat"]["selected"] == 0
    kv.apply([svc("sat", VIP, [kv.backend("gpu0")])])
    assert kv.run(connect_names, VIP, 80, 1) == ["gpu0"]


def _refused_tags() -> dict[str, str]:
    """setsockopt(SOL_KVROUTE, KVROUTE_SESSION) where kvroute cannot route the socket."""
    import errno
    import socket
    import struct

    def attempt(sock: socket.socket, tag: int) -> str:
        try:
            sock.setsockopt(abi.SOL_KVROUTE, abi.KVROUTE_SESSION, struct.pack("=Q", tag))
            return "accepted"
        except OSError as exc:
            return errno.errorcode.get(exc.errno or 0, str(exc))
        finally:
            sock.close()

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    connected = socket.create_connection(listener.getsockname())
    out = {
        "unix": attempt(socket.socket(socket.AF_UNIX), 7),
        "zero": attempt(socket.socket(), 0),
        "connected": attempt(connected, 7),
        "fresh": attempt(socket.socket(), 7),
        "udp": attempt(socket.socket(type=socket.SOCK_DGRAM), 7),
    }
    listener.close()
    return out


@matrix
def test_session_tags_kvroute_cannot_route_are_refused(kv: Node) -> None:
    assert kv.run(_refused_tags) == {"unix": kv.refused("ENOPROTOOPT"),
                                     "zero": kv.refused("EINVAL"),
                                     "connected": kv.refused("EINVAL"), "fresh": "accepted",
                                     "udp": "accepted"}
