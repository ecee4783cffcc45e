"""Concurrent scrapes of engines' ``/metrics`` and ``/health`` (the I/O edge of load).

:func:`scrape` runs one round: every engine at once, both endpoints at once, each engine
bounded by the same per-engine deadline, so one slow or dead engine costs the round at
most ``timeout`` and never delays the others' results. Failures do not raise; they come
back as a :class:`ScrapeResult` with ``metrics_ok``/``health_ok`` false and a short
reason, ready for the breaker (:meth:`ScrapeResult.outcomes`). The caller keeps the
previous load when ``load`` is None.

:class:`Scraper` repeats rounds at a fixed rate (default every 250 ms) and hands each
round's results to a callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence

import httpx

from dataplane import enginemetrics

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 0.25
# What one scrape may cost: an engine pod sets its own load through its page, so a page
# is input from another tenant. vLLM 0.32's page is 53 KB (tests/data); 512 KiB, ten
# times that, parses in ~80 ms here, while a valid 4 MiB page cost more than a 250 ms
# scrape interval of CPU (an agent at 97 % of a core). Bigger pages fail the scrape.
MAX_BODY_BYTES = 512 * 1024
_HEALTH_MAX_BYTES = 64 * 1024


@dataclasses.dataclass(frozen=True)
class EngineTarget:
    identity: str  # the backend identity policy and breakers use
    base_url: str  # e.g. "http://10.0.1.7:8000"
    metrics_path: str = "/metrics"
    health_path: str = "/health"

    def __post_init__(self) -> None:
        if not self.identity:
            raise ValueError("EngineTarget.identity must not be empty")
        try:
            url = httpx.URL(self.base_url)
        except (httpx.InvalidURL, TypeError) as exc:
            raise ValueError(f"EngineTarget.base_url {self.base_url!r}: {exc}") from exc
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(
                f"EngineTarget.base_url must be an http(s) URL with a host, got {self.base_url!r}"
            )
        for name in ("metrics_path", "health_path"):
            if not getattr(self, name).startswith("/"):
                raise ValueError(f"EngineTarget.{name} must start with '/'")

    @property
    def metrics_url(self) -> str:
        return self.base_url.rstrip("/") + self.metrics_path

    @property
    def health_url(self) -> str:
        return self.base_url.rstrip("/") + self.health_path


@dataclasses.dataclass(frozen=True)
class ScrapeResult:
    identity: str
    metrics_ok: bool  # /metrics answered 200 with a page that parsed
    health_ok: bool  # /health answered 200 within the timeout
    latency: float  # seconds from the start of this engine's scrape to its end
    load: enginemetrics.EngineLoad | None  # None unless metrics_ok
    error: str | None  # "metrics: ...; health: ..." for whichever failed
    page: str | None = None  # "oversized" or "malformed": the engine's page itself is bad
    # dataplane.health's verdict on the engine's counters since its previous scrape
    # ("5xx", "stalled"), None when they look fine or could not be judged. Set by the
    # watcher, which keeps the previous reading; travels to the controller.
    failure: str | None = None
    # Set by the watcher: the engine last failed on 5xx and has answered no inference
    # request well since (dataplane.health.unproven). Its round passes, but is no success.
    unproven: bool = False
    # The counters the verdict is made from; local to the agent (not on the wire, not
    # part of equality).
    progress: enginemetrics.Progress | None = dataclasses.field(
        default=None, compare=False, repr=False)

    @property
    def ok(self) -> bool:
        """What a client would see: /metrics, /health and the verdict all pass."""
        return self.metrics_ok and self.health_ok and self.failure is None

    def outcomes(self) -> list[tuple[bool, str]]:
        """Breaker inputs, for ``Breaker.record_many(result.outcomes(), now)``: one per
        round, a success only when everything passed, else the first failure (health,
        scrape, then the verdict) as its source; none for an unproven round. One per
        round keeps "N consecutive failures" meaning N rounds, whatever failed in them."""
        if not self.health_ok:
            return [(False, "health")]
        if not self.metrics_ok:
            return [(False, "scrape")]
        if self.failure is not None:
            return [(False, self.failure)]
        if self.unproven:
            # Probes pass but nothing shows clients are served again: neither outcome, or
            # a half-open breaker would close on rounds that sent the engine no request.
            return []
        return [(True, "scrape")]


class _Failed(Exception):
    """One endpoint failed; the message is the reason reported, ``page`` says when the
    engine's page itself was bad (not the network)."""

    def __init__(self, message: str, page: str | None = None) -> None:
        super().__init__(message)
        self.page = page


def make_client(timeout: float) -> httpx.AsyncClient:
    """A client suited to scraping pods: no proxies or netrc from the environment (a
    node's HTTP_PROXY must not sit between the controller and its pods), keep-alive
    across rounds."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout),
        limits=httpx.Limits(max_connections=512, max_keepalive_connections=256),
        trust_env=False,
        follow_redirects=False,
    )


async def scrape(
    engines: Sequence[EngineTarget],
    timeout: float,
    *,
    client: httpx.AsyncClient | None = None,
    max_bytes: int = MAX_BODY_BYTES,
) -> dict[str, ScrapeResult]:
    """Scrape every engine once, concurrently; at most ``timeout`` seconds per engine.

    Never raises for an engine's failure. Without ``client``, a temporary one is made
    (and closed) for this round.
    """
    if not (isinstance(timeout, int | float) and math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    seen: set[str] = set()
    for e in engines:
        if e.identity in seen:
            raise ValueError(f"engine {e.identity!r} listed twice")
        seen.add(e.identity)
    if client is None:
        async with make_client(timeout) as own:
            return await _scrape_all(own, engines, timeout, max_bytes)
    return await _scrape_all(client, engines, timeout, max_bytes)


async def _scrape_all(
    client: httpx.AsyncClient,
    engines: Sequence[EngineTarget],
    timeout: float,
    max_bytes: int,
) -> dict[str, ScrapeResult]:
    results = await asyncio.gather(*(_scrape_one(client, e, timeout, max_bytes) for e in engines))
    return {r.identity: r for r in results}


async def _scrape_one(
    client: httpx.AsyncClient, target: EngineTarget, timeout: float, max_bytes: int
) -> ScrapeResult:
    start = time.monotonic()
    deadline = asyncio.get_running_loop().time() + timeout
    metrics, health = await asyncio.gather(
        _attempt(_fetch(client, target.metrics_url, max_bytes), deadline, timeout),
        _attempt(_fetch(client, target.health_url, _HEALTH_MAX_BYTES), deadline, timeout),
    )
    latency = time.monotonic() - start

    load: enginemetrics.EngineLoad | None = None
    progress: enginemetrics.Progress | None = None
    metrics_error: str | None = None
    page: str | None = None
    if isinstance(metrics, str):
        try:
            load, progress = enginemetrics.parse_page(metrics)
        except enginemetrics.MetricsError as exc:
            metrics_error, page = f"bad metrics: {exc}", "malformed"
    else:
        metrics_error = str(metrics)
        page = metrics.page
    health_error = None if isinstance(health, str) else str(health)

    reasons = [f"metrics: {metrics_error}"] if metrics_error else []
    if health_error:
        reasons.append(f"health: {health_error}")
    return ScrapeResult(
        identity=target.identity,
        metrics_ok=metrics_error is None,
        health_ok=health_error is None,
        latency=latency,
        load=load,
        error="; ".join(reasons) or None,
        page=page,
        progress=progress,
    )


async def _attempt(fetch: Awaitable[str], deadline: float, timeout: float) -> str | _Failed:
    try:
        async with asyncio.timeout_at(deadline):
            return await fetch
    except (TimeoutError, httpx.TimeoutException):
        return _Failed(f"timeout after {timeout:g}s")
    except _Failed as exc:
        return exc
    except httpx.ConnectError as exc:
        return _Failed(f"connect failed: {exc or type(exc).__name__}")
    except httpx.HTTPError as exc:
        return _Failed(f"{type(exc).__name__}: {exc}")
    except Exception as exc:
        # Whatever else the transport raises (an OSError httpx does not wrap, a decoder
        # error) is about this engine only: report it, never fail the whole round.
        return _Failed(f"{type(exc).__name__}: {exc}")


async def _fetch(client: httpx.AsyncClient, url: str, max_bytes: int) -> str:
    async with client.stream("GET", url) as response:
        if response.status_code != 200:
            raise _Failed(f"HTTP {response.status_code}")
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > max_bytes:
                raise _Failed(f"body larger than {max_bytes} bytes", "oversized")
            chunks.append(chunk)
    try:
        return b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError:
        raise _Failed("body is not UTF-8", "malformed") from None


Callback = Callable[[Mapping[str, ScrapeResult]], Awaitable[None] | None]


class Scraper:
    """Scrape rounds at a fixed rate until :meth:`stop`.

    Rounds start every ``interval`` seconds; a round that overruns makes the loop skip
    the ticks it missed instead of bursting to catch up. ``targets`` is a list or a
    function returning the current list (discovery changes it between rounds). The
    callback may be sync or async; an exception from it (or from ``targets``) is logged
    and the loop goes on, since one bad round must not stop load reporting.
    """

    def __init__(
        self,
        targets: Sequence[EngineTarget] | Callable[[], Sequence[EngineTarget]],
        callback: Callback,
        *,
        interval: float = DEFAULT_INTERVAL,
        timeout: float | None = None,
        max_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        if not (isinstance(interval, int | float) and math.isfinite(interval) and interval > 0):
            raise ValueError(f"interval must be a positive number of seconds, got {interval!r}")
        # Default: finish every round before the next tick is due.
        timeout = 0.8 * interval if timeout is None else timeout
        if not (isinstance(timeout, int | float) and math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self._targets = targets
        self._callback = callback
        self.interval = float(interval)
        self.timeout = float(timeout)
        self._max_bytes = max_bytes
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.rounds = 0  # completed rounds (callback returned or raised)
        self.skipped_ticks = 0  # ticks missed because a round overran

    def _current_targets(self) -> Sequence[EngineTarget]:
        return self._targets() if callable(self._targets) else self._targets

    async def run(self) -> None:
        """Run rounds until :meth:`stop`; returns after the round in flight."""
        loop = asyncio.get_running_loop()
        async with make_client(self.timeout) as client:
            next_tick = loop.time()
            while not self._stop.is_set():
                try:
                    results = await scrape(
                        self._current_targets(),
                        self.timeout,
                        client=client,
                        max_bytes=self._max_bytes,
                    )
                    maybe = self._callback(results)
                    if inspect.isawaitable(maybe):
                        await maybe
                except Exception:
                    log.exception("scrape round failed")
                self.rounds += 1
                next_tick += self.interval
                now = loop.time()
                if now > next_tick:
                    missed = math.ceil((now - next_tick) / self.interval)
                    self.skipped_ticks += missed
                    next_tick += missed * self.interval
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), next_tick - now)

    def start(self) -> asyncio.Task[None]:
        if self._task is not None and not self._task.done():
            raise RuntimeError("scraper already running")
        self._stop.clear()
        self._task = asyncio.get_running_loop().create_task(self.run(), name="kvroute-scraper")
        return self._task

    async def stop(self, grace: float | None = None) -> None:
        """Stop after the round in flight; cancel it if it has not ended ``grace``
        seconds later (default: the scrape timeout plus one second)."""
        self._stop.set()
        task, self._task = self._task, None
        if task is None:
            return
        grace = self.timeout + 1.0 if grace is None else grace
        done, _ = await asyncio.wait({task}, timeout=grace)
        if not done:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return
        exc = task.exception()
        if exc is not None:
            raise exc
