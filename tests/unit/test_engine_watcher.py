"""dataplane.engines.EngineWatcher against simulators (no kernel: a fake applier): the
verdict on each engine's counters rides on its ScrapeResult, and failed rounds are news."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Mapping
from typing import Any, cast

import httpx
import pytest

from dataplane import apply, engines, health, model, scraper
from lab.engine_sim import model as sim_model
from lab.engine_sim import server

FAST = sim_model.EngineConfig(step_base_s=0.001, prefill_token_s=0.000002,
                              decode_seq_s=0.00001, context_token_s=0.0, seed=5)
BODY = {"model": "kvroute/tiny-sim", "prompt": "x", "max_tokens": 2}


class FakeApplier:
    def set_loads(self, loads: Mapping[str, int]) -> int:
        return 0

    def counters(self, identities: set[str] | None = None) -> dict[str, list[int]]:
        return {}


@pytest.fixture
def sim() -> Iterator[str]:
    with server.running_in_thread(server.ServerConfig(engine_id="w"), FAST) as (url, _):
        yield url


def watcher(url: str, **kw: Any) -> engines.EngineWatcher:
    # The identity names a pod (TEST-NET-1: an address the model takes, routed nowhere);
    # the URLs reach the simulator on loopback.
    ref = model.EngineRef("192.0.2.1:1/tcp", f"{url}/metrics", f"{url}/health")
    return engines.EngineWatcher(cast(apply.Applier, FakeApplier()), lambda: [ref], None,
                                 interval=0.05, **kw)


def rounds(w: engines.EngineWatcher, n: int, between: Any = None) -> list[tuple[bool, str | None]]:
    """n rounds; (news, failure) of each."""
    out = []

    async def main() -> None:
        async with scraper.make_client(w.timeout) as client:
            for _ in range(n):
                if between is not None:
                    await asyncio.to_thread(between)
                _, news = await w._round(client)
                (r,) = w.results.values()
                out.append((news, r.failure))
    asyncio.run(main())
    return out


def fault(url: str, **kw: Any) -> None:
    httpx.post(f"{url}/admin/faults", json=kw, timeout=5).raise_for_status()


def test_503s_are_judged_and_reported_at_once(sim: str) -> None:
    w = watcher(sim)
    assert rounds(w, 1) == [(True, None)]  # first sight is news
    fault(sim, error_rate=1.0, error_code=503)
    got = rounds(w, 3, between=lambda: httpx.post(f"{sim}/v1/completions", json=BODY))
    assert [f for _, f in got] == ["5xx"] * 3
    assert all(news for news, _ in got)  # the flip, then the run of failed rounds
    (r,) = w.results.values()
    # The simulator's fault answers /health with 503 too: health is what failed first.
    assert not r.ok and r.failure == "5xx" and r.outcomes() == [(False, "health")]
    fault(sim, error_rate=0.0)
    got = rounds(w, 2, between=lambda: httpx.post(f"{sim}/v1/completions", json=BODY))
    assert got == [(True, None), (False, None)]  # the flip back is news, then quiet


def test_a_stalled_engine_fails_after_the_window(sim: str) -> None:
    import threading
    w = watcher(sim, judge=health.JudgeConfig(stall_window=0.3))
    assert rounds(w, 1) == [(True, None)]
    fault(sim, stall=True)
    t = threading.Thread(target=lambda: httpx.post(f"{sim}/v1/completions", json=BODY,
                                                   timeout=10), daemon=True)
    t.start()
    try:
        started = time.monotonic()
        verdicts = [f for _, f in rounds(w, 12, between=lambda: time.sleep(0.05))]
        assert verdicts[-1] == "stalled", verdicts
        assert verdicts[0] is None  # not before the window
        assert time.monotonic() - started > 0.3
    finally:
        fault(sim, stall=False)
        t.join(10)


def test_a_hung_health_check_fails_within_the_timeout(sim: str) -> None:
    w = watcher(sim)
    assert w.timeout == engines.MIN_TIMEOUT
    fault(sim, hang=True)
    try:
        started = time.monotonic()
        ((news, _),) = rounds(w, 1)
        took = time.monotonic() - started
        (r,) = w.results.values()
        assert news and not r.health_ok and r.outcomes() == [(False, "health")]
        assert took < engines.MIN_TIMEOUT + 0.2
    finally:
        fault(sim, hang=False)


def test_urgent_reports_stop_after_a_bounded_run(sim: str) -> None:
    w = watcher(sim)
    rounds(w, 1)
    fault(sim, error_rate=1.0, error_code=503)
    got = rounds(w, engines.URGENT_ROUNDS + 3,
                 between=lambda: httpx.post(f"{sim}/v1/completions", json=BODY))
    assert [n for n, _ in got] == [True] * engines.URGENT_ROUNDS + [False] * 3
    fault(sim, error_rate=0.0)


def test_5xx_with_a_passing_health_check_fail_on_the_verdict_alone(sim: str) -> None:
    w = watcher(sim)
    rounds(w, 1)
    fault(sim, error_rate=1.0, error_code=503, spare_health=True)
    got = rounds(w, 2, between=lambda: httpx.post(f"{sim}/v1/completions", json=BODY))
    assert [f for _, f in got] == ["5xx", "5xx"]
    (r,) = w.results.values()
    assert r.health_ok and r.metrics_ok and r.outcomes() == [(False, "5xx")]
    # Clients gone (the breaker took them): quiet rounds prove nothing, no outcome...
    got = rounds(w, 2)
    (r,) = w.results.values()
    assert [f for _, f in got] == [None, None] and r.unproven and r.outcomes() == []
    # ...until a request is served again.
    fault(sim, error_rate=0.0, spare_health=False)
    rounds(w, 1, between=lambda: httpx.post(f"{sim}/v1/completions", json=BODY))
    (r,) = w.results.values()
    assert not r.unproven and r.outcomes() == [(True, "scrape")]
