"""``kvroute lab traffic``: multi-turn chat sessions against engines, and what they got.

Each session is a chat: every turn re-sends the whole conversation so far plus a new user
message, as chat clients do, so an engine that served the session's earlier turns holds most of
the prompt in its prefix cache. Sessions go either

- to one ``--target`` (a Service VIP that kvroute routes), each session's connection tagged with
  its session id through ``dataplane.client.SessionTransport`` when that helper is present, or
- straight to several ``--engine`` URLs with ``--routing sticky`` (a session keeps one engine) or
  ``--routing random`` (each turn picks any engine): the "before kvroute" baselines.

The report gives per-session routing (which engine served each turn: the simulator's
``X-Engine-ID`` header, else the URL used), TTFT and inter-token latency percentiles, errors,
and each engine's own prefix-cache hit ratio from its /metrics counters before vs after
(``vllm:prefix_cache_hits_total`` / ``vllm:prefix_cache_queries_total``).

The planning, percentile and metrics-delta helpers are pure; ``run`` is the async edge.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import importlib
import itertools
import json
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import click
import httpx
from prometheus_client import parser

ENGINE_HEADER = "X-Engine-ID"
SESSION_HEADER = "X-Session-ID"

_WORD_TEXT = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november "
    "oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu apple river "
    "stone cloud green orange purple silver copper garden window market bridge castle forest "
    "island mountain ocean planet rocket signal thunder valley winter summer autumn spring "
    "kernel socket packet cache engine token block route session request server client "
    "network memory thread vector matrix tensor layer model prompt answer question story"
)
_WORDS = tuple(_WORD_TEXT.split())


# -- pure helpers -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Config:
    engines: tuple[str, ...] = ()
    target: str | None = None
    routing: str = "sticky"  # sticky | random (only with engines)
    metrics_urls: tuple[str, ...] = ()
    sessions: int = 20
    turns: int = 5
    concurrency: int = 8
    think_time: float = 0.2
    prompt_words: int = 60
    system_words: int = 0
    max_tokens: int = 64
    stream: bool = True
    seed: int = 0
    model: str | None = None
    api: str = "chat"  # chat | completions
    timeout: float = 120.0


def session_id(seed: int, index: int) -> str:
    return f"s{seed}-{index:04d}"


def user_message(seed: int, sid: str, turn: int, words: int) -> str:
    rng = random.Random(f"{seed}:{sid}:{turn}")
    return " ".join(rng.choice(_WORDS) for _ in range(words))


def system_prompt(seed: int, words: int) -> str:
    rng = random.Random(f"{seed}:system")
    return " ".join(rng.choice(_WORDS) for _ in range(words))


def stable_index(key: str, n: int) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") % n


def pick_engine(routing: str, sid: str, engines: Sequence[str], rng: random.Random) -> str:
    """Engine for one turn: sticky hashes the session id, random draws from ``rng``."""
    if routing == "sticky":
        return engines[stable_index(sid, len(engines))]
    if routing == "random":
        return rng.choice(list(engines))
    raise ValueError(f"unknown routing {routing!r}")


def percentiles(values: Sequence[float], ps: Sequence[int] = (50, 90, 99)
                ) -> dict[str, float | None]:
    """Nearest-rank percentiles plus the mean; None when there is no value."""
    out: dict[str, float | None] = {}
    data = sorted(values)
    for p in ps:
        out[f"p{p}"] = data[max(0, math.ceil(p / 100 * len(data)) - 1)] if data else None
    out["mean"] = sum(data) / len(data) if data else None
    return out


def prefix_counters(metrics_text: str) -> tuple[float, float]:
    """(queries, hits) of vLLM's prefix cache, summed over engines/models on the page."""
    queries = hits = 0.0
    for fam in parser.text_string_to_metric_families(metrics_text):
        for s in fam.samples:
            if s.name == "vllm:prefix_cache_queries_total":
                queries += s.value
            elif s.name == "vllm:prefix_cache_hits_total":
                hits += s.value
    return queries, hits


def render_prompt(messages: Sequence[dict[str, str]]) -> str:
    """The conversation as one completion prompt (for ``--api completions``)."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


@dataclasses.dataclass
class TurnResult:
    session: str
    turn: int
    url: str
    engine: str
    ok: bool
    error: str | None = None
    ttft: float | None = None
    itls: list[float] = dataclasses.field(default_factory=list)
    e2e: float | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    completion_tokens: int | None = None
    last_piece: float | None = None  # monotonic time the latest streamed piece arrived

    def on_piece(self, sent: float, now: float) -> None:
        """A streamed piece arrived at ``now`` for the request sent at ``sent`` (both
        monotonic): the first one is the TTFT, each later one an inter-token gap."""
        if self.last_piece is None:
            self.ttft = now - sent
        else:
            self.itls.append(now - self.last_piece)
        self.last_piece = now


def build_report(cfg: Config, turns: list[TurnResult],
                 before: dict[str, tuple[float, float] | str],
                 after: dict[str, tuple[float, float] | str], tagging: str,
                 wall: float) -> dict[str, Any]:
    by_session: dict[str, list[TurnResult]] = {}
    for t in sorted(turns, key=lambda t: (t.session, t.turn)):
        by_session.setdefault(t.session, []).append(t)
    sessions = []
    same = moves = 0
    for sid, ts in by_session.items():
        served = [t.engine for t in ts if t.ok]
        for a, b in itertools.pairwise(served):
            same += a == b
            moves += a != b
        sessions.append({"session": sid, "engines": [t.engine if t.ok else None for t in ts],
                         "distinct_engines": len(set(served)),
                         "errors": sum(not t.ok for t in ts)})
    engines: dict[str, Any] = {}
    tot_q = tot_h = 0.0
    for url in sorted(set(before) | set(after)):
        pre, post = before.get(url), after.get(url)
        # Behind a VIP the URL used is the VIP: match the simulator's default engine id
        # (host:port) to the metrics URL instead.
        hostport = url.split("://", 1)[-1].rstrip("/")
        entry: dict[str, Any] = {"requests": sum(1 for t in turns
                                                 if t.url == url or t.engine == hostport)}
        if isinstance(pre, tuple) and isinstance(post, tuple):
            dq, dh = post[0] - pre[0], post[1] - pre[1]
            tot_q += dq
            tot_h += dh
            entry.update(prefix_cache_queries=dq, prefix_cache_hits=dh,
                         hit_ratio=(dh / dq) if dq else None)
        else:
            entry["metrics_error"] = post if isinstance(post, str) else str(pre)
        engines[url] = entry
    ok = [t for t in turns if t.ok]
    prompt = sum(t.prompt_tokens or 0 for t in ok)
    cached = [t.cached_tokens for t in ok if t.cached_tokens is not None]
    served_by = Counter(t.engine for t in ok)
    return {
        "config": dataclasses.asdict(cfg),
        "tagging": tagging,
        "wall_s": round(wall, 3),
        "requests": len(turns),
        "ok": len(ok),
        "errors": dict(Counter(t.error for t in turns if not t.ok)),
        "ttft_s": percentiles([t.ttft for t in ok if t.ttft is not None]),
        "itl_s": percentiles([v for t in ok for v in t.itls]),
        "e2e_s": percentiles([t.e2e for t in ok if t.e2e is not None]),
        "served_by": dict(sorted(served_by.items())),
        "turns_on_same_engine_as_previous": (same / (same + moves)) if same + moves else None,
        "sessions": sessions,
        "engines": engines,
        "prefix_cache_hit_ratio": (tot_h / tot_q) if tot_q else None,
        # From the responses' usage (the simulator always sends it; vLLM only with
        # --enable-prompt-tokens-details): cached prompt tokens / prompt tokens.
        "usage_cached_ratio": (sum(cached) / prompt) if cached and prompt else None,
    }


# -- the async edge -----------------------------------------------------------------------------

def _session_transport() -> tuple[type[Any] | None, str]:
    """The client helper's async transport that tags each connection by X-Session-ID.

    Imported lazily: the helper lives in the socket load balancer's work and may be absent;
    then sessions go untagged (the kernel falls back to client affinity) and the report says so.
    """
    try:
        client_mod = importlib.import_module("dataplane.client")
    except ImportError as e:
        return None, f"untagged: dataplane.client not importable ({e})"
    for name in ("AsyncSessionTransport", "SessionTransport"):
        transport = getattr(client_mod, name, None)
        if isinstance(transport, type) and issubclass(transport, httpx.AsyncBaseTransport):
            try:
                transport()  # constructible without arguments? (holds no socket yet)
            except TypeError as e:
                return None, f"untagged: dataplane.client.{name}() needs arguments ({e})"
            return transport, f"tagged by dataplane.client.{name}"
    return None, "untagged: dataplane.client has no async SessionTransport for httpx"


async def _scrape(client: httpx.AsyncClient, urls: Sequence[str]
                  ) -> dict[str, tuple[float, float] | str]:
    async def one(url: str) -> tuple[float, float] | str:
        try:
            r = await client.get(f"{url}/metrics")
            r.raise_for_status()
            return prefix_counters(r.text)
        except (httpx.HTTPError, ValueError) as e:
            return f"{type(e).__name__}: {e}"
    results = await asyncio.gather(*(one(u) for u in urls))
    return dict(zip(urls, results, strict=True))


async def _discover_model(client: httpx.AsyncClient, url: str) -> str:
    r = await client.get(f"{url}/v1/models")
    r.raise_for_status()
    return str(r.json()["data"][0]["id"])


async def _one_turn(client: httpx.AsyncClient, cfg: Config, url: str, model: str, sid: str,
                    turn: int, messages: list[dict[str, str]]) -> tuple[TurnResult, str]:
    res = TurnResult(session=sid, turn=turn, url=url, engine=url, ok=False)
    body: dict[str, Any] = {"model": model, "max_tokens": cfg.max_tokens, "stream": cfg.stream}
    if cfg.api == "chat":
        path, body["messages"] = "/v1/chat/completions", messages
    else:
        path, body["prompt"] = "/v1/completions", render_prompt(messages)
    if cfg.stream:
        body["stream_options"] = {"include_usage": True}
    text_parts: list[str] = []
    t0 = time.monotonic()
    try:
        async with client.stream("POST", f"{url}{path}", json=body,
                                 headers={SESSION_HEADER: sid}) as r:
            res.engine = r.headers.get(ENGINE_HEADER, url)
            if r.status_code != 200:
                await r.aread()
                res.error = f"HTTP {r.status_code}"
                return res, ""
            if not cfg.stream:
                j = json.loads(await r.aread())
                res.ttft = res.e2e = time.monotonic() - t0
                ch = j["choices"][0]
                text_parts.append(ch["message"]["content"] if cfg.api == "chat" else ch["text"])
                _usage(res, j.get("usage"))
            else:
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if chunk.get("usage"):
                        _usage(res, chunk["usage"])
                    if not chunk.get("choices"):
                        continue
                    ch = chunk["choices"][0]
                    piece = (ch.get("delta", {}).get("content") if cfg.api == "chat"
                             else ch.get("text")) or ""
                    if not piece:
                        continue
                    res.on_piece(t0, time.monotonic())
                    text_parts.append(piece)
                res.e2e = time.monotonic() - t0
    except httpx.HTTPError as e:
        res.error = type(e).__name__
        return res, ""
    res.ok = True
    return res, "".join(text_parts)


def _usage(res: TurnResult, usage: dict[str, Any] | None) -> None:
    if not usage:
        return
    res.prompt_tokens = usage.get("prompt_tokens")
    res.completion_tokens = usage.get("completion_tokens")
    details = usage.get("prompt_tokens_details") or {}
    res.cached_tokens = details.get("cached_tokens")


async def run(cfg: Config) -> dict[str, Any]:
    if bool(cfg.engines) == bool(cfg.target):
        raise ValueError("give either one target or one or more engines")
    urls = list(cfg.engines) or [str(cfg.target)]
    metrics_urls = list(cfg.metrics_urls) or list(cfg.engines)
    transport_cls, tagging = (None, "n/a: engines addressed directly")
    if cfg.target:
        transport_cls, tagging = _session_transport()
    timeout = httpx.Timeout(cfg.timeout, connect=10.0)
    async with httpx.AsyncClient(timeout=timeout) as admin:
        model = cfg.model or await _discover_model(admin, urls[0])
        before = await _scrape(admin, metrics_urls)
        sem = asyncio.Semaphore(cfg.concurrency)
        results: list[TurnResult] = []
        system = system_prompt(cfg.seed, cfg.system_words) if cfg.system_words else None

        async def session(index: int) -> None:
            sid = session_id(cfg.seed, index)
            # Per-session draws: the same seed routes the same way whatever the timing.
            rng = random.Random(f"routing:{cfg.seed}:{sid}")
            clients: dict[str, httpx.AsyncClient] = {}

            def client_for(url: str) -> httpx.AsyncClient:
                # One client (so one kept-alive connection) per session and engine, like a
                # chat frontend holding a connection per user.
                if url not in clients:
                    kwargs: dict[str, Any] = {"timeout": timeout}
                    if transport_cls is not None:
                        kwargs["transport"] = transport_cls()
                    clients[url] = httpx.AsyncClient(**kwargs)
                return clients[url]

            messages: list[dict[str, str]] = []
            if system:
                messages.append({"role": "system", "content": system})
            async with sem:
                try:
                    for turn in range(cfg.turns):
                        if turn and cfg.think_time:
                            await asyncio.sleep(cfg.think_time)
                        url = pick_engine(cfg.routing, sid, urls, rng) if cfg.engines else urls[0]
                        messages.append({"role": "user", "content": user_message(
                            cfg.seed, sid, turn, cfg.prompt_words)})
                        res, reply = await _one_turn(client_for(url), cfg, url, model, sid,
                                                     turn, messages)
                        results.append(res)
                        if res.ok:
                            messages.append({"role": "assistant", "content": reply})
                        else:
                            messages.pop()  # keep user/assistant alternating
                finally:
                    for c in clients.values():
                        await c.aclose()

        t0 = time.monotonic()
        await asyncio.gather(*(session(i) for i in range(cfg.sessions)))
        wall = time.monotonic() - t0
        # vLLM publishes a step's stats just after the step: give the last one a moment.
        await asyncio.sleep(0.5)
        after = await _scrape(admin, metrics_urls)
    return build_report(cfg, results, before, after, tagging, wall)


# -- CLI --------------------------------------------------------------------------------------

def _fmt(v: float | None, scale: float = 1000.0, unit: str = "ms") -> str:
    return "-" if v is None else f"{v * scale:.1f}{unit}"


def format_report(rep: dict[str, Any]) -> str:
    cfg = rep["config"]
    mode = (f"target {cfg['target']}" if cfg["target"] else
            f"{len(cfg['engines'])} engines, routing {cfg['routing']}")
    ratio = rep["prefix_cache_hit_ratio"]
    lines = [
        f"traffic: {cfg['sessions']} sessions x {cfg['turns']} turns, {mode}, "
        f"{'stream' if cfg['stream'] else 'no-stream'}, seed {cfg['seed']} ({rep['tagging']})",
        f"requests {rep['requests']}  ok {rep['ok']}  errors {rep['errors'] or 0}  "
        f"wall {rep['wall_s']:.1f}s",
        "         p50       p90       p99       mean",
    ]
    for key, name in (("ttft_s", "TTFT"), ("itl_s", "ITL"), ("e2e_s", "E2E")):
        p = rep[key]
        lines.append(f"{name:<6} " + " ".join(f"{_fmt(p[k]):>9}" for k in
                                               ("p50", "p90", "p99", "mean")))
    same = rep["turns_on_same_engine_as_previous"]
    lines.append("turns on the same engine as the previous turn: "
                 + ("-" if same is None else f"{same:.0%}"))
    lines.append("prefix-cache hit ratio (engines' metrics): "
                 + ("-" if ratio is None else f"{ratio:.1%}"))
    lines.append(f"{'engine':<32} {'requests':>8} {'queries':>9} {'hits':>9} {'ratio':>7}")
    for url, e in rep["engines"].items():
        if "metrics_error" in e:
            lines.append(f"{url:<32} {e['requests']:>8}  metrics: {e['metrics_error']}")
            continue
        r = e["hit_ratio"]
        lines.append(f"{url:<32} {e['requests']:>8} {e['prefix_cache_queries']:>9.0f} "
                     f"{e['prefix_cache_hits']:>9.0f} {'-' if r is None else f'{r:.1%}':>7}")
    lines.append("per-session routing (engine per turn):")
    for s in rep["sessions"]:
        lines.append(f"  {s['session']}: " + " ".join(str(e) for e in s["engines"]))
    return "\n".join(lines)


@click.command("traffic")
@click.option("--target", default=None, help="One URL (a Service VIP) for every session.")
@click.option("--engine", "engines", multiple=True,
              help="Engine base URL; repeat for several (the no-kvroute baselines).")
@click.option("--routing", type=click.Choice(["sticky", "random"]), default="sticky",
              show_default=True, help="With --engine: keep one engine per session, or any.")
@click.option("--metrics-url", "metrics_urls", multiple=True,
              help="Engine URLs to read /metrics from (default: the --engine URLs).")
@click.option("--sessions", default=20, show_default=True, type=click.IntRange(1))
@click.option("--turns", default=5, show_default=True, type=click.IntRange(1))
@click.option("--concurrency", default=8, show_default=True, type=click.IntRange(1),
              help="Sessions in flight at once.")
@click.option("--think-time", default=0.2, show_default=True, type=click.FloatRange(0),
              help="Seconds between a reply and the session's next turn.")
@click.option("--prompt-words", default=60, show_default=True, type=click.IntRange(1),
              help="Words in each new user message.")
@click.option("--system-words", default=0, show_default=True, type=click.IntRange(0),
              help="Words of a system prompt shared by all sessions (0 = none).")
@click.option("--max-tokens", default=64, show_default=True, type=click.IntRange(1))
@click.option("--stream/--no-stream", default=True, show_default=True)
@click.option("--api", type=click.Choice(["chat", "completions"]), default="chat",
              show_default=True, help="Chat completions, or the chat rendered as one prompt.")
@click.option("--model", default=None, help="Model name (default: the first of /v1/models).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--timeout", default=120.0, show_default=True, type=click.FloatRange(0.1))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def command(target: str | None, engines: tuple[str, ...], routing: str,
            metrics_urls: tuple[str, ...], sessions: int, turns: int, concurrency: int,
            think_time: float, prompt_words: int, system_words: int, max_tokens: int,
            stream: bool, api: str, model: str | None, seed: int, timeout: float,
            as_json: bool) -> None:
    """Run multi-turn chat sessions and report routing, latency and prefix-cache reuse."""
    if bool(target) == bool(engines):
        raise click.UsageError("give either --target URL or one or more --engine URL")
    cfg = Config(engines=tuple(u.rstrip("/") for u in engines),
                 target=target.rstrip("/") if target else None, routing=routing,
                 metrics_urls=tuple(u.rstrip("/") for u in metrics_urls), sessions=sessions,
                 turns=turns, concurrency=concurrency, think_time=think_time,
                 prompt_words=prompt_words, system_words=system_words, max_tokens=max_tokens,
                 stream=stream, seed=seed, model=model, api=api, timeout=timeout)
    try:
        rep = asyncio.run(run(cfg))
    except httpx.HTTPError as e:
        raise click.ClickException(f"cannot reach the engines: {type(e).__name__}: {e}") from e
    click.echo(json.dumps(rep, indent=2) if as_json else format_report(rep))
    if rep["ok"] == 0:
        sys.exit(1)


if __name__ == "__main__":
    command(prog_name="python -m lab.traffic")
