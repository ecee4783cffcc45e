"""The agent's engine watcher: scrapes the engines on its own node, writes their
load straight into the kernel's load map, and keeps the results for the report
to the controller. Scraping scales with nodes; the kernel sees a load change
one scrape interval after the engine reports it.

It also keeps each engine's previous progress reading and has :func:`dataplane.health.judge`
rule on the interval (5xx, stalled generation); the verdict rides on the engine's
:class:`dataplane.scraper.ScrapeResult`. A round whose verdict flipped, and the first
:data:`URGENT_ROUNDS` failed rounds in a row of an engine, are reported to the controller
at once rather than at the report interval: the controller's breaker counts failed rounds,
and only rounds it hears of count."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence

import httpx

from dataplane import apply, health, model, reports, scraper

log = logging.getLogger("kvroute.engines")

Targets = Callable[[], Sequence[model.EngineRef]]

# Failed rounds in a row reported at once (enough for any sane breaker threshold); after
# that the report interval is enough to keep the breaker open and the engine known bad.
URGENT_ROUNDS = 8
# The floor on the scrape timeout. A busy engine answering /health in 60 ms is alive, and
# timeouts of 40 ms made busy simulators flap; a hung engine, though, must fail well inside
# a second, and the breaker wants several failed rounds in a row, so one slow answer does
# not open it.
MIN_TIMEOUT = 0.25


class EngineWatcher:
    def __init__(self, applier: apply.Applier, targets: Targets, node: str | None,
                 interval: float = 0.25, timeout: float | None = None,
                 on_round: Callable[[float, int, bool], None] | None = None,
                 judge: health.JudgeConfig | None = None) -> None:
        self.applier = applier
        self.targets = targets
        self.node = node
        self.interval = interval
        # A dead engine fails at once (refused); a hung one at the timeout, and a slow
        # round skips ticks instead of piling up (see MIN_TIMEOUT).
        self.timeout = timeout if timeout is not None else max(0.8 * interval, MIN_TIMEOUT)
        self.on_round = on_round
        self.judge = judge if judge is not None else health.JudgeConfig()
        self.results: dict[str, scraper.ScrapeResult] = {}
        self._readings: dict[str, health.Reading] = {}  # engine -> its previous progress
        self._failed_rounds: dict[str, int] = {}  # engine -> failed rounds in a row
        self._trips: dict[str, int] = {}
        self._lock = threading.Lock()
        # (engine, "oversized" | "malformed") -> scrapes refused for the page itself
        self.bad_pages: dict[tuple[str, str], int] = {}

    def mine(self) -> list[scraper.EngineTarget]:
        out = []
        for ref in self.targets():
            if ref.node is not None and self.node is not None and ref.node != self.node:
                continue
            metrics, health = httpx.URL(ref.metrics_url), httpx.URL(ref.health_url)
            out.append(scraper.EngineTarget(
                identity=ref.identity, base_url=f"{metrics.scheme}://{metrics.netloc.decode()}",
                metrics_path=metrics.raw_path.decode(), health_path=health.raw_path.decode()))
        return out

    def observations(self) -> reports.Observations:
        """What the agent reports: its scrapes, and the kernel's counters for every
        engine (this node's connects reach engines on other nodes too)."""
        with self._lock:
            results = tuple(self.results.values())
        counters = self.applier.counters({ref.identity for ref in self.targets()})
        return reports.Observations(
            engines=results,
            counters=tuple(reports.BackendCounters(ident, *values[:6])
                           for ident, values in sorted(counters.items())))

    async def _round(self, client: httpx.AsyncClient) -> tuple[int, bool]:
        """Scrape this node's engines, write their loads; returns (entries written,
        whether the controller must hear of it now rather than at the report interval:
        a load moved, an engine stopped or started answering, or the kernel tripped one)."""
        written, news = 0, False
        targets = self.mine()
        if targets:
            results = self._judged(await scraper.scrape(targets, self.timeout, client=client),
                                   time.monotonic())
            with self._lock:
                before, self.results = self.results, results
            for ident, r in results.items():
                if r.page is None:
                    continue
                self.bad_pages[(ident, r.page)] = self.bad_pages.get((ident, r.page), 0) + 1
                was = before.get(ident)
                if was is None or was.page != r.page:  # once per episode, not per scrape
                    log.warning("engine %s serves a %s metrics page (%s); its scrapes fail "
                                "until it is fixed", ident, r.page, r.error)
            loads = {ident: r.load.units for ident, r in results.items()
                     if r.ok and r.load is not None}
            try:
                written = self.applier.set_loads(loads)
            except apply.ApplyError as exc:  # the next round writes them again
                log.error("could not write engine loads: %s", exc)
            news = bool(written) or any(ident not in before or before[ident].ok != r.ok
                                        for ident, r in results.items())
            for ident, r in results.items():
                run = 0 if r.ok else self._failed_rounds.get(ident, 0) + 1
                self._failed_rounds[ident] = run
                news = news or 0 < run <= URGENT_ROUNDS
            self._failed_rounds = {i: n for i, n in self._failed_rounds.items() if i in results}
        engines = {ref.identity for ref in self.targets()}
        if engines:
            trips = {i: c[5] for i, c in self.applier.counters(engines).items()}
            news = news or any(n > self._trips.get(i, 0) for i, n in trips.items())
            self._trips = trips
        return written, news

    def _judged(self, results: dict[str, scraper.ScrapeResult],
                now: float) -> dict[str, scraper.ScrapeResult]:
        """The round's results with each engine's verdict since its previous reading. An
        engine whose page did not parse keeps its previous reading (the next good page is
        judged against it), one that left the targets loses it."""
        out: dict[str, scraper.ScrapeResult] = {}
        for ident, r in results.items():
            if r.progress is None:
                out[ident] = r
                continue
            failure, reading = health.judge(self._readings.get(ident), r.progress, now,
                                            self.judge)
            self._readings[ident] = reading
            if failure is None and health.unproven(reading):
                r = dataclasses.replace(r, unproven=True)
            if failure is not None:
                why = f"engine: {failure}"
                r = dataclasses.replace(r, failure=failure,
                                        error=f"{r.error}; {why}" if r.error else why)
            out[ident] = r
        self._readings = {i: v for i, v in self._readings.items() if i in results}
        return out

    async def run(self) -> None:
        """Scrape every interval until cancelled (a task on the agent's loop)."""
        client = scraper.make_client(self.timeout)
        try:
            next_at = time.monotonic()
            while True:
                started = time.monotonic()
                written, news = await self._round(client)
                if self.on_round:
                    self.on_round(time.monotonic() - started, written, news)
                next_at += self.interval
                delay = next_at - time.monotonic()
                if delay < 0:  # overran: skip the missed ticks, no burst
                    next_at = time.monotonic()
                    delay = 0
                await asyncio.sleep(delay)
        finally:
            await client.aclose()
