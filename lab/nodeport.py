"""The NodePort lab: traffic from outside a node, through the packet path (tc).

Five network namespaces of one lab (recorded like any lab's, so a sweep removes them if
the run dies), routed, no bridge::

    client 192.168.77.2 ── ext ── node 192.168.77.1 (tc on ext: ingress + egress)
                                   │  10.244.1.1 ── pod   10.244.1.5   (a local backend)
                                   │  172.30.0.1 ── node2 172.30.0.2 (tc ingress here:
                                   │                 the SNATed replies come back this way)
                                                      10.244.2.1 ── rpod 10.244.2.5
                                                                   (a remote backend)

``node`` is the node under test: its NodePorts answer on 192.168.77.1, its external IP
198.51.100.20 is routed to it by the client, and flows to ``rpod`` leave SNATed to
192.168.77.1 (node2 routes the client's network back to node). The packet path is
loaded in this process and attached inside ``node``; the service maps are written with
the agent's own applier.
"""

from __future__ import annotations

import dataclasses
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyroute2

import lab.netns
import lab.run
from dataplane import apply, loader, model, nodeport, tc
from dataplane.maps import MapSet
from dataplane.settings import Settings

NODE_IP = "192.168.77.1"
CLIENT_IP = "192.168.77.2"
EXTERNAL_IP = "198.51.100.20"
LOCAL_POD = "10.244.1.5"
REMOTE_POD = "10.244.2.5"
POD_PORT = 8000
NODE_PORT = 30080
SERVICE_VIP = "10.96.0.80"
SERVICE_PORT = 80


@dataclasses.dataclass(frozen=True)
class _Link:
    a: str  # namespace of the first end
    a_if: str
    a_ip: str
    b: str
    b_if: str
    b_ip: str
    prefix: int = 24


class NodePortLab:
    """The topology above, the packet path attached in ``node``, servers in the pods."""

    def __init__(self, load: bool = True) -> None:
        """``load``: load the packet path here and attach it in ``node``; without it the
        topology is bare (for an agent run inside ``node`` to attach its own)."""
        self.load = load
        self.lab = lab.netns.Lab()
        self.ns: dict[str, str] = {}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.path: tc.PacketPath | None = None
        self.maps: MapSet | None = None
        self.applier: apply.Applier | None = None
        self.np: nodeport.NodePortMaps | None = None
        self.settings: Settings | None = None

    def __enter__(self) -> NodePortLab:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self) -> NodePortLab:
        self.lab.up()
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        return self

    def _build(self) -> None:
        for role in ("node", "client", "pod", "node2", "rpod"):
            self.ns[role] = self.lab.add_netns(f"np{role}")
        ns = self.ns
        for link in (
            _Link(ns["node"], "ext", NODE_IP, ns["client"], "eth0", CLIENT_IP),
            _Link(ns["node"], "pod0", "10.244.1.1", ns["pod"], "eth0", LOCAL_POD),
            _Link(ns["node"], "n2n", "172.30.0.1", ns["node2"], "n2n", "172.30.0.2"),
            _Link(ns["node2"], "pod0", "10.244.2.1", ns["rpod"], "eth0", REMOTE_POD),
        ):
            _veth(link)
        _route(ns["client"], "default", "192.168.77.1")
        _route(ns["pod"], "default", "10.244.1.1")
        _route(ns["rpod"], "default", "10.244.2.1")
        _route(ns["node"], "10.244.2.0/24", "172.30.0.2")
        _route(ns["node2"], "192.168.77.0/24", "172.30.0.1")
        for role in ("node", "node2"):
            lab.netns.sysctl(ns[role], "net.ipv4.ip_forward", 1)
        if self.load:
            self._load()

    def _load(self) -> None:
        ns = self.ns
        pin_dir = Path(f"/sys/fs/bpf/kvrtest-nplab-{secrets.token_hex(3)}")
        self.lab.own_pin_dir(pin_dir)
        self.settings = Settings(pin_dir=pin_dir)
        self.path = tc.PacketPath(self.settings)
        self.path.attach(tc.Interface("ext", ns["node"]))
        self.path.attach(tc.Interface("n2n", ns["node"]), egress=False)
        self.maps = MapSet(pin_dir)
        self.applier = apply.Applier(self.maps, self.settings.hash_seed)
        self.np = nodeport.NodePortMaps(pin_dir)
        self.np.set_config(NODE_IP)
        self.np.set_node_addresses(nodeport.node_addresses(ns["node"]))

    def serve(self, role: str, name: str, argv: list[str] | None = None) -> None:
        """Start an HTTP server in a pod (the lab's podserver unless ``argv``)."""
        cmd = argv or [sys.executable, "-m", "lab.podserver", "--name", name,
                       "--port", str(POD_PORT)]
        self.procs.append(lab.run.spawn(self.ns[role], cmd, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL))

    def service(self, *, policy: str = "cluster", backends: tuple[str, ...] = (LOCAL_POD,),
                **kw: Any) -> model.Service:
        """A NodePort + external IP service over the given pods (LOCAL_POD runs on node)."""
        return model.Service(
            "web", SERVICE_VIP, SERVICE_PORT, node_port=NODE_PORT, external_ips=(EXTERNAL_IP,),
            external_traffic_policy=model.TrafficPolicy(policy),
            backends=tuple(model.Backend(b, POD_PORT, node="node" if b == LOCAL_POD else "node2")
                           for b in backends), **kw)

    def apply(self, *services: model.Service) -> None:
        assert self.applier is not None and self.np is not None
        desired = model.DesiredState(services)
        self.applier.apply(desired)
        local = {s.identity(b) for s in desired.services for b in s.backends if b.node == "node"}
        nodeport.apply(self.np, desired.services, self.applier.service_id,
                       self.applier.backend_id, local.__contains__)

    def call(self, role: str, fn: Any, *args: Any, timeout: float = 120, **kw: Any) -> Any:
        return lab.run.call(self.ns[role], fn, *args, timeout=timeout, **kw)

    def down(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        self.procs.clear()
        for closable in (self.applier, self.np, self.maps, self.path):
            if closable is not None:
                closable.close()
        self.applier = self.np = self.maps = self.path = None
        if self.settings is not None and self.settings.pin_dir.exists():
            loader.uninstall(self.settings.pin_dir)
        self.lab.down()  # the namespaces go, and the tc filters in them


def _veth(link: _Link) -> None:
    # Born in the first namespace with its peer in the second: no name ever on the host.
    with pyroute2.NetNS(link.a) as ipa:
        ipa.link("add", ifname=link.a_if, kind="veth",
                 peer={"ifname": link.b_if, "net_ns_fd": link.b})
    for ns, ifname, ip in ((link.a, link.a_if, link.a_ip), (link.b, link.b_if, link.b_ip)):
        with pyroute2.NetNS(ns) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            index = ipr.link_lookup(ifname=ifname)[0]
            ipr.addr("add", index=index, address=ip, prefixlen=link.prefix)
            ipr.link("set", index=index, state="up")


def _route(ns: str, dst: str, gateway: str) -> None:
    with pyroute2.NetNS(ns) as ipr:
        ipr.route("add", dst=dst, gateway=gateway)
