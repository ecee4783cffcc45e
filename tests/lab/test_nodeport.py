"""A NodePort and an external IP served to a client outside the node, through the real
packet path attached in a network namespace acting as the node: a local backend (client
address kept), a backend on another node (SNAT), externalTrafficPolicy: Local, and the
conntrack the CLI shows."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from dataplane import loader, model, nodeport
from lab import nodeport as nplab
from lab import podserver
from lab import run as lab_run


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


def test_the_agent_serves_a_nodeport_on_its_external_interface(tmp_path: Path) -> None:
    """`kvroute agent --external-interface` inside the node namespace, from a config file:
    a NodePort to a local pod and an external IP to a remote one (SNAT)."""
    if os.geteuid() != 0:
        pytest.skip("the NodePort lab needs root (namespaces, eBPF)")
    kvroute = str(Path(sys.executable).parent / "kvroute")
    with nplab.NodePortLab(load=False) as lab:
        pin_dir = Path(f"/sys/fs/bpf/kvrtest-npagent-{secrets.token_hex(3)}")
        lab.lab.own_pin_dir(pin_dir)
        cfg = tmp_path / "kvroute.yaml"
        local = lab.service()
        remote = model.Service("far", "10.96.0.81", 80, external_ips=("198.51.100.21",),
                               backends=(model.Backend(nplab.REMOTE_POD, nplab.POD_PORT,
                                                       node="node2"),))
        cfg.write_text(yaml.safe_dump(model.DesiredState((local, remote)).to_dict(
            engines=False)))
        lab.serve("pod", "pod")
        lab.serve("rpod", "rpod")
        ready, log = tmp_path / "ready", tmp_path / "agent.log"
        with open(log, "wb") as out:
            proc = lab_run.spawn(lab.ns["node"], [
                kvroute, "agent", "--config", str(cfg), "--cgroup", str(lab.lab.cgroup.path),
                "--pin-dir", str(pin_dir), "--ready-file", str(ready), "--node", "node",
                "--external-interface", "ext", "--external-interface", "n2n",
                "--detach-on-exit"], stdout=out, stderr=subprocess.STDOUT)
        lab.procs.append(proc)
        deadline = time.monotonic() + 90
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ready.exists(), log.read_text()
        for role, ip in (("pod", nplab.LOCAL_POD), ("rpod", nplab.REMOTE_POD)):
            lab.call(role, podserver._poll_listening, ip, nplab.POD_PORT, 10.0)
        assert lab.call("client", _ask_all, nplab.NODE_IP, nplab.NODE_PORT, 3) == ["pod"] * 3
        assert lab.call("client", _ask_all, "198.51.100.21", 80, 3) == ["rpod"] * 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()
        assert "SNAT to 192.168.77.1" in log.read_text()
