"""The packet path (bpf/tc_nodeport.c) under BPF_PROG_TEST_RUN, on frames built with
scapy: DNAT to the chosen backend with correct checksums, reverse NAT of the reply,
SNAT to remote backends, conntrack that outlives weight changes, states, expiry by
RST/FIN, and packets the path must leave alone (not a frontend, fragments, truncated
or malformed headers) passing untouched without a conntrack entry."""

from __future__ import annotations

import ctypes as ct
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dataplane import abi, apply, hashing, loader, model, nodeport, tc
from dataplane.maps import MapSet
from dataplane.settings import Settings
from tests.kernel.test_abi import assert_mirrors

scapy = pytest.importorskip("scapy.all", reason="scapy builds the test frames (dev extra)")
Ether, IP, TCP, UDP, Raw = scapy.Ether, scapy.IP, scapy.TCP, scapy.UDP, scapy.Raw

NODE = "192.168.50.10"  # the node's address: NodePorts answer on it, SNAT uses it
EXT_IP = "198.51.100.20"  # an external IP of the service
CLIENT = "203.0.113.7"
VIP = "10.96.0.10"
LOCAL_BE = "10.244.1.5"  # on this node
REMOTE_BE = "10.244.2.7"  # on another node
NODE_PORT = 30080
SNAT_MIN, SNAT_MAX = 61000, 61999


class PacketNode:
    """One loaded packet path with its own pins, plus helpers to fill its maps."""

    def __init__(self, settings: Settings, path: tc.PacketPath) -> None:
        self.settings = settings
        self.path = path
        self.maps = MapSet(settings.pin_dir)
        self.applier = apply.Applier(self.maps, settings.hash_seed)
        self.np = nodeport.NodePortMaps(settings.pin_dir)
        self.np.set_config(NODE, SNAT_MIN, SNAT_MAX)
        self.np.set_node_addresses([NODE])
        self.local_addresses = {LOCAL_BE}

    def apply(self, *services: model.Service) -> None:
        desired = model.DesiredState(services)
        self.applier.apply(desired)
        nodeport.apply(self.np, desired.services, self.applier.service_id,
                       self.applier.backend_id,
                       lambda ident: ident.split(":")[0] in self.local_addresses)

    def run(self, frame: bytes, prog: str = tc.INGRESS) -> tuple[int, bytes]:
        verdict, out, _ = self.path.test_run(prog, frame)
        return verdict, out

    def conntrack(self) -> list[tuple[abi.CtKey, abi.Ct]]:
        return self.np.conntrack()

    def flush_conntrack(self) -> None:
        fd = self.np.fds["kvr_ct_v1"]
        from dataplane import bpfsys
        for key, _ in self.conntrack():
            bpfsys.delete(fd, key)

    def counters(self, name: str) -> dict[str, int]:
        svc_id = self.applier.service_id(name)
        assert svc_id is not None
        values = self.np.counters(svc_id)
        return {c.name.lower(): values[c] for c in abi.NpCounter}


@pytest.fixture(scope="module")
def pnode() -> Iterator[PacketNode]:
    if os.geteuid() != 0:
        pytest.skip("kernel tests need root (eBPF)")
    pin_dir = Path(f"/sys/fs/bpf/kvrtest-np-{secrets.token_hex(3)}")
    settings = Settings(pin_dir=pin_dir)
    try:
        path = tc.PacketPath(settings)
    except loader.LoadError as exc:
        loader.uninstall(pin_dir) if pin_dir.exists() else None
        pytest.fail(f"the packet-path programs do not load: {exc}")
    node = PacketNode(settings, path)
    try:
        yield node
    finally:
        node.applier.close()
        node.np.close()
        node.maps.close()
        path.close()
        loader.uninstall(pin_dir)


@pytest.fixture
def pn(pnode: PacketNode) -> Iterator[PacketNode]:
    pnode.local_addresses = {LOCAL_BE}
    yield pnode
    pnode.apply()
    pnode.flush_conntrack()


def service(backends: list[dict[str, Any]], **kw: Any) -> model.Service:
    fields = {"name": "web", "vip": VIP, "port": 80, "node_port": NODE_PORT,
              "external_ips": [EXT_IP], **kw}
    fields["backends"] = backends
    return model.service_from_dict(fields)


def be(address: str, **kw: Any) -> dict[str, Any]:
    return {"address": address, "port": 8080, **kw}


def frame(src: str, dst: str, sport: int, dport: int, flags: str = "S",
          payload: bytes = b"", proto: str = "tcp") -> Any:
    l4 = (TCP(sport=sport, dport=dport, flags=flags, seq=1000, ack=0 if flags == "S" else 1)
          if proto == "tcp" else UDP(sport=sport, dport=dport))
    return Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src=src, dst=dst) / l4 \
        / Raw(payload)


def checksums_ok(raw: bytes) -> bool:
    """Recompute with scapy: the frame's checksums equal freshly computed ones."""
    pkt = Ether(raw)
    fresh = Ether(raw)
    del fresh[IP].chksum
    l4 = TCP if TCP in fresh else UDP
    del fresh[l4].chksum
    fresh = Ether(bytes(fresh))
    return bool(pkt[IP].chksum == fresh[IP].chksum and pkt[l4].chksum == fresh[l4].chksum)


def tuple_of(raw: bytes) -> tuple[str, int, str, int]:
    pkt = Ether(raw)
    l4 = pkt[TCP] if TCP in pkt else pkt[UDP]
    return pkt[IP].src, l4.sport, pkt[IP].dst, l4.dport


# -- DNAT, reverse NAT, checksums -----------------------------------------------------------

def test_syn_to_a_nodeport_is_dnated_to_the_local_backend_and_the_reply_reversed(
        pn: PacketNode) -> None:
    pn.apply(service([be(LOCAL_BE)]))
    syn = frame(CLIENT, NODE, 40000, NODE_PORT, payload=b"hello")
    verdict, out = pn.run(bytes(syn))
    assert verdict == tc.TC_ACT_OK
    assert tuple_of(out) == (CLIENT, 40000, LOCAL_BE, 8080)  # client address kept
    assert checksums_ok(out)
    assert Ether(out)[Raw].load == b"hello"
    # The backend answers the client; egress of the external interface reverses it.
    reply = frame(LOCAL_BE, CLIENT, 8080, 40000, flags="SA")
    verdict, back = pn.run(bytes(reply), tc.EGRESS)
    assert verdict == tc.TC_ACT_OK
    assert tuple_of(back) == (NODE, NODE_PORT, CLIENT, 40000)
    assert checksums_ok(back)
    c = pn.counters("web")
    assert (c["new"], c["local"], c["snat"], c["fwd"], c["rev"]) == (1, 1, 0, 1, 1)
    rows = nodeport.ct_rows(pn.conntrack())
    assert {r["state"] for r in rows} == {"established"}


def test_an_external_ip_is_a_frontend_too_and_udp_checksums_hold(pn: PacketNode) -> None:
    pn.apply(service([be(LOCAL_BE)], protocol="udp"))
    dgram = frame(CLIENT, EXT_IP, 5353, 80, proto="udp", payload=b"q" * 33)
    verdict, out = pn.run(bytes(dgram))
    assert verdict == tc.TC_ACT_OK
    assert tuple_of(out) == (CLIENT, 5353, LOCAL_BE, 8080)
    assert checksums_ok(out)
    reply = frame(LOCAL_BE, CLIENT, 8080, 5353, proto="udp", payload=b"a" * 10)
    _, back = pn.run(bytes(reply), tc.EGRESS)
    assert tuple_of(back) == (EXT_IP, 80, CLIENT, 5353)
    assert checksums_ok(back)


def test_a_remote_backend_is_reached_with_snat_and_its_reply_goes_back_to_the_client(
        pn: PacketNode) -> None:
    pn.apply(service([be(REMOTE_BE)]))
    verdict, out = pn.run(bytes(frame(CLIENT, NODE, 40001, NODE_PORT)))
    # Routed by the program (redirect) when this machine has a route to the backend; the
    # stack's (OK) when not: a source that is the node's own would be a martian there.
    assert verdict in (tc.TC_ACT_OK, tc.TC_ACT_REDIRECT)
    src, sport, dst, dport = tuple_of(out)
    assert (src, dst, dport) == (NODE, REMOTE_BE, 8080)
    assert SNAT_MIN <= sport <= SNAT_MAX
    assert checksums_ok(out)
    # The other node answers this node, on the SNAT port: ingress turns it back.
    verdict, back = pn.run(bytes(frame(REMOTE_BE, NODE, 8080, sport, flags="SA")))
    assert verdict in (tc.TC_ACT_OK, tc.TC_ACT_REDIRECT)
    assert tuple_of(back) == (NODE, NODE_PORT, CLIENT, 40001)
    assert checksums_ok(back)
    assert pn.counters("web")["snat"] == 1


def test_two_clients_on_the_same_port_get_different_snat_ports(pn: PacketNode) -> None:
    pn.apply(service([be(REMOTE_BE)]))
    ports = set()
    for i in range(20):
        _, out = pn.run(bytes(frame(f"203.0.113.{10 + i}", NODE, 40000, NODE_PORT)))
        ports.add(tuple_of(out)[1])
    assert len(ports) == 20


# -- conntrack: flows stay, states apply to new flows only --------------------------------

def test_a_flow_keeps_its_backend_after_the_weights_change(pn: PacketNode) -> None:
    pn.local_addresses = {LOCAL_BE, REMOTE_BE}
    pn.apply(service([be(LOCAL_BE), be(REMOTE_BE)]))
    flows = {}
    for sport in range(41000, 41040):
        _, out = pn.run(bytes(frame(CLIENT, NODE, sport, NODE_PORT)))
        flows[sport] = tuple_of(out)[2]
    assert set(flows.values()) == {LOCAL_BE, REMOTE_BE}
    # Every new flow would now go to LOCAL_BE: REMOTE_BE weighs nothing.
    pn.apply(service([be(LOCAL_BE), be(REMOTE_BE, weight=0)]))
    for sport, backend in flows.items():
        _, out = pn.run(bytes(frame(CLIENT, NODE, sport, NODE_PORT, flags="A")))
        assert tuple_of(out)[2] == backend
    for sport in range(42000, 42020):
        _, out = pn.run(bytes(frame(CLIENT, NODE, sport, NODE_PORT)))
        assert tuple_of(out)[2] == LOCAL_BE


@pytest.mark.parametrize("state", ["draining", "open"])
def test_draining_and_open_backends_get_no_new_flows_but_keep_theirs(
        pn: PacketNode, state: str) -> None:
    pn.local_addresses = {LOCAL_BE, REMOTE_BE}
    pn.apply(service([be(LOCAL_BE), be(REMOTE_BE)]))
    kept = None
    for sport in range(43000, 43040):
        _, out = pn.run(bytes(frame(CLIENT, NODE, sport, NODE_PORT)))
        if tuple_of(out)[2] == REMOTE_BE:
            kept = sport
            break
    assert kept is not None
    pn.apply(service([be(LOCAL_BE), be(REMOTE_BE, state=state)]))
    _, out = pn.run(bytes(frame(CLIENT, NODE, kept, NODE_PORT, flags="A")))
    assert tuple_of(out)[2] == REMOTE_BE
    for sport in range(44000, 44040):
        _, out = pn.run(bytes(frame(CLIENT, NODE, sport, NODE_PORT)))
        assert tuple_of(out)[2] == LOCAL_BE


def test_no_usable_backend_drops_and_counts(pn: PacketNode) -> None:
    pn.apply(service([be(LOCAL_BE, state="open")]))
    verdict, _ = pn.run(bytes(frame(CLIENT, NODE, 45000, NODE_PORT)))
    assert verdict == tc.TC_ACT_SHOT
    assert pn.counters("web")["no_backend"] == 1
    assert pn.conntrack() == []


def test_client_affinity_keys_on_the_client_address_like_the_python_prediction(
        pn: PacketNode) -> None:
    pn.local_addresses = {LOCAL_BE, REMOTE_BE, "10.244.3.9"}
    backends = [be(LOCAL_BE), be(REMOTE_BE), be("10.244.3.9")]
    pn.apply(service(backends, affinity="client", epsilon=None))
    _, svc = _service(pn)
    table = pn.maps.table(svc)
    assert table is not None
    ident = hashing.svc_ident(VIP, 80, "tcp")
    for i in range(12):
        client = f"203.0.113.{100 + i}"
        key = (1 << 63) | abi.ip_to_be32(client)  # KVR_AFF_KEY_IP4
        want_id = table[hashing.slot_hash(key, ident, 0, pn.settings.hash_seed) % len(table)]
        want = abi.be32_to_ip(pn.maps.get("kvr_be_v2", ct.c_uint32(want_id), abi.Backend).addr4)
        got = {tuple_of(pn.run(bytes(frame(client, NODE, sport, NODE_PORT)))[1])[2]
               for sport in (46000, 46001, 46002)}
        assert got == {str(want)}
    assert pn.counters("web")["aff_hit"] == 12 * 2


def _service(pn: PacketNode) -> tuple[abi.L4Key, abi.Svc]:
    key = abi.l4_key(VIP, 80, "tcp")
    svc = pn.maps.get("kvr_svc_v2", key, abi.Svc)
    assert svc is not None
    return key, svc


def test_local_policy_uses_local_backends_only_and_keeps_the_client_address(
        pn: PacketNode) -> None:
    pn.apply(service([be(LOCAL_BE), be(REMOTE_BE)], external_traffic_policy="local"))
    for sport in range(47000, 47030):
        _, out = pn.run(bytes(frame(CLIENT, NODE, sport, NODE_PORT)))
        assert tuple_of(out) == (CLIENT, sport, LOCAL_BE, 8080)
    assert pn.counters("web")["snat"] == 0
    # Without a local backend, Local traffic is dropped rather than sent away.
    pn.local_addresses = set()
    pn.apply(service([be(LOCAL_BE), be(REMOTE_BE)], external_traffic_policy="local"))
    verdict, _ = pn.run(bytes(frame(CLIENT, NODE, 47999, NODE_PORT)))
    assert verdict == tc.TC_ACT_SHOT


def test_rst_removes_the_flow_and_fins_from_both_sides_close_it(pn: PacketNode) -> None:
    pn.apply(service([be(LOCAL_BE)]))
    pn.run(bytes(frame(CLIENT, NODE, 48000, NODE_PORT)))
    pn.run(bytes(frame(LOCAL_BE, CLIENT, 8080, 48000, flags="SA")), tc.EGRESS)
    assert len(pn.conntrack()) == 2
    verdict, out = pn.run(bytes(frame(CLIENT, NODE, 48000, NODE_PORT, flags="R")))
    assert verdict == tc.TC_ACT_OK and tuple_of(out)[2] == LOCAL_BE  # translated, then gone
    assert pn.conntrack() == []
    pn.run(bytes(frame(CLIENT, NODE, 48001, NODE_PORT)))
    pn.run(bytes(frame(LOCAL_BE, CLIENT, 8080, 48001, flags="SA")), tc.EGRESS)
    pn.run(bytes(frame(CLIENT, NODE, 48001, NODE_PORT, flags="FA")))
    assert {r["state"] for r in nodeport.ct_rows(pn.conntrack())} == {"fin", "established"}
    pn.run(bytes(frame(LOCAL_BE, CLIENT, 8080, 48001, flags="FA")), tc.EGRESS)
    assert {r["state"] for r in nodeport.ct_rows(pn.conntrack())} == {"closing"}
    assert all(v.lifetime_s == 10 for _, v in pn.conntrack())
    assert pn.counters("web")["closed"] == 2


# -- what the packet path leaves alone ----------------------------------------------------

def _untouched(pn: PacketNode, raw: bytes, prog: str = tc.INGRESS) -> None:
    verdict, out = pn.run(raw, prog)
    assert verdict == tc.TC_ACT_OK
    assert out == raw
    assert pn.conntrack() == []


def test_a_packet_to_no_frontend_passes_untouched(pn: PacketNode) -> None:
    pn.apply(service([be(LOCAL_BE)]))
    _untouched(pn, bytes(frame(CLIENT, NODE, 40000, 22)))  # the node's own ssh
    _untouched(pn, bytes(frame(CLIENT, "192.168.50.99", 40000, NODE_PORT)))  # not the node
    _untouched(pn, bytes(frame(CLIENT, VIP, 40000, 80)))  # the ClusterIP is the socket path's
    _untouched(pn, bytes(frame(CLIENT, NODE, 40000, NODE_PORT)), tc.EGRESS)  # egress starts none
    _untouched(pn, bytes(frame(CLIENT, NODE, 40000, NODE_PORT, proto="udp")))  # tcp only


def test_fragments_pass_untouched_and_are_counted(pn: PacketNode) -> None:
    pn.apply(service([be(LOCAL_BE)]))
    before = pn.np.reasons()["fragment"]
    big = Ether() / IP(src=CLIENT, dst=NODE, id=7) / TCP(sport=40000, dport=NODE_PORT) \
        / Raw(b"x" * 600)
    frags = scapy.fragment(big[IP], fragsize=256)
    assert len(frags) > 1
    for f in frags:
        _untouched(pn, bytes(Ether(src="02:00:00:00:00:01") / f))
    assert pn.np.reasons()["fragment"] - before == len(frags)


def _with_length(raw: bytes, tot_len: int) -> bytes:
    """The frame with its IPv4 total length (and so its header checksum) set."""
    ip = IP(raw[14:])
    ip.len = tot_len
    del ip.chksum
    return raw[:14] + bytes(ip)[:len(raw) - 14]


def test_truncated_and_malformed_headers_pass_untouched(pn: PacketNode) -> None:
    pn.apply(service([be(LOCAL_BE)]))
    good = bytes(frame(CLIENT, NODE, 40000, NODE_PORT))
    eth = 14
    # A frame cut inside its IPv4 header cannot be test-run (the kernel refuses one
    # shorter than Ethernet + 20 bytes); the program's own check (bpf_skb_load_bytes
    # of the header) is the same as for a cut TCP header.
    bad = {
        "no tcp header": good[:eth + 20],
        "tcp header cut": good[:eth + 20 + 10],
        "tcp header cut, lengths agreeing": _with_length(good[:eth + 30], 30),
        "no tcp header, lengths agreeing": _with_length(good[:eth + 20], 20),
        "ihl below 5": good[:eth] + bytes([0x43]) + good[eth + 1:],
        "ihl past the packet": good[:eth] + bytes([0x4F]) + good[eth + 1:],
        "version 6 in an IPv4 frame": good[:eth] + bytes([0x65]) + good[eth + 1:],
        "total length past the frame": good[:eth + 2] + (1500).to_bytes(2, "big")
        + good[eth + 4:],
        "total length below the headers": good[:eth + 2] + (24).to_bytes(2, "big")
        + good[eth + 4:],
    }
    reasons = pn.np.reasons()
    for what, raw in bad.items():
        verdict, out = pn.run(raw)
        assert (verdict, out, pn.conntrack()) == (tc.TC_ACT_OK, raw, []), what
    after = pn.np.reasons()
    # Truncated: the lengths agree and end before the TCP header does (three of them);
    # malformed: the header contradicts itself or the frame.
    assert after["truncated"] - reasons["truncated"] == 3
    assert after["malformed"] - reasons["malformed"] == len(bad) - 3
    assert pn.counters("web")["new"] == 0


def test_without_a_snat_address_remote_flows_are_left_alone(pn: PacketNode) -> None:
    pn.apply(service([be(REMOTE_BE)]))
    pn.np.set_config(None)
    try:
        _untouched(pn, bytes(frame(CLIENT, NODE, 40000, NODE_PORT)))
        assert pn.np.reasons()["no_snat_addr"] >= 1
    finally:
        pn.np.set_config(NODE, SNAT_MIN, SNAT_MAX)


# -- the CLI's view ------------------------------------------------------------------------

def test_cli_shows_flows_counters_and_explains_a_nodeport(pn: PacketNode) -> None:
    import json

    from click.testing import CliRunner

    from dataplane import cli
    pn.apply(service([be(REMOTE_BE)], affinity="client", epsilon=None))
    _, out = pn.run(bytes(frame(CLIENT, NODE, 49000, NODE_PORT)))
    sent_to = tuple_of(out)[2]
    pin = ["--pin-dir", str(pn.settings.pin_dir)]
    runner = CliRunner()
    res = runner.invoke(cli.main, ["maps", "conntrack", "--json", *pin])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    orig = next(r for r in rows if r["dir"] == "orig")
    assert (orig["src"], orig["dst"]) == (f"{CLIENT}:49000", f"{NODE}:{NODE_PORT}")
    assert orig["to_dst"] == f"{REMOTE_BE}:8080" and orig["to_src"].startswith(f"{NODE}:")
    assert orig["state"] == "syn"
    res = runner.invoke(cli.main, ["maps", "nodeport", *pin])
    assert res.exit_code == 0, res.output
    assert f"*:{NODE_PORT}/tcp" in res.output and f"{EXT_IP}:80/tcp" in res.output
    data = json.loads(runner.invoke(cli.main, ["maps", "nodeport", "--json", *pin]).output)
    np_row = next(r for r in data["frontends"] if r["frontend"] == f"*:{NODE_PORT}/tcp")
    assert np_row["counters"]["new"] == 1 and np_row["counters"]["snat"] == 1
    # explain: the same backend the packet got, and that it is SNATed.
    for ref in (f"{NODE}:{NODE_PORT}", f"*:{NODE_PORT}", f"{EXT_IP}:80"):
        res = runner.invoke(cli.main, ["explain", ref, "--client-ip", CLIENT, "--json", *pin])
        assert res.exit_code == 0, res.output
        got = json.loads(res.output)
        assert got["backend"] == f"{sent_to}:8080/tcp" and got["snat"] is True
    res = runner.invoke(cli.main, ["explain", "192.168.50.99:30080", "--client-ip", CLIENT,
                                   *pin])
    assert res.exit_code != 0 and "no NodePort or external IP" in res.output


def test_a_reused_tuple_after_close_is_a_new_flow_not_the_old_one(pn: PacketNode) -> None:
    """A client that reuses its port within the close lifetime: its SYN to the NodePort
    starts a new flow (new pick, new SNAT port); a SYN-ACK on the closed flow's reply
    tuple (the client reached the pod directly from that port) is left alone."""
    pn.apply(service([be(REMOTE_BE)]))

    def close_flow(sport: int) -> int:
        _, out = pn.run(bytes(frame(CLIENT, NODE, sport, NODE_PORT)))
        snat_port = tuple_of(out)[1]
        pn.run(bytes(frame(REMOTE_BE, NODE, 8080, snat_port, flags="SA")))
        pn.run(bytes(frame(CLIENT, NODE, sport, NODE_PORT, flags="FA")))
        pn.run(bytes(frame(REMOTE_BE, NODE, 8080, snat_port, flags="FA")))
        assert {r["state"] for r in nodeport.ct_rows(pn.conntrack())} == {"closing"}
        return snat_port

    close_flow(50000)
    verdict, _ = pn.run(bytes(frame(CLIENT, NODE, 50000, NODE_PORT)))
    assert verdict in (tc.TC_ACT_OK, tc.TC_ACT_REDIRECT)
    rows = nodeport.ct_rows(pn.conntrack())
    assert {r["state"] for r in rows} == {"syn"} and len(rows) == 2  # the old pair is gone
    assert pn.counters("web")["new"] == 2
    pn.flush_conntrack()

    pn.apply(service([be(LOCAL_BE)]))
    pn.run(bytes(frame(CLIENT, NODE, 50001, NODE_PORT)))
    pn.run(bytes(frame(LOCAL_BE, CLIENT, 8080, 50001, flags="SA")), tc.EGRESS)
    pn.run(bytes(frame(CLIENT, NODE, 50001, NODE_PORT, flags="FA")))
    pn.run(bytes(frame(LOCAL_BE, CLIENT, 8080, 50001, flags="FA")), tc.EGRESS)
    direct_synack = bytes(frame(LOCAL_BE, CLIENT, 8080, 50001, flags="SA"))
    verdict, out = pn.run(direct_synack, tc.EGRESS)
    assert (verdict, out) == (tc.TC_ACT_OK, direct_synack)
    assert pn.conntrack() == []


def test_snat_ports_run_out_then_a_quiet_closed_flow_gives_its_port_back(
        pn: PacketNode) -> None:
    pn.apply(service([be(REMOTE_BE)]))
    pn.np.set_config(NODE, 61000, 61001)  # two ports for the whole test
    try:
        ports = []
        for sport in (51000, 51001):
            _, out = pn.run(bytes(frame(CLIENT, NODE, sport, NODE_PORT)))
            ports.append(tuple_of(out)[1])
            pn.run(bytes(frame(CLIENT, NODE, sport, NODE_PORT, flags="FA")))
            pn.run(bytes(frame(REMOTE_BE, NODE, 8080, ports[-1], flags="FA")))
        assert sorted(ports) == [61000, 61001]
        before = pn.np.reasons()["no_snat_port"]
        verdict, _ = pn.run(bytes(frame(CLIENT, NODE, 51002, NODE_PORT)))
        assert verdict == tc.TC_ACT_SHOT  # both ports held by flows closed just now
        assert pn.np.reasons()["no_snat_port"] == before + 1
        time.sleep(1.2)  # KVR_SNAT_REUSE_S
        verdict, out = pn.run(bytes(frame(CLIENT, NODE, 51002, NODE_PORT)))
        assert verdict in (tc.TC_ACT_OK, tc.TC_ACT_REDIRECT)
        taken = tuple_of(out)[1]
        assert taken in ports
        # The flow that held the port is gone whole: no ORIG entry still SNATs to it.
        origs = [r for r in nodeport.ct_rows(pn.conntrack()) if r["dir"] == "orig"
                 and r["to_src"] == f"{NODE}:{taken}"]
        assert [r["src"] for r in origs] == [f"{CLIENT}:51002"]
    finally:
        pn.np.set_config(NODE, SNAT_MIN, SNAT_MAX)


# -- the ABI: ctypes mirrors against what bcc derived from bpf/lib/abi.h ----------------

NP_MAP_TYPES: dict[str, tuple[Any, Any]] = {
    "kvr_np_fe_v1": (abi.L4Key, abi.NpFrontend),
    "kvr_np_local_v1": (ct.c_uint32, abi.NpLocal),
    "kvr_np_cfg": (ct.c_uint32, abi.NpConfig),
    "kvr_ct_v1": (abi.CtKey, abi.Ct),
    "kvr_np_cnt": (ct.c_uint32, abi.NpCounters),
}


@pytest.mark.parametrize("name", sorted(NP_MAP_TYPES))
def test_packet_path_mirrors_match_bcc(pnode: PacketNode, name: str) -> None:
    assert_mirrors(pnode.path.bpf[name], *NP_MAP_TYPES[name])


def test_the_packet_path_pins_exactly_its_maps(pnode: PacketNode) -> None:
    from dataplane import maps
    pinned = {p.name for p in pnode.settings.pin_dir.iterdir() if p.is_file()}
    assert pinned == set(maps.PINNED_MAPS) | set(maps.NODEPORT_MAPS)


def test_metrics_carry_the_packet_path_counters(pn: PacketNode) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from dataplane import metrics
    pn.apply(service([be(LOCAL_BE)]))
    pn.run(bytes(frame(CLIENT, NODE, 52000, NODE_PORT)))
    registry = CollectorRegistry()
    registry.register(metrics.PacketPathCollector(pn.maps, pn.np))
    text = generate_latest(registry).decode()
    assert 'kvroute_agent_packet_path_total{event="new",service="web"} 1.0' in text
    assert 'kvroute_agent_packet_path_reasons_total{reason="fragment"}' in text
