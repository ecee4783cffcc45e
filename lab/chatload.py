"""Multi-turn streaming chat through the official ``openai`` client, and what it got.

The LLM workload of the benchmark and the demo. Users (a closed loop of ``users`` at
once) each run sessions one after another; a session is a chat of ``turns`` turns that
opens with a document (``first_words``) and re-sends the whole conversation every turn,
as chat clients do, so the engine that served the earlier turns holds most of the prompt
in its prefix cache. Every request goes through ``openai.AsyncOpenAI`` on an httpx
client whose transport is the project's ``dataplane.client.AsyncSessionTransport``: the
client's socket is tagged with the session before ``connect()``, and every request
carries the ``X-Session-ID`` header (what an L7 router hashes).

Each turn opens a new connection (``Connection: close``): a chat frontend multiplexes
many users over pooled connections, so which connection (and engine) a turn gets has
nothing to do with its session. A per-connection policy thus decides every turn, which
is what kube-proxy's random choice, a least-loaded choice and kvroute's session
affinity are compared on.

Runs are told apart by a nonce at the start of each session: two runs of the same
workload (one per routing policy) send the same words in the same shapes, but never
find each other's blocks in an engine's prefix cache.

:func:`summarize`, :func:`imbalance` and :func:`ratios` are pure; :func:`drive` is the
async edge that runs inside a client namespace; :class:`EngineWatch` samples the
engines' own ``/metrics`` from the host.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import json
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import openai
from openai.types.chat import ChatCompletionMessageParam

from dataplane import client, enginemetrics
from lab import traffic

SESSION_HEADER = traffic.SESSION_HEADER
ENGINE_HEADER = traffic.ENGINE_HEADER


@dataclasses.dataclass(frozen=True)
class Workload:
    users: int = 12  # sessions in flight at once
    sessions: int = 48  # sessions in all (the run may end earlier: seconds)
    turns: int = 4
    first_words: int = 300  # the first message carries a document
    turn_words: int = 25  # each later user message
    max_tokens: int = 48  # every reply is this long (ignore_eos)
    think_time: float = 0.1  # seconds between a reply and the session's next turn
    seconds: float | None = None  # start no session after this; None: run them all
    seed: int = 0
    timeout: float = 60.0  # one request, connect to the last token

    def __post_init__(self) -> None:
        for name in ("users", "sessions", "turns", "first_words", "turn_words", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.think_time < 0 or self.timeout <= 0 or (
                self.seconds is not None and self.seconds <= 0):
            raise ValueError("think_time must be >= 0, timeout and seconds > 0")


def session_id(run: str, index: int) -> str:
    return f"{run}-{index:05d}"


def user_message(wl: Workload, run: str, index: int, turn: int) -> str:
    """Turn ``turn``'s user message of session ``index``; the first one opens with the
    run's nonce, so runs share no prefix."""
    words = traffic.user_message(wl.seed, f"s{index}", turn,
                                 wl.first_words if turn == 0 else wl.turn_words)
    return f"{run} {words}" if turn == 0 else words


# -- pure summaries -----------------------------------------------------------------------------

def imbalance(samples: Sequence[Sequence[float]]) -> float | None:
    """Mean over samples of max/mean running requests across engines; samples where no
    engine runs anything say nothing about balance and are skipped."""
    ratios = []
    for running in samples:
        if running and sum(running) > 0:
            ratios.append(max(running) / (sum(running) / len(running)))
    return sum(ratios) / len(ratios) if ratios else None


def prefix_delta(before: Mapping[str, tuple[float, float]],
                 after: Mapping[str, tuple[float, float]]) -> tuple[float, float]:
    """(queries, hits) the engines' prefix caches counted between two scrapes; an engine
    that restarted in between (counters went down) counts from zero."""
    queries = hits = 0.0
    for url, (q1, h1) in after.items():
        q0, h0 = before.get(url, (0.0, 0.0))
        if q1 < q0 or h1 < h0:
            q0 = h0 = 0.0
        queries += q1 - q0
        hits += h1 - h0
    return queries, hits


def summarize(turns: Sequence[traffic.TurnResult], wall: float,
              prefix: tuple[float, float], running_samples: Sequence[Sequence[float]]
              ) -> dict[str, Any]:
    ok = [t for t in turns if t.ok]
    ttft = traffic.percentiles([t.ttft for t in ok if t.ttft is not None], (50, 90, 99))
    tokens = sum(t.completion_tokens or 0 for t in ok)
    by_session: dict[str, list[traffic.TurnResult]] = {}
    for t in sorted(ok, key=lambda t: (t.session, t.turn)):
        by_session.setdefault(t.session, []).append(t)
    same = moved = 0
    for ts in by_session.values():
        for a, b in itertools.pairwise(ts):
            if a.engine and b.engine and a.engine != "?" and b.engine != "?":
                same += a.engine == b.engine
                moved += a.engine != b.engine
    queries, hits = prefix
    return {
        "requests": len(turns),
        "ok": len(ok),
        "failed": len(turns) - len(ok),
        "errors": dict(Counter(t.error for t in turns if not t.ok)),
        "wall_s": round(wall, 2),
        "ttft_ms": {k: None if v is None else round(v * 1e3, 1) for k, v in ttft.items()},
        "tokens_per_s": round(tokens / wall, 1) if wall > 0 else None,
        "completion_tokens": tokens,
        "prefix_cache_hit_ratio": round(hits / queries, 4) if queries else None,
        "prefix_cache_queries": queries,
        "imbalance_running": None if (v := imbalance(running_samples)) is None else round(v, 2),
        "turns_on_previous_engine": round(same / (same + moved), 3) if same + moved else None,
        "served_by": dict(sorted(Counter(t.engine for t in ok).items())),
    }


def ratios(row: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, float | None]:
    """``row`` against a baseline of the same run: TTFT and throughput as x baseline,
    the hit ratio as a difference in points (a ratio of ratios near 0 says little)."""
    def div(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a is not None and b else None

    hit, base_hit = row.get("prefix_cache_hit_ratio"), base.get("prefix_cache_hit_ratio")
    return {
        "ttft_p50_x": div(row["ttft_ms"]["p50"], base["ttft_ms"]["p50"]),
        "ttft_p99_x": div(row["ttft_ms"]["p99"], base["ttft_ms"]["p99"]),
        "tokens_per_s_x": div(row["tokens_per_s"], base["tokens_per_s"]),
        "prefix_hit_points": (round((hit - base_hit) * 100, 1)
                              if hit is not None and base_hit is not None else None),
    }


# -- the client edge (runs inside a client namespace) --------------------------------------------

async def _turn(oa: openai.AsyncOpenAI, model: str, wl: Workload, sid: str, turn: int,
                messages: list[ChatCompletionMessageParam]) -> tuple[traffic.TurnResult, str]:
    res = traffic.TurnResult(session=sid, turn=turn, url=str(oa.base_url), engine="?",
                             ok=False)
    parts: list[str] = []
    t0 = time.monotonic()
    try:
        raw = await oa.chat.completions.with_raw_response.create(
            model=model, messages=messages, max_tokens=wl.max_tokens, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        res.engine = raw.headers.get(ENGINE_HEADER, "?")
        stream = raw.parse()
        if not isinstance(stream, openai.AsyncStream):
            raise TypeError(f"a stream was asked for, got {type(stream).__name__}")
        async for chunk in stream:
            if chunk.usage:
                res.prompt_tokens = chunk.usage.prompt_tokens
                res.completion_tokens = chunk.usage.completion_tokens
            piece = chunk.choices[0].delta.content if chunk.choices else None
            if not piece:
                continue
            res.on_piece(t0, time.monotonic())
            parts.append(piece)
        res.e2e = time.monotonic() - t0
    except (openai.OpenAIError, httpx.HTTPError, OSError, TypeError) as e:
        res.error = type(e).__name__
        return res, ""
    res.ok = res.ttft is not None
    if not res.ok:
        res.error = "no tokens"
    return res, "".join(parts)


async def drive(base_url: str, wl: Workload, run: str, model: str | None = None,
                progress: Path | None = None) -> tuple[list[traffic.TurnResult], float]:
    """Run the workload against ``base_url`` (a VIP, a proxy or a pod); the turns and
    the wall time. ``progress`` gets one JSON line per turn as it ends (live views)."""
    timeout = httpx.Timeout(wl.timeout, connect=5.0)
    if model is None:
        async with httpx.AsyncClient(timeout=timeout, trust_env=False) as admin:
            r = await admin.get(f"{base_url}/v1/models")
            r.raise_for_status()
            model = str(r.json()["data"][0]["id"])
    results: list[traffic.TurnResult] = []
    queue = list(range(wl.sessions))
    started = time.monotonic()
    log = progress.open("a", buffering=1) if progress else None

    async def session(index: int, oa: openai.AsyncOpenAI) -> None:
        sid = session_id(run, index)
        messages: list[ChatCompletionMessageParam] = []
        for turn in range(wl.turns):
            if turn and wl.think_time:
                await asyncio.sleep(wl.think_time)
            messages.append({"role": "user", "content": user_message(wl, run, index, turn)})
            res, reply = await _turn(oa.with_options(default_headers={SESSION_HEADER: sid,
                                                                      "Connection": "close"}),
                                     str(model), wl, sid, turn, messages)
            results.append(res)
            if log:
                log.write(json.dumps({"t": time.monotonic() - started, "ok": res.ok,
                                      "engine": res.engine, "ttft": res.ttft,
                                      "tokens": res.completion_tokens or 0}) + "\n")
            if not res.ok:
                # A failed turn ends the session: the user would retry into a new one.
                return
            messages.append({"role": "assistant", "content": reply})

    async def user(u: int) -> None:
        # One client per user, its transport one tagged connection per session header.
        http = httpx.AsyncClient(transport=client.AsyncSessionTransport(), timeout=timeout,
                                 trust_env=False)
        oa = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="none", http_client=http,
                                max_retries=0, timeout=timeout)
        # Users start spread over the first think time, not in one burst.
        await asyncio.sleep(random.Random(f"{wl.seed}:{u}").uniform(0, 0.5))
        try:
            while queue and (wl.seconds is None or time.monotonic() - started < wl.seconds):
                await session(queue.pop(0), oa)
        finally:
            await oa.close()

    try:
        await asyncio.gather(*(user(u) for u in range(wl.users)))
    finally:
        if log:
            log.close()
    return results, time.monotonic() - started


def warm(base_url: str) -> str:
    """One short chat straight to an engine from this process, before clients are
    forked: the client's one-off costs (the openai package's lazy imports and model
    classes, about a second of CPU) are paid here once instead of in every child's
    first turn, where they would count as TTFT. Returns the served model's name."""
    with httpx.Client(timeout=10, trust_env=False) as admin:
        r = admin.get(f"{base_url}/v1/models")
        r.raise_for_status()
        model = str(r.json()["data"][0]["id"])
    quiet = logging.getLogger(client.__name__)
    level, quiet.level = quiet.level, logging.ERROR  # no kvroute on this host's sockets
    try:
        wl = Workload(users=1, sessions=1, turns=1, first_words=4, turn_words=1, max_tokens=2)
        turns, _ = drive_blocking(base_url, wl, "warm-up", model)
    finally:
        quiet.level = level
    if not turns or not turns[0].ok:
        raise RuntimeError(f"warm-up chat with {base_url} failed: "
                           f"{turns[0].error if turns else 'no turn'}")
    return model


def drive_blocking(base_url: str, wl: Workload, run: str, model: str | None = None,
                   progress: Path | None = None) -> tuple[list[traffic.TurnResult], float]:
    """:func:`drive` for ``lab.run.call`` (a forked child has no loop of its own)."""
    return asyncio.run(drive(base_url, wl, run, model, progress))


# -- the engines' side, from the host -------------------------------------------------------------

class EngineWatch:
    """Samples each engine's own ``/metrics`` every ``interval`` seconds in a thread:
    the latest load per engine, running requests per sample (for :func:`imbalance`),
    and the prefix-cache counters (:meth:`prefix`)."""

    def __init__(self, urls: Mapping[str, str], interval: float = 0.25) -> None:
        self.urls = dict(urls)  # engine name -> base URL
        self.interval = interval
        self.loads: dict[str, enginemetrics.EngineLoad | None] = dict.fromkeys(self.urls)
        self.samples: list[list[float]] = []
        # Per engine, (time, TTFT buckets) of recent scrapes, for ttft_p50 over a window.
        self._ttft: dict[str, collections.deque[tuple[float, tuple[tuple[float, float], ...]]]] = {
            name: collections.deque(maxlen=512) for name in self.urls}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-watch", daemon=True)
        self._http = httpx.Client(timeout=2.0, trust_env=False)

    def prefix(self) -> dict[str, tuple[float, float]]:
        """(queries, hits) per engine that answers now."""
        out = {}
        for name, url in self.urls.items():
            with contextlib.suppress(httpx.HTTPError, ValueError):
                out[name] = traffic.prefix_counters(self._http.get(f"{url}/metrics").text)
        return out

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            running = []
            for name, url in self.urls.items():
                try:
                    load = enginemetrics.parse(self._http.get(f"{url}/metrics").text)
                except (httpx.HTTPError, enginemetrics.MetricsError):
                    load = None  # a dead engine runs nothing
                self.loads[name] = load
                running.append(load.running if load else 0.0)
                if load is not None:
                    self._ttft[name].append((time.monotonic(), load.ttft_buckets))
            self.samples.append(running)

    def ttft_p50(self, name: str, window: float) -> float | None:
        """The engine's own TTFT median over about the last ``window`` seconds (from its
        histogram's buckets, as PromQL's histogram_quantile would); None without data."""
        history = self._ttft[name]
        if not history:
            return None
        now, current = history[-1]
        previous = next((b for t, b in history if t >= now - window), current)
        if previous is current:
            return None
        return enginemetrics.histogram_quantile(
            enginemetrics.subtract_buckets(current, previous), 0.5)

    def reset(self) -> None:
        self.samples = []

    def __enter__(self) -> EngineWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._http.close()

