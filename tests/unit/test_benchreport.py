"""README's benchmark section is rendered from the committed results, never typed."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from lab import benchreport

pytestmark = pytest.mark.unit


def test_readme_sections_equal_what_the_committed_results_render() -> None:
    text = benchreport.README.read_text()
    for section, body in benchreport.sections().items():
        assert benchreport.extract(text, section) == body.strip("\n"), (
            f"README's {section!r} benchmark section is stale: run `make bench-report`")


def test_splice_replaces_only_the_body_and_refuses_missing_markers() -> None:
    begin, end = benchreport.markers("full")
    text = f"before\n{begin}\nold\n{end}\nafter\n"
    new = benchreport.splice(text, "full", "new body")
    assert new == f"before\n{begin}\nnew body\n{end}\nafter\n"
    assert benchreport.extract(new, "full") == "new body"
    with pytest.raises(ValueError, match="markers"):
        benchreport.splice("no markers here", "full", "x")
    with pytest.raises(ValueError, match="markers"):
        benchreport.extract(text + begin, "full")


def _doc(bench: str, rows: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"bench": bench, "command": f"python -m lab.bench --only {bench}",
            "date": "2026-12-08", "seconds": 12.0, "kernel": "6.1", "cpus": 2,
            "loadavg_at_start": 1.5, **extra, "rows": rows}


CONNECT = _doc("connect", [
    {"bench": "load 10000 services x 10, kvroute apply", "services": 10000, "value_s": 1.0},
    {"bench": "load 10000 services x 10, iptables-nft", "services": 10000, "value_s": 12.0},
    {"bench": "connect direct to the pod, 10000 services", "variant": "direct",
     "services": 10000, "value_us": 11.0, "p99_us": 20.0, "rate_per_s": 60000},
    {"bench": "connect via VIP, 10000 services", "variant": "kvr-none", "services": 10000,
     "value_us": 12.0, "baseline_us": 11.0, "ratio": 1.091, "ratio_iqr": [1.0, 1.2],
     "p99_ratio": 1.1, "rate_ratio": 0.9, "bpf_connect4_ns": 600,
     "bpf_all_ns_per_connect": 1500, "target_ratio": 1.05},
    {"bench": "connect kube-proxy iptables (iptables-nft), 10000 services",
     "variant": "iptables-nft", "services": 10000, "value_us": 170.0, "baseline_us": 11.0,
     "ratio": 15.45, "p99_ratio": 11.0, "rate_ratio": 0.09},
    {"bench": "connect kube-proxy nftables, 10000 services", "variant": "nftables",
     "services": 10000, "unavailable": "nft not installed"},
], rounds=40, per_round=2000, notes=["a note"])


def test_connect_table_shows_ratios_to_direct_and_loads_to_kvroute() -> None:
    text = "\n".join(benchreport.render_connect(CONNECT))
    assert "| kvroute, affinity none | 1.09 / 1.10 / 0.90 | 1.00 s (1.00x) |" in text
    assert "| kube-proxy iptables (iptables-nft) | 15.4 / 11.0 / 0.09 | 12.00 s (12.0x) |" \
        in text
    assert "not run: nft not installed" in text
    assert "1.09x direct at p50, quartiles 1.0-1.2 (target <= 1.05x)" in text
    assert "`python -m lab.bench --only connect`, 2026-12-08" in text
    assert "Note: a note" in text


def test_a_missing_result_says_how_to_make_it() -> None:
    text = benchreport.render({"connect": CONNECT})
    assert "Not run yet: `python -m lab.bench --only maglev`." in text
    assert "kvroute, affinity none" in text


def test_unit_costs_fit_messages_and_entries_and_the_fleet_estimate_uses_them() -> None:
    # CPU over idle built from a = 40 us a message, b = 1 us an entry (1,000 agents)
    # (the agents received every change: entries are read from the bytes they counted)
    def row(msgs: float, changes: float) -> dict[str, Any]:
        cpu = 0.01 + 1000 * (msgs * 40e-6 + changes * 1e-6)
        return {"changes_per_s": changes, "messages_per_agent_s": msgs,
                "controller_cpu": cpu, "reports_per_s": msgs, "engines_per_report":
                changes // msgs, "bytes_per_agent_s": msgs * 20 + changes * 30}
    rows = [{"changes_per_s": 0, "controller_cpu": 0.01, "messages_per_agent_s": 0,
             "bytes_per_agent_s": 0}, row(10, 10), row(10, 80), row(5, 320)]
    doc = _doc("fanout", rows, agents=1000, message_overhead_bytes=20, entry_bytes=30)
    costs = benchreport.unit_costs(doc)
    assert costs is not None
    a, b, entry_bytes = costs
    assert a == pytest.approx(40e-6) and b == pytest.approx(1e-6)
    assert entry_bytes == pytest.approx(30)
    text = benchreport.fleet_estimate(doc)
    assert text is not None
    # today: 1,000 reports/s x 1,000 streams x 40 us + 8,000 changes x 1,000 x 1 us = 48
    assert "40.0 us a stream message plus 1.00 us per load entry" in text
    assert "an entry is 30 bytes on the wire" in text
    assert "1,000,000 stream messages/s, 48 cores" in text
    # batched: 10,000 messages x 40 us + 8 M entries x 1 us = 8.4 cores
    assert "8.4 cores" in text
    # 30 bytes x 8,000 changes a second to each agent
    assert "240 KB/s (240 MB/s" in text
    assert benchreport.fleet_estimate(_doc("fanout", rows[:2], agents=1000,
                                           message_overhead_bytes=20, entry_bytes=30)) is None


def test_quick_table_takes_the_headline_of_each_result() -> None:
    apply_ = _doc("apply", [{"bench": "full apply 1000 x 10, none, M=1021", "value_s": 0.1,
                             "decode_validate_s": 0.04, "maglev_s": 0.0, "write_s": 0.02,
                             "target_s": 0.35, "ratio_to_target": 0.29}])
    text = benchreport.render_quick({"connect": CONNECT, "apply": apply_})
    assert "| connect p50, kvroute, affinity none, 10,000 services | 1.09x direct " \
           "(12.0 vs 11.0 us) | 2026-12-08 |" in text
    assert "0.29x target" in text
    changed = copy.deepcopy(CONNECT)
    changed["rows"][3]["ratio"] = 2.0
    assert benchreport.render_quick({"connect": changed}) != \
        benchreport.render_quick({"connect": CONNECT})


def test_failover_table_puts_the_models_beside_the_measured_row() -> None:
    from lab import bench_failover as bf
    kvr = bf.summarise("kvroute", [0.05, 0.1, 0.2, 5.0], -2, 10, False, "measured here",
                       engines=4, rate_per_s=200.0)
    doc = _doc("failover", [kvr, bf.kube_proxy_model(200.0, 4), bf.envoy_model(200.0, 4)])
    text = "\n".join(benchreport.render_failover(doc))
    assert "| kvroute | measured | 3 | 1.00x | 200.0 ms | 1 in 10 s | measured here |" in text
    assert "| kube-proxy | modelled | 1,300 | 433x | 26.00 s | 0 in 40 s |" in text
    assert "| Envoy outlier detection | modelled | 5 | 1.67x | 100.0 ms | 5 in 40 s |" in text
    assert "Not a clean run" not in text
    kvr.update(failed_before_death=7, attempts=1400)
    assert "**Not a clean run**: 7 of 1,400 connects failed before the engine died" in \
        "\n".join(benchreport.render_failover(doc))


def _llm_row(policy: str, p50: float, hit: float, **extra: Any) -> dict[str, Any]:
    return {"policy": policy, "requests": 40, "ok": 40, "failed": 0,
            "ttft_ms": {"p50": p50, "p99": 4 * p50}, "tokens_per_s": 20.0,
            "prefix_cache_hit_ratio": hit, "imbalance_running": 1.5,
            "vs_random": {"ttft_p50_x": round(p50 / 500, 3), "ttft_p99_x": round(p50 / 500, 3),
                          "tokens_per_s_x": 1.0, "prefix_hit_points": round((hit - 0.3) * 100, 1)},
            **extra}


# What bench_llm.run returns (and, run on its own, writes): the parts at the top.
LLM_RESULT: dict[str, Any] = {
    "command": "python -m lab.bench --only llm", "quick": False, "kernel": "6.1",
    "sim": {"engines": 4, "engine": "sim", "rounds": 2, "started": "2026-12-07T23:50:00Z",
            "seconds": 300.0,
            "workload": {"users": 16, "sessions": 32, "turns": 5, "max_tokens": 48},
            "hop": {"rounds": 300, "request": "new connection + GET /v1/models",
                    "direct": {"p50_us": 500.0, "p99_us": 900.0, "extra_p50_us": 0.0},
                    "kvroute new session": {"p50_us": 510.0, "p99_us": 950.0,
                                            "extra_p50_us": 10.0},
                    "kvroute live session": {"p50_us": 505.0, "p99_us": 940.0,
                                             "extra_p50_us": 5.0},
                    "haproxy": {"p50_us": 600.0, "p99_us": 1200.0, "extra_p50_us": 100.0,
                                "cpu_us_per_request": 150.0}},
            "rows": [_llm_row("random", 500, 0.3), _llm_row("kvroute", 400, 0.8),
                     _llm_row("haproxy", 450, 0.8, proxy_cpu_us_per_request=1500.0)]},
    "vllm": {"skipped": "no vLLM venv at /x"},
}


def test_llm_result_rewrapped_as_a_results_file_keeps_every_number() -> None:
    from lab import bench_llm
    doc = bench_llm.as_results_doc(LLM_RESULT, "a test's own result")
    assert doc["detail"] == LLM_RESULT and doc["rows"] == bench_llm.rows(LLM_RESULT)
    assert (doc["date"], doc["started"], doc["seconds"]) == ("2026-12-07",
                                                             "2026-12-07T23:50:00Z", 300.0)
    # never recorded by the old writer: not made up
    assert doc["cpus"] is None and doc["loadavg_at_start"] is None
    assert benchreport.llm_parts(doc) == benchreport.llm_parts(LLM_RESULT)
    with pytest.raises(ValueError, match="no measured part"):
        bench_llm.as_results_doc({"command": "x", "kernel": "6.1",
                                  "vllm": {"skipped": "no"}}, "x")


def test_llm_table_shows_each_router_against_random_and_the_hop() -> None:
    from lab import bench_llm
    doc = bench_llm.as_results_doc(LLM_RESULT, "a test's own result")
    text = "\n".join(benchreport.render_llm(doc))
    assert "| random | 500 ms (1.00x) | 2,000 ms (1.00x) | 20.0 (1.00x) | 30.0% (+0.0 points) " \
           "| 1.5 | 0/40 |" in text
    assert "| kvroute | 400 ms (0.80x) | 1,600 ms (0.80x) | 20.0 (1.00x) | 80.0% (+50.0 points)" \
        in text
    assert "| direct | 500 us | 900 us | baseline | - |" in text
    assert "| haproxy | 600 us | 1,200 us | +100 us | 150 us (during the workload: 1,500 us) |" \
        in text
    assert "**real vLLM CPU engines**: not run: no vLLM venv at /x" in text
    assert "CPUs not recorded, load average not recorded. Converted: a test's own result." \
        in text
    # lab.bench's own file records both
    measured = {**doc, "cpus": 2, "loadavg_at_start": 1.5}
    measured.pop("converted_from")
    assert "2 CPUs, load average 1.5 at the start. The same" in \
        "\n".join(benchreport.render_llm(measured))


def test_dns_table_shows_latency_and_rate_against_direct_and_kernel_time() -> None:
    rows = [{"bench": f"dns {fam} {mode}", "family": fam, "mode": mode, "vip_kernel_ns": 450.0,
             "direct_kernel_ns": 140.0, "direct_qps": 50000, "vip_qps": 45000,
             "qps_ratio": 0.9, "direct_p50_us": 10.0, "vip_p50_us": 11.0, "p50_ratio": 1.1}
            for fam in ("v4", "v6") for mode in ("reuse", "new")]
    doc = _doc("dns", rows, queries=20000, rounds_per_target=3, kernel_stats=True,
               dig={"10.96.53.10": {"answers": ["10.0.0.1"], "replied_from": ["10.96.53.10"]}})
    text = "\n".join(benchreport.render_dns(doc))
    assert "| v6, a new socket per query | 1.10x (11.0 vs 10.0 us) | 0.90x (45,000 vs 50,000) " \
           "| 450 ns | 140 ns |" in text
    assert "`10.96.53.10` answered by 10.0.0.1, replies from 10.96.53.10" in text
    assert "no in-kernel times" not in text
    assert "no in-kernel times" in "\n".join(benchreport.render_dns({**doc,
                                                                      "kernel_stats": False}))


def test_quick_table_has_the_llm_and_dns_headlines() -> None:
    from lab import bench_llm
    dns = _doc("dns", [{"bench": "dns v4 reuse", "family": "v4", "mode": "reuse",
                        "vip_p50_us": 11.0, "direct_p50_us": 10.0, "p50_ratio": 1.1}])
    text = benchreport.render_quick({"llm": bench_llm.as_results_doc(LLM_RESULT, "test"),
                                     "dns": dns})
    assert "| LLM workload, simulated engines, kvroute vs random | prefix-cache hit 80.0% " \
           "(+50.0 points), TTFT p50 0.80x | 2026-12-07 |" in text
    assert "| DNS p50 through the UDP VIP, v4, one socket for every query | 1.10x direct " \
           "(11.0 vs 10.0 us) | 2026-12-08 |" in text
