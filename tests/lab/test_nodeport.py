"""A NodePort and an external IP served to a client outside the node, through the real
packet path attached in a network namespace acting as the node: a local backend (client
address kept), a backend on another node (SNAT), externalTrafficPolicy: Local, and the
conntrack the CLI shows."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from dataplane import loader, nodeport
from lab import nodeport as nplab
from lab import podserver


def _ask_all(address: str, port: int, n: int) -> list[str]:
    out = []
    for _ in range(n):
        try:
            out.append(podserver.ask(address, port, timeout=1.0))
        except OSError as exc:
            out.append(f"error:{type(exc).__name__}")
    return out


@pytest.fixture(scope="module")
def npl() -> Iterator[nplab.NodePortLab]:
    if os.geteuid() != 0:
        pytest.skip("the NodePort lab needs root (namespaces, eBPF)")
    try:
        lab = nplab.NodePortLab().up()
    except loader.LoadError as exc:
        pytest.fail(f"the packet path does not load: {exc}")
    try:
        lab.serve("pod", "pod")
        lab.serve("rpod", "rpod")
        for role, ip in (("pod", nplab.LOCAL_POD), ("rpod", nplab.REMOTE_POD)):
            lab.call(role, podserver._poll_listening, ip, nplab.POD_PORT, 10.0)
        yield lab
    finally:
        lab.down()


def test_a_nodeport_and_an_external_ip_reach_the_local_pod(npl: nplab.NodePortLab) -> None:
    npl.apply(npl.service())
    assert npl.call("client", _ask_all, nplab.NODE_IP, nplab.NODE_PORT, 5) == ["pod"] * 5
    assert npl.call("client", _ask_all, nplab.EXTERNAL_IP, nplab.SERVICE_PORT, 5) == ["pod"] * 5
    assert npl.np is not None
    rows = nodeport.ct_rows(npl.np.conntrack())
    orig = [r for r in rows if r["dir"] == "orig"]
    # The client's own address reached the pod: no SNAT for a local backend.
    assert orig and all(r["src"] == r["to_src"] for r in orig)
    assert {r["state"] for r in rows} <= {"closing", "established", "fin"}


def test_a_backend_on_another_node_is_reached_through_snat(npl: nplab.NodePortLab) -> None:
    npl.apply(npl.service(backends=(nplab.REMOTE_POD,)))
    assert npl.call("client", _ask_all, nplab.NODE_IP, nplab.NODE_PORT, 5) == ["rpod"] * 5
    assert npl.np is not None
    assert npl.applier is not None
    svc_id = npl.applier.service_id("web")
    assert svc_id is not None
    counters = npl.np.counters(svc_id)
    assert counters[nodeport.abi.NpCounter.SNAT] >= 5
    snat = [r for r in nodeport.ct_rows(npl.np.conntrack())
            if r["dir"] == "orig" and r["to_dst"].startswith(nplab.REMOTE_POD)]
    assert snat and all(r["to_src"].startswith(f"{nplab.NODE_IP}:") for r in snat)


def test_local_policy_serves_only_from_this_node(npl: nplab.NodePortLab) -> None:
    npl.apply(npl.service(policy="local", backends=(nplab.LOCAL_POD, nplab.REMOTE_POD)))
    assert npl.call("client", _ask_all, nplab.NODE_IP, nplab.NODE_PORT, 10) == ["pod"] * 10
    npl.apply(npl.service(policy="local", backends=(nplab.REMOTE_POD,)))
    # No local backend: dropped, as kube-proxy does; the client's connect times out.
    got = npl.call("client", _ask_all, nplab.NODE_IP, nplab.NODE_PORT, 2)
    assert all(g.startswith("error:") for g in got), got


def test_the_node_itself_is_left_alone(npl: nplab.NodePortLab) -> None:
    """A port of the node that is no frontend still reaches the node's own sockets."""
    npl.apply(npl.service())

    def node_listens() -> bool:
        with socket.create_server((nplab.NODE_IP, 30099)) as srv:
            srv.settimeout(5)
            conn, _ = srv.accept()
            conn.close()
            return True

    result: list[object] = []
    t = threading.Thread(target=lambda: result.append(npl.call("node", node_listens)))
    t.start()

    def connect() -> bool:
        for _ in range(50):
            try:
                socket.create_connection((nplab.NODE_IP, 30099), timeout=1).close()
                return True
            except OSError:
                time.sleep(0.1)
        return False

    assert npl.call("client", connect)
    t.join(10)
    assert result == [True]
