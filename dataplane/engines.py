"""The agent's engine watcher: scrapes the engines on its own node, writes their
load straight into the kernel's load map, and keeps the results for the report
to the controller. Scraping scales with nodes; the kernel sees a load change
one scrape interval after the engine reports it."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence

import httpx

from controller import policy, scraper, snapshot
from dataplane import apply

log = logging.getLogger("kvroute.engines")

Targets = Callable[[], Sequence[snapshot.EngineRef]]


class EngineWatcher:
    def __init__(self, applier: apply.Applier, targets: Targets, node: str | None,
                 interval: float = 0.25, timeout: float | None = None,
                 on_round: Callable[[float, int], None] | None = None) -> None:
        self.applier = applier
        self.targets = targets
        self.node = node
        self.interval = interval
        self.timeout = timeout if timeout is not None else 0.8 * interval
        self.on_round = on_round
        self.results: dict[str, scraper.ScrapeResult] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

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

    def observations(self) -> snapshot.Observations:
        """What the agent reports: its scrapes and the kernel's counters for them."""
        with self._lock:
            results = tuple(self.results.values())
        counters = self.applier.counters({r.identity for r in results} or None)
        return snapshot.Observations(
            engines=results,
            counters=tuple(snapshot.BackendCounters(ident, *values[:6])
                           for ident, values in sorted(counters.items())))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="kvroute-engines", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(10)

    def _main(self) -> None:
        asyncio.run(self._loop())

    async def _loop(self) -> None:
        client = scraper.make_client(self.timeout)
        try:
            next_at = time.monotonic()
            while not self._stop.is_set():
                started = time.monotonic()
                targets = self.mine()
                if targets:
                    results = await scraper.scrape(targets, self.timeout, client=client)
                    with self._lock:
                        self.results = results
                    loads = {ident: policy.load_units(r.load) for ident, r in results.items()
                             if r.ok and r.load is not None}
                    try:
                        written = self.applier.set_loads(loads)
                    except OSError as exc:
                        log.error("could not write engine loads: %s", exc)
                        written = 0
                    if self.on_round:
                        self.on_round(time.monotonic() - started, written)
                next_at += self.interval
                delay = next_at - time.monotonic()
                if delay < 0:  # overran: skip the missed ticks, no burst
                    next_at = time.monotonic()
                    delay = 0
                await asyncio.sleep(delay)
        finally:
            await client.aclose()
