"""Cluster DNS through kvroute: Debian's dnsmasq as two resolvers behind a dual-stack UDP
VIP, asked by dig and by the compiled client from IPv4 and IPv6, replies from the VIP."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from dataplane import abi
from lab import dns

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def dns_lab() -> Iterator[dns.DnsLab]:
    if os.geteuid() != 0:
        pytest.skip("the DNS lab needs root (eBPF, cgroups, network namespaces)")
    missing = dns.tools_missing()
    if missing:
        pytest.skip(f"missing {', '.join(missing)}: apt-get install -y dnsmasq-base dnsutils "
                    "gcc")
    with dns.dns_lab() as parts:
        yield parts


@pytest.mark.parametrize(("vip", "qtype"), [(dns.VIP4, "A"), (dns.VIP6, "AAAA")])
def test_dig_through_the_vip_is_answered_by_both_resolvers_from_the_vip(
        dns_lab: dns.DnsLab, vip: str, qtype: str) -> None:
    the_lab, pods, client = dns_lab.the_lab, dns_lab.pods, dns_lab.client
    own = {str(p.address) if qtype == "A" else str(p.address6) for p in pods}
    seen = [client.call(dns.dig, vip, qtype, cgroup=the_lab.cgroup) for _ in range(24)]
    # dig takes an answer only from the address it asked: each one came from the VIP.
    assert {replied for _, replied in seen} == {vip}
    assert {answer for answer, _ in seen} == own  # each dig is a new socket: both used


def test_compiled_client_through_the_vip_never_sees_a_backend_address(dns_lab: dns.DnsLab) -> None:
    the_lab, client, applier = dns_lab.the_lab, dns_lab.client, dns_lab.applier
    binary = dns.build()
    for vip in (dns.VIP4, dns.VIP6):
        for mode in ("reuse", "new"):
            r = dns.query(binary, client.netns, the_lab.cgroup, vip, 300, mode)
            assert (r.ok, r.wrong_source) == (300, 0), (vip, mode, r)
    with applier.lock:
        svc_id = applier.service_id("kube-dns")
    counters = applier.maps.percpu_sum("kvr_svc_cnt_v3", abi.ct.c_uint32(svc_id),
                                       abi.SvcCounters)
    assert counters is not None and counters[abi.SvcCounter.REPLIES] >= 1200
