"""The connect bench's pure pieces: kube-proxy's rule shapes as restore files and the C
client's JSON (no root, no compiler)."""

from __future__ import annotations

import json
import re

import pytest

from lab import connbench

SERVICES = [
    connbench.Svc(f"bench/svc-{i}", f"10.100.0.{i + 1}", 80,
                  tuple((f"10.200.0.{3 * i + j + 1}", 8000 + j) for j in range(3)))
    for i in range(2)
] + [connbench.Svc("bench/measured", "10.96.0.1", 80,
                   (("10.77.1.10", 8000), ("10.77.1.10", 8001), ("10.77.1.10", 8002)))]


def _rules(text: str, chain: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(f"-A {chain} ")]


def test_iptables_file_is_one_nat_table_with_the_hooks_into_kube_services() -> None:
    text = connbench.iptables_restore(SERVICES)
    lines = text.splitlines()
    assert lines[0] == "*nat" and lines[-1] == "COMMIT"
    assert any(re.match(r"-A OUTPUT .*-j KUBE-SERVICES$", r) for r in lines)
    assert any(re.match(r"-A PREROUTING .*-j KUBE-SERVICES$", r) for r in lines)
    # every chain a rule jumps to is declared
    declared = {line[1:].split()[0] for line in lines if line.startswith(":")}
    targets = {m for r in lines for m in re.findall(r"-j (KUBE-[A-Z0-9-]+)", r)}
    assert targets <= declared


def test_iptables_services_are_walked_in_order_with_the_measured_one_last() -> None:
    text = connbench.iptables_restore(SERVICES)
    walk = _rules(text, "KUBE-SERVICES")
    assert len(walk) == 3
    assert [re.search(r"-d (\S+)/32", r).group(1) for r in walk] == [  # type: ignore[union-attr]
        "10.100.0.1", "10.100.0.2", "10.96.0.1"]
    assert walk[-1].endswith(f"-j {connbench.svc_chain(SERVICES[-1])}")
    assert "--dport 80" in walk[-1] and "-p tcp" in walk[-1]


def test_iptables_endpoint_pick_is_kube_proxys_probability_ladder() -> None:
    text = connbench.iptables_restore(SERVICES)
    measured = SERVICES[-1]
    picks = _rules(text, connbench.svc_chain(measured))
    probs = [re.search(r"--probability (\S+)", r) for r in picks]
    assert [p.group(1) if p else None for p in probs] == ["0.3333333333", "0.5000000000", None]
    for pick, backend in zip(picks, measured.backends, strict=True):
        sep = connbench.sep_chain(measured, backend)
        assert pick.endswith(f"-j {sep}")
        dnat = _rules(text, sep)
        assert dnat[0].endswith("-j KUBE-MARK-MASQ") and f"-s {backend[0]}/32" in dnat[0]
        assert dnat[1].endswith(f"-j DNAT --to-destination {backend[0]}:{backend[1]}")


def test_chain_names_are_kube_proxys_hash_and_distinct() -> None:
    names = {connbench.svc_chain(s) for s in SERVICES}
    names |= {connbench.sep_chain(s, b) for s in SERVICES for b in s.backends}
    assert len(names) == 3 + 9
    assert all(re.fullmatch(r"KUBE-(SVC|SEP)-[A-Z2-7]{16}", n) for n in names)


def test_nft_file_replaces_its_table_and_maps_each_vip_to_its_chain_measured_last() -> None:
    text = connbench.nft_ruleset(SERVICES)
    lines = text.splitlines()
    assert lines[:3] == ["table ip kube-proxy", "delete table ip kube-proxy",
                         "table ip kube-proxy {"]
    assert "type nat hook output priority -100" in text
    assert "chain services { ip daddr . meta l4proto . th dport vmap @service-ips; }" in text
    elements = re.findall(r"(\d+\.\d+\.\d+\.\d+) \. tcp \. 80 : goto (service-\d+)", text)
    assert elements == [("10.100.0.1", "service-0"), ("10.100.0.2", "service-1"),
                        ("10.96.0.1", "service-2")]
    pick = re.search(r"chain service-2 \{ numgen random mod 3 vmap \{ (.*) \}; \}", text)
    assert pick is not None
    assert pick.group(1) == "0 : goto endpoint-2-0, 1 : goto endpoint-2-1, 2 : goto endpoint-2-2"
    for j, (addr, port) in enumerate(SERVICES[-1].backends):
        assert (f"chain endpoint-2-{j} {{ ip saddr {addr} jump mark-for-masquerade; "
                f"meta l4proto tcp dnat to {addr}:{port}; }}") in text
    assert text.count("{") == text.count("}")


def test_empty_rule_files_still_load_as_a_reset() -> None:
    assert connbench.iptables_restore([]).splitlines()[-1] == "COMMIT"
    assert "elements" not in connbench.nft_ruleset([])


OK = {"n": 100, "ok": 99, "errors": 1, "errno": 111, "min_ns": 900, "p50_ns": 1500,
      "p90_ns": 2000, "p99_ns": 4000, "max_ns": 9000, "mean_ns": 1700,
      "elapsed_ns": 3000000, "rate": 33333.3}


def test_parse_takes_the_last_json_line() -> None:
    got = connbench.parse("noise\n" + json.dumps(OK) + "\n\n")
    assert (got.n, got.ok, got.errors, got.errno) == (100, 99, 1, 111)
    assert (got.min_ns, got.p50_ns, got.p99_ns, got.max_ns) == (900, 1500, 4000, 9000)
    assert got.rate == pytest.approx(33333.3)


def test_parse_raises_with_the_errno_when_nothing_connected() -> None:
    failed = {"n": 10, "ok": 0, "errors": 10, "errno": 111, "error": "Connection refused"}
    with pytest.raises(ValueError, match="errno 111: Connection refused"):
        connbench.parse(json.dumps(failed))
    with pytest.raises(ValueError, match="printed nothing"):
        connbench.parse("\n")


def test_connect_argv_checks_the_tag_and_never_repeats_a_seed() -> None:
    argv = connbench.connect_argv(connbench.CACHE, "10.0.0.1", 80, 10, 2, "new")
    assert argv[1:7] == ["connect", "10.0.0.1", "80", "10", "2", "new"]
    seeds = {connbench.connect_argv(connbench.CACHE, "10.0.0.1", 80, 1)[-1] for _ in range(20)}
    assert len(seeds) == 20 and "0" not in seeds
    with pytest.raises(ValueError):
        connbench.connect_argv(connbench.CACHE, "10.0.0.1", 80, 1, tag="old")
    assert connbench.serve_argv(connbench.CACHE, [8000, 8001])[1:] == ["serve", "8000", "8001"]


def test_bench_services_put_the_measured_ones_last() -> None:
    from lab import bench_connect
    rules = bench_connect.rule_services(3, "10.77.1.10")
    assert [s.vip for s in rules] == ["10.100.0.1", "10.100.0.2", "10.96.0.1"]
    assert rules[-1].backends == bench_connect.measured_backends("10.77.1.10")
    assert all(len(s.backends) == bench_connect.BACKENDS for s in rules)
    kvr = bench_connect.kvroute_services(10, "10.77.1.10")
    assert len(kvr) == 10
    assert [s["affinity"] for s in kvr[-3:]] == ["none", "client", "session"]


def test_bpf_cost_is_connect4_per_call_and_every_program_per_connect() -> None:
    from lab import bench_connect
    before = {"sock4_connect": (1000, 10), "sock_ops": (500, 30)}
    after = {"sock4_connect": (1000 + 600 * 100, 110), "sock_ops": (500 + 40_000, 330)}
    cost = bench_connect.bpf_cost(before, after, connects=100)
    assert cost.connect4_calls == 100
    assert cost.connect4_ns == 600
    assert cost.all_ns == 600 + 400
