"""The LLM workload end to end: the bench's policies on one lab, and the demo's story
in a short mode (both on simulated engines)."""

from __future__ import annotations

import pytest

from lab import bench_llm, chatload, demo, fleet


@pytest.fixture(autouse=True)
def _root() -> None:
    reason = fleet.env_ok()
    if reason:
        pytest.skip(reason)


def test_policies_route_the_same_workload_as_they_promise() -> None:
    wl = chatload.Workload(users=4, sessions=8, turns=4, first_words=150, turn_words=15,
                           max_tokens=8, think_time=0.05)
    result = bench_llm.run_kind("sim", True, lambda line: None, workload=(4, wl),
                                hop_rounds=30)
    rows = {r["policy"]: r for r in result["rows"]}
    assert set(rows) == set(bench_llm.POLICIES)
    for policy, row in rows.items():
        assert row["failed"] == 0 and row["requests"] == 32, (policy, row)
    # Sticky by design: kvroute's session affinity and HAProxy's header hash.
    assert rows["kvroute"]["turns_on_previous_engine"] == 1.0
    assert rows["haproxy"]["turns_on_previous_engine"] == 1.0
    # Per connection: a 4-engine random pick keeps the engine about a quarter of the time.
    assert rows["random"]["turns_on_previous_engine"] < 0.7
    assert rows["least-loaded"]["turns_on_previous_engine"] < 1.0
    assert rows["kvroute"]["prefix_cache_hit_ratio"] > rows["random"]["prefix_cache_hit_ratio"]
    assert rows["kvroute"]["vs_random"]["prefix_hit_points"] > 0
    assert rows["haproxy"]["proxy_cpu_s"] > 0
    hop = result["hop"]
    assert {"direct", "kvroute new session", "kvroute live session", "haproxy"} <= set(hop)
    assert hop["haproxy"]["cpu_us_per_request"] > 0


def test_demo_story_in_a_short_mode() -> None:
    result = demo.story("sim", seconds=12)
    assert all(result["checks"].values()), result["checks"]
    kv, rnd = result["rows"]
    assert (kv["policy"], rnd["policy"]) == ("kvroute", "random")
    # 16 users for 12 s at ~2 s a turn (simulators at a 70B model's pace): enough turns
    # that the ratios below mean something, on a busy machine too.
    assert kv["ok"] > 20 and rnd["ok"] > 20
    # A session leaves its engine only when the engine dies.
    assert kv["turns_on_previous_engine"] >= 0.9
    assert rnd["turns_on_previous_engine"] <= 0.6
