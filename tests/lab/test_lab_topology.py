"""The lab itself: namespaces, addresses, reachability, cgroups and a clean teardown.

Every lab here has its own tag and subnet, so these tests can run beside other labs; each one
is torn down by the fixture even when a test fails, and a teardown that leaves anything behind
fails the test.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pyroute2
import pyroute2.netns
import pytest

import dataplane.host
import lab.cgroup
import lab.netns
import lab.owner
import lab.podserver
import lab.run

PORT = 8000


def leftovers(names: str) -> dict[str, list[str]]:
    """Everything on the host whose name starts with a lab's name prefix, and its record."""
    with pyroute2.IPRoute() as ipr:
        links = [str(m.get("IFLA_IFNAME")) for m in ipr.get_links()]
    root = dataplane.host.cgroup2_root()
    record = lab.owner.Store().path(names)
    return {
        "netns": [n for n in pyroute2.netns.listnetns() if n.startswith(names)],
        "links": [n for n in links if n.startswith(names)],
        "cgroups": [p.name for p in root.iterdir() if p.name.startswith(names)],
        "record": [str(record)] if record.exists() else [],
    }


MakeLab = Callable[..., lab.netns.Lab]
NOTHING: dict[str, list[str]] = {"netns": [], "links": [], "cgroups": [], "record": []}


@pytest.fixture
def make_lab() -> Iterator[MakeLab]:
    """Build labs that are always torn down; EOPNOTSUPP and a missing cgroup v2 are skips."""
    if os.geteuid() != 0:
        pytest.skip("lab tests need root (network namespaces, veth, bridge, cgroups)")
    made: list[lab.netns.Lab] = []

    def make(subnet: str | None = None, prefix: str | None = None) -> lab.netns.Lab:
        new = lab.netns.Lab(subnet, prefix=prefix)
        made.append(new)
        try:
            return new.up()
        except lab.netns.LabUnsupported as e:
            pytest.skip(f"kernel lacks a lab feature: {e}")
        except dataplane.host.HostError as e:
            pytest.skip(str(e))

    yield make
    failures = []
    for one in reversed(made):
        try:
            one.down()
        except lab.netns.LabError as e:
            failures.append(str(e))
        left = leftovers(one.names)
        if left != NOTHING:
            failures.append(f"{one.names} left {left}")
    assert not failures, failures


def start_podservers(pods: list[lab.netns.Pod]) -> list[subprocess.Popen[bytes]]:
    procs = [
        p.spawn(
            [sys.executable, "-m", "lab.podserver", "--name", p.name, "--port", str(PORT)],
            stdout=subprocess.DEVNULL,
        )
        for p in pods
    ]
    for p in pods:
        lab.podserver.wait_listening(p, PORT, timeout=10)
    return procs


def two_requests_one_connection(address: str) -> bytes:
    """HTTP/1.1 keeps the connection for the first request; the second asks to close."""
    with socket.create_connection((address, PORT), timeout=2) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        chunks = []
        while chunk := sock.recv(4096):
            chunks.append(chunk)
        return b"".join(chunks)


def connect_loop(address: str, count: int) -> list[str]:
    return [lab.podserver.ask(address, PORT) for _ in range(count)]


class Boom(Exception):
    def __init__(self, code: int, where: str) -> None:
        super().__init__(code, where)
        self.code = code
        self.where = where


def raise_boom(code: int) -> None:
    raise Boom(code, "child")


def test_pods_and_client_get_distinct_addresses_in_their_own_namespaces(make_lab: MakeLab) -> None:
    one = make_lab()
    pods = [one.add_pod(f"gpu{i}") for i in range(3)]
    client = one.add_client("client")
    net = one.subnet
    addresses = [p.address for p in (*pods, client)]
    assert len(set(addresses)) == 4
    assert [p.address for p in pods] == [net.network_address + 10 + i for i in range(3)]
    assert client.address == net.network_address + 200
    assert one.gateway == net.network_address + 1
    assert set(one.pods) == {"gpu0", "gpu1", "gpu2"} and set(one.clients) == {"client"}
    assert len({p.netns for p in (*pods, client)}) == 4
    assert {p.netns for p in (*pods, client)} <= set(pyroute2.netns.listnetns())
    with pyroute2.IPRoute() as ipr:
        bridge = ipr.link_lookup(ifname=one.bridge)[0]
        gateway = [str(m.get("IFA_ADDRESS")) for m in ipr.get_addr(index=bridge)]
        assert str(one.gateway) in gateway
        for p in (*pods, client):
            assert len(p.veth_host) <= lab.netns.IFNAMSIZ
            (veth,) = ipr.get_links(ipr.link_lookup(ifname=p.veth_host)[0])
            assert veth.get("IFLA_MASTER") == bridge
    # Inside a pod: lo up, eth0 with the pod address, and no default route: nothing
    # a lab namespace sends can leave the lab's subnet.
    inside = pods[1].call(_pod_view)
    assert inside["addresses"] == {"127.0.0.1/8", f"{pods[1].address}/{net.prefixlen}"}
    assert inside["lo_up"] is True
    assert inside["gateway"] is None
    assert pods[1].call(_connect_errno, "10.96.0.1", 80) == errno.ENETUNREACH


def _connect_errno(address: str, port: int) -> int:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex((address, port))


def _pod_view() -> dict[str, object]:
    with pyroute2.IPRoute() as ipr:
        addresses = {f"{m.get('IFA_ADDRESS')}/{m['prefixlen']}" for m in ipr.get_addr(family=2)}
        (lo,) = ipr.get_links(ipr.link_lookup(ifname="lo")[0])
        default = [r for r in ipr.get_routes(family=2) if r["dst_len"] == 0]
        return {
            "addresses": addresses,
            "lo_up": bool(lo["flags"] & 1),  # IFF_UP
            "gateway": default[0].get("RTA_GATEWAY") if default else None,
        }


def test_podservers_answer_clients_and_host_with_their_own_name(make_lab: MakeLab) -> None:
    one = make_lab()
    pods = [one.add_pod(f"gpu{i}") for i in range(3)]
    client = one.add_client("client")
    start_podservers(pods)
    for p in pods:
        assert client.call(lab.podserver.ask, str(p.address), PORT) == p.name
    both = client.call(two_requests_one_connection, str(pods[1].address))
    assert both.count(b"HTTP/1.1 200 OK\r\nX-Pod: gpu1\r\n") == 2
    assert b"Connection: keep-alive" in both and both.endswith(b"Connection: close\r\n\r\ngpu1")
    # The host reaches pods through the bridge, with no route added by hand.
    assert lab.podserver.ask(str(pods[2].address), PORT) == "gpu2"
    # Many sequential connects in one forked call, all landing on the pod asked.
    started = time.monotonic()
    answers = client.call(connect_loop, str(pods[0].address), 500, timeout=30)
    assert answers == ["gpu0"] * 500
    assert time.monotonic() - started < 15


def test_spawn_and_call_join_the_cgroup_they_are_given(make_lab: MakeLab) -> None:
    one = make_lab()
    client = one.add_client("client")
    member = lab.cgroup.relative(one.cgroup)
    proc = client.spawn(["sleep", "30"], cgroup=one.cgroup)
    other = client.spawn(["sleep", "30"])
    # Popen returns after exec, and the cgroup join happens before exec: no waiting needed.
    assert lab.cgroup.current(proc.pid) == member
    assert one.cgroup.pids() == [proc.pid]
    assert lab.cgroup.current(other.pid) == lab.cgroup.current()
    # The spawned process really is in the client's namespace.
    ns_inode = os.stat(lab.run.netns_path(client.netns)).st_ino
    assert os.stat(f"/proc/{proc.pid}/ns/net").st_ino == ns_inode
    assert client.call(lab.cgroup.current, "self", cgroup=one.cgroup) == member
    assert client.call(lab.cgroup.current, "self") == lab.cgroup.current()
    with one.cgroup.opened() as fd:
        assert os.fstat(fd).st_ino == one.cgroup.path.stat().st_ino
    one.down()
    # down() killed both, including the one outside the lab cgroup.
    assert proc.poll() is not None and other.poll() is not None


def test_down_removes_everything_and_is_idempotent(make_lab: MakeLab) -> None:
    one = make_lab()
    pods = [one.add_pod("gpu0"), one.add_pod("gpu1")]
    one.add_client("client")
    procs = start_podservers(pods)
    cgroup_path = one.cgroup.path
    assert leftovers(one.names)["netns"]
    one.down()
    assert leftovers(one.names) == NOTHING
    assert not cgroup_path.exists()
    assert all(p.poll() is not None for p in procs)
    one.down()
    assert one.pods == {} and one.clients == {}


def test_two_labs_at_once_do_not_collide(make_lab: MakeLab) -> None:
    first = make_lab()
    second = make_lab()
    assert first.subnet != second.subnet
    assert first.names != second.names and first.bridge != second.bridge
    a = first.add_pod("gpu0")
    b = second.add_pod("gpu0")  # same pod name in another lab is fine
    ca = first.add_client("client")
    start_podservers([a, b])
    assert a.netns != b.netns
    assert ca.call(lab.podserver.ask, str(a.address), PORT) == "gpu0"
    assert lab.podserver.ask(str(b.address), PORT) == "gpu0"
    # A client reaches its own lab only.
    assert ca.call(_connect_errno, str(b.address), PORT) == errno.ENETUNREACH
    second.down()
    assert leftovers(second.names) == NOTHING
    assert ca.call(lab.podserver.ask, str(a.address), PORT) == "gpu0"


def test_a_lab_on_a_subnet_in_use_fails_and_leaves_nothing(make_lab: MakeLab) -> None:
    first = make_lab()
    clash = lab.netns.Lab(str(first.subnet))
    with pytest.raises(lab.netns.LabError, match="overlaps"):
        clash.up()
    assert leftovers(clash.names) == NOTHING
    clash.down()


def test_up_failing_after_the_bridge_removes_the_bridge(
    make_lab: MakeLab, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_cgroup(name: str, parent: Path | None = None) -> lab.cgroup.Cgroup:
        raise lab.cgroup.CgroupError("injected: cgroup creation refused")

    monkeypatch.setattr(lab.cgroup.Cgroup, "create", no_cgroup)
    broken = lab.netns.Lab()  # make_lab is only asked for its root check here
    try:
        with pytest.raises(lab.cgroup.CgroupError, match="injected"):
            broken.up()
        assert leftovers(broken.names) == NOTHING
    finally:
        broken.down()


def test_add_pod_failing_half_way_removes_what_it_made(make_lab: MakeLab) -> None:
    one = make_lab()
    # Occupy the name the first veth will want, so add_pod fails after making the netns.
    squatter = f"{one.names}v0"
    with pyroute2.IPRoute() as ipr:
        try:
            # A bridge, because the lab needs bridges anyway (dummy may not be built).
            ipr.link("add", ifname=squatter, kind="bridge")
        except pyroute2.NetlinkError as e:
            pytest.skip(f"cannot make a link to provoke the failure: {e}")
    try:
        with pytest.raises(lab.netns.LabError):
            one.add_pod("gpu0")
        assert leftovers(one.names)["netns"] == []
        assert "gpu0" not in one.pods
        # The lab is still usable: the next pod takes the next interface name.
        pod = one.add_pod("gpu0")
        assert pod.veth_host != squatter
    finally:
        with pyroute2.IPRoute() as ipr:
            ipr.link("del", index=ipr.link_lookup(ifname=squatter)[0])


def test_sweep_removes_a_lab_that_was_never_torn_down(make_lab: MakeLab) -> None:
    crashed = make_lab()
    pod = crashed.add_pod("gpu0")
    start_podservers([pod])
    assert lab.netns.sweep(only=crashed.names).live  # its owner (this process) runs
    assert leftovers(crashed.names)["netns"] == [pod.netns]
    report = lab.netns.sweep(only=crashed.names, include_live=True)
    assert report.failures == []
    assert report.labs == [f"{crashed.names} (owner pid {os.getpid()} still running)"]
    assert report.namespaces == [pod.netns]
    assert report.links == [pod.veth_host, crashed.bridge]
    assert report.cgroups == [str(crashed.cgroup.path)]
    assert leftovers(crashed.names) == NOTHING
    # The lab's own teardown (run by the fixture) then finds everything gone and is fine.


def test_call_brings_back_results_and_exceptions(make_lab: MakeLab) -> None:
    one = make_lab()
    client = one.add_client("client")
    assert client.call(os.getpid) != os.getpid()
    assert client.call(lambda x, y=0: x * y, 6, y=7) == 42  # closures cross by fork
    with pytest.raises(Boom) as caught:
        client.call(raise_boom, 17)
    assert caught.value.code == 17 and caught.value.where == "child"
    assert any("raise_boom" in note for note in getattr(caught.value, "__notes__", []))
    with pytest.raises(FileNotFoundError):
        client.call(Path("/nonexistent/kvroute").read_text)
    with pytest.raises(TimeoutError):
        client.call(time.sleep, 30, timeout=0.5)
    with pytest.raises(lab.run.ChildError, match="SIGKILL"):
        client.call(lambda: os.kill(os.getpid(), 9))


def test_sysctl_changes_only_the_pod_namespace(make_lab: MakeLab) -> None:
    one = make_lab()
    pod = one.add_pod("gpu0")
    key = Path("/proc/sys/net/ipv4/tcp_fin_timeout")
    host_value = key.read_text()
    wanted = 7 if host_value.strip() != "7" else 9
    lab.netns.sysctl(pod.netns, "net.ipv4.tcp_fin_timeout", wanted)
    assert pod.call(key.read_text).strip() == str(wanted)
    assert key.read_text() == host_value
