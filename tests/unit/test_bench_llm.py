"""The pure parts of the LLM bench and the demo: HAProxy's configuration, CPU time from
/proc, the bench's table rows, the demo's reading of its clients' progress."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from lab import bench_llm, demo


def test_haproxy_hashes_the_session_header_on_a_consistent_ring() -> None:
    text = bench_llm.haproxy_config("10.0.0.9", 8000, {"gpu0": "10.0.0.10:8000",
                                                         "gpu1": "10.0.0.11:8000"})
    lines = [line.strip() for line in text.splitlines()]
    assert "balance hdr(X-Session-ID)" in lines
    assert "hash-type consistent" in lines
    assert "bind 10.0.0.9:8000" in lines
    assert "server gpu0 10.0.0.10:8000" in lines and "server gpu1 10.0.0.11:8000" in lines
    assert "option http-no-delay" in lines  # streamed tokens are not held back


@pytest.mark.skipif(shutil.which("haproxy") is None,
                    reason="haproxy is not installed (make bench installs it)")
def test_haproxy_accepts_the_configuration(tmp_path: Path) -> None:
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(bench_llm.haproxy_config("127.0.0.1", 18000, {"a": "127.0.0.1:18001"}))
    check = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_cpu_seconds_counts_this_process_working() -> None:
    before = bench_llm.cpu_seconds(os.getpid())
    end = time.process_time() + 0.2
    while time.process_time() < end:
        pass
    assert bench_llm.cpu_seconds(os.getpid()) - before >= 0.15


def _row(policy: str, p50: float) -> dict[str, object]:
    return {"policy": policy, "ttft_ms": {"p50": p50, "p99": 2 * p50}, "tokens_per_s": 10.0,
            "prefix_cache_hit_ratio": 0.5, "imbalance_running": 1.2, "failed": 0,
            "vs_random": {"ttft_p50_x": p50 / 100}}


def test_rows_flatten_each_kind_and_say_why_one_is_missing() -> None:
    hop = {k: {"extra_p50_us": 5.0} for k in ("kvroute new session", "kvroute live session")}
    hop["haproxy"] = {"extra_p50_us": 90.0, "cpu_us_per_request": 40.0}
    result = {"sim": {"engines": 4, "rows": [_row("random", 100), _row("kvroute", 50)],
                      "hop": hop},
              "vllm": {"skipped": "no vLLM venv at /x"}}
    rows = bench_llm.rows(result)
    assert [r["bench"] for r in rows] == [
        "llm sim x4, random", "llm sim x4, kvroute", "llm sim, hop: new connection + small request",
        "llm workload, vllm"]
    assert rows[1]["ttft_p50_x_random"] == 0.5
    assert rows[2]["haproxy_extra_p50_us"] == 90.0
    assert rows[3]["skipped"] == "no vLLM venv at /x"


def test_demo_kills_a_third_in_and_revives_before_the_end() -> None:
    p = demo.plan("sim", 60)
    assert (p.engines, p.kill_at, p.revive_at) == (4, 20, 35)
    assert p.workload.seconds == 60
    assert demo.plan("vllm", 60).engines < 4  # two shared cores


def test_demo_reads_only_whole_progress_lines(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    first = json.dumps({"t": 1.0, "ok": True, "engine": "e", "ttft": 0.1, "tokens": 4})
    path.write_text(first + "\n" + first[:10])  # a client is writing the second line
    turns = demo.Turns([path, tmp_path / "not-yet.jsonl"])
    turns.poll()
    assert len(turns.events) == 1
    with path.open("a") as f:
        f.write(first[10:] + "\n")
    turns.poll()
    assert len(turns.events) == 2 and turns.recent(now=5.0, window=10) == turns.events
    assert turns.recent(now=20.0, window=10) == []


def test_baseline_services_are_a_file_the_controller_accepts(tmp_path: Path) -> None:
    """The bench's extra VIPs on the fleet's endpoints: the plain one drops every LLM
    option (random per connection, as kube-proxy), the least-loaded one keeps them."""
    import ipaddress

    import yaml

    from controller.discovery import static
    from lab import fleet, netns

    fl = fleet.Fleet(engines=0, extra_services=bench_llm.BASELINE_SERVICES)
    shutil.rmtree(fl.workdir)  # never brought up: only its services file is written
    fl.static = tmp_path / "services.yaml"
    fl.nodes = [fleet.Node("node0", None, tmp_path, tmp_path / "ready")]  # type: ignore[arg-type]
    for i in range(2):
        fl.engines[f"gpu{i}"] = netns.Pod(f"gpu{i}", f"ns{i}",
                                          ipaddress.IPv4Address(f"10.0.0.{10 + i}"), f"v{i}")
    fl.write_services()
    raw = {s["name"]: s for s in yaml.safe_load(fl.static.read_text())["services"]}
    assert set(raw) == {"llm", "llm-random", "llm-least"}
    assert not {"engine", "epsilon", "breaker", "metrics-port"} & set(raw["llm-random"])
    assert raw["llm-least"]["engine"] == "vllm" and raw["llm-least"]["epsilon"] == 0.0
    specs = {s.name: s for s in static.parse(fl.static.read_text())}
    assert str(specs["llm-random"].vip) == bench_llm.RANDOM_VIP
    assert specs["llm-random"].affinity == "none" and not specs["llm-random"].llm
    assert specs["llm-least"].llm and specs["llm-least"].epsilon == 0.0
    assert all(len(s.endpoints) == 2 for s in specs.values())
