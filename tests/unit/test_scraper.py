"""Scraper against real HTTP servers on 127.0.0.1 (aiohttp), one per engine: healthy,
slow, erroring, refusing, serving garbage; and the periodic loop."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import time
from collections.abc import AsyncIterator, Coroutine, Mapping
from typing import Any, TypeVar

import pytest
from aiohttp import web

from dataplane import scraper

T = TypeVar("T")

PAGE = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 1.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
"""


class Engine:
    """One fake engine: what /metrics and /health do is set per test (and can change)."""

    def __init__(self, metrics: str = "ok", health: str = "ok") -> None:
        self.metrics = metrics
        self.health = health
        self.release = asyncio.Event()  # frees "slow" handlers at teardown
        self.hits = 0

    async def _behave(self, mode: str, body: str) -> web.StreamResponse:
        self.hits += 1
        if mode == "slow":
            await self.release.wait()
        if mode == "500":
            return web.Response(status=500, text="engine exploded")
        if mode == "503":
            return web.Response(status=503)
        if mode == "garbage":
            return web.Response(text="<html><body>hello</body></html>")
        if mode == "nan":
            return web.Response(text=PAGE.replace("3.0", "NaN"))
        if mode == "huge":
            return web.Response(text="# " + "x" * 300_000 + "\n")
        if mode == "latin1":
            return web.Response(body=b"# caf\xe9\n")
        if mode == "redirect":
            raise web.HTTPFound("/elsewhere")
        return web.Response(text=body)

    async def handle_metrics(self, request: web.Request) -> web.StreamResponse:
        return await self._behave(self.metrics, PAGE)

    async def handle_health(self, request: web.Request) -> web.StreamResponse:
        return await self._behave(self.health, "")


def _free_port() -> int:
    # A port nobody listens on: bind, read it, close. Connecting then gets RST.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@contextlib.asynccontextmanager
async def serve(engines: Mapping[str, Engine]) -> AsyncIterator[list[scraper.EngineTarget]]:
    runners: list[web.AppRunner] = []
    targets = []
    try:
        for name, engine in engines.items():
            app = web.Application()
            app.router.add_get("/metrics", engine.handle_metrics)
            app.router.add_get("/health", engine.handle_health)
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            runners.append(runner)
            port = runner.addresses[0][1]
            targets.append(scraper.EngineTarget(name, f"http://127.0.0.1:{port}"))
        yield targets
    finally:
        for engine in engines.values():
            engine.release.set()
        for runner in runners:
            await runner.cleanup()


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


# -- one round ------------------------------------------------------------------------


def test_healthy_engines_report_load() -> None:
    async def main() -> dict[str, scraper.ScrapeResult]:
        async with serve({"a": Engine(), "b": Engine()}) as targets:
            return await scraper.scrape(targets, timeout=2.0)

    results = run(main())
    assert sorted(results) == ["a", "b"]
    for r in results.values():
        assert r.ok and r.error is None
        assert r.load is not None and (r.load.running, r.load.waiting) == (3.0, 1.0)
        assert 0 < r.latency < 2.0
        assert r.outcomes() == [(True, "scrape")]  # one success per round
        assert r.failure is None and r.progress is not None


def test_slow_engine_does_not_delay_the_others() -> None:
    # Generous numbers: the assertions must hold on a box whose two cores are shared with
    # a dozen other busy processes (a fresh request took 0.45 s there once).
    timeout = 1.0

    async def main() -> tuple[float, dict[str, scraper.ScrapeResult]]:
        engines = {"fast1": Engine(), "slow": Engine("slow", "slow"), "fast2": Engine()}
        async with serve(engines) as targets:
            start = time.monotonic()
            results = await scraper.scrape(targets, timeout=timeout)
            return time.monotonic() - start, results

    elapsed, results = run(main())
    # The round lasts about one timeout (the slow engine's), not the slow engine's delay.
    assert timeout <= elapsed < timeout + 1.0
    slow = results["slow"]
    assert not slow.metrics_ok and not slow.health_ok and slow.load is None
    assert slow.error == f"metrics: timeout after {timeout:g}s; health: timeout after {timeout:g}s"
    assert timeout - 0.05 <= slow.latency < timeout + 1.0
    for name in ("fast1", "fast2"):
        assert results[name].ok
        assert results[name].latency < timeout * 0.6  # not held back by the slow one
        assert results[name].latency < slow.latency


@pytest.mark.parametrize(
    ("metrics", "health", "metrics_ok", "health_ok", "reason", "page"),
    [
        ("500", "ok", False, True, "metrics: HTTP 500", None),
        ("ok", "503", True, False, "health: HTTP 503", None),
        ("garbage", "ok", False, True, "metrics: bad metrics: unparseable metrics text",
         "malformed"),
        ("nan", "ok", False, True, "metrics: bad metrics: vllm:num_requests_running",
         "malformed"),
        ("huge", "ok", False, True, "metrics: body larger than 100000 bytes", "oversized"),
        ("latin1", "ok", False, True, "metrics: body is not UTF-8", "malformed"),
        ("redirect", "ok", False, True, "metrics: HTTP 302", None),
        ("500", "503", False, False, "metrics: HTTP 500; health: HTTP 503", None),
    ],
)
def test_failures_yield_a_reason(
    metrics: str, health: str, metrics_ok: bool, health_ok: bool, reason: str,
    page: str | None,
) -> None:
    async def main() -> dict[str, scraper.ScrapeResult]:
        async with serve({"bad": Engine(metrics, health), "good": Engine()}) as targets:
            return await scraper.scrape(targets, timeout=2.0, max_bytes=100_000)

    results = run(main())
    bad = results["bad"]
    assert (bad.metrics_ok, bad.health_ok) == (metrics_ok, health_ok)
    assert not bad.ok
    assert bad.error is not None and bad.error.startswith(reason), bad.error
    assert bad.page == page  # the engine's own page is to blame (counted, logged)
    assert (bad.load is not None) == metrics_ok
    # One failure per round, its source what failed first.
    assert bad.outcomes() == [(False, "scrape" if health_ok else "health")]
    assert results["good"].ok and results["good"].page is None


def test_refused_port() -> None:
    port = _free_port()
    target = scraper.EngineTarget("gone", f"http://127.0.0.1:{port}")
    start = time.monotonic()
    results = run(scraper.scrape([target], timeout=2.0))
    gone = results["gone"]
    assert not gone.metrics_ok and not gone.health_ok
    assert gone.error is not None and gone.error.startswith("metrics: connect failed")
    assert "health: connect failed" in gone.error
    assert time.monotonic() - start < 1.0  # refused is immediate, not a timeout


def test_shared_client_is_reused_and_left_open() -> None:
    async def main() -> tuple[int, bool]:
        engine = Engine()
        async with serve({"a": engine}) as targets, scraper.make_client(1.0) as client:
            for _ in range(3):
                results = await scraper.scrape(targets, timeout=1.0, client=client)
                assert results["a"].ok
            return engine.hits, client.is_closed

    hits, closed = run(main())
    assert hits == 6 and not closed


def test_input_validation() -> None:
    with pytest.raises(ValueError, match="identity"):
        scraper.EngineTarget("", "http://127.0.0.1:1")
    with pytest.raises(ValueError, match="base_url"):
        scraper.EngineTarget("a", "ftp://127.0.0.1")
    with pytest.raises(ValueError, match="base_url"):
        scraper.EngineTarget("a", "not a url")
    with pytest.raises(ValueError, match="metrics_path"):
        scraper.EngineTarget("a", "http://h:1", metrics_path="metrics")
    t = scraper.EngineTarget("a", "http://h:1/")
    assert t.metrics_url == "http://h:1/metrics" and t.health_url == "http://h:1/health"
    with pytest.raises(ValueError, match="twice"):
        run(scraper.scrape([t, t], timeout=1.0))
    with pytest.raises(ValueError, match="timeout"):
        run(scraper.scrape([t], timeout=0))
    with pytest.raises(ValueError, match="interval"):
        scraper.Scraper([t], lambda r: None, interval=0)
    with pytest.raises(ValueError, match="timeout"):
        scraper.Scraper([t], lambda r: None, timeout=float("inf"))


def test_empty_round() -> None:
    assert run(scraper.scrape([], timeout=1.0)) == {}


# -- the loop -------------------------------------------------------------------------


def test_loop_calls_back_each_interval_and_stops_cleanly() -> None:
    async def main() -> None:
        a, b = Engine(), Engine()
        async with serve({"a": a, "b": b}) as targets:
            seen: list[Mapping[str, scraper.ScrapeResult]] = []
            current = list(targets)
            s = scraper.Scraper(lambda: current, seen.append, interval=0.05, timeout=0.5)
            task = s.start()
            with pytest.raises(RuntimeError, match="already running"):
                s.start()
            await asyncio.sleep(0.4)
            current = current[:1]  # discovery dropped engine b
            await asyncio.sleep(0.2)
            start = time.monotonic()
            await s.stop()
            assert time.monotonic() - start < 1.0  # woke from its sleep, did not wait
            assert task.done()
            rounds = s.rounds
            assert rounds == len(seen)
            # 0.6 s at 50 ms: about 12 rounds; a loaded box may run fewer, never more.
            assert 3 <= rounds <= 14
            assert all(r.ok for round_ in seen for r in round_.values())
            assert set(seen[0]) == {"a", "b"} and set(seen[-1]) == {"a"}
            await asyncio.sleep(0.15)
            assert len(seen) == rounds  # nothing after stop

    run(main())


def test_loop_survives_callback_errors_and_awaits_async_callbacks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        async with serve({"a": Engine()}) as targets:
            calls: list[int] = []

            async def callback(results: Mapping[str, scraper.ScrapeResult]) -> None:
                await asyncio.sleep(0)
                calls.append(len(results))
                if len(calls) == 1:
                    raise RuntimeError("bookkeeping bug")

            s = scraper.Scraper(targets, callback, interval=0.03)
            s.start()
            await asyncio.sleep(0.3)
            await s.stop()
            assert len(calls) >= 3 and set(calls) == {1}

    with caplog.at_level("ERROR", logger="dataplane.scraper"):
        run(main())
    assert "scrape round failed" in caplog.text and "bookkeeping bug" in caplog.text


def test_overrunning_rounds_skip_ticks_instead_of_bursting() -> None:
    async def main() -> None:
        engine = Engine("slow", "ok")
        async with serve({"slow": engine}) as targets:
            seen: list[float] = []
            s = scraper.Scraper(
                targets, lambda r: seen.append(time.monotonic()), interval=0.05, timeout=0.2
            )
            s.start()
            await asyncio.sleep(0.7)
            await s.stop()
            assert 1 <= len(seen) <= 4  # ~0.2 s per round, not 14 rounds at 50 ms
            assert s.skipped_ticks >= 2 * (len(seen) - 1)
            gaps = [b - a for a, b in itertools.pairwise(seen)]
            assert all(g >= 0.2 for g in gaps)

    run(main())


def test_stop_cancels_a_round_stuck_past_grace() -> None:
    async def main() -> None:
        async with serve({"a": Engine()}) as targets:
            stuck = asyncio.Event()

            async def callback(results: Mapping[str, scraper.ScrapeResult]) -> None:
                await stuck.wait()  # never set: a hung consumer

            s = scraper.Scraper(targets, callback, interval=0.05)
            task = s.start()
            await asyncio.sleep(0.2)
            start = time.monotonic()
            await s.stop(grace=0.1)
            assert time.monotonic() - start < 0.5
            assert task.cancelled()
            await s.stop()  # a second stop is harmless

    run(main())


@pytest.mark.parametrize("failure", ["5xx", "stalled"])
def test_a_verdict_fails_a_round_whose_probes_passed(failure: str) -> None:
    r = scraper.ScrapeResult("e", True, True, 0.01, None, None, failure=failure)
    assert not r.ok and r.outcomes() == [(False, failure)]
    assert scraper.ScrapeResult("e", True, True, 0.01, None, None).outcomes() == [
        (True, "scrape")]


def test_an_unproven_round_is_no_outcome_but_counts_as_answering() -> None:
    r = scraper.ScrapeResult("e", True, True, 0.01, None, None, unproven=True)
    assert r.ok and r.outcomes() == []
    # A probe that fails still fails.
    bad = scraper.ScrapeResult("e", True, False, 0.01, None, "health: x", unproven=True)
    assert bad.outcomes() == [(False, "health")]
