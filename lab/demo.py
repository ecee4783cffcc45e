"""`make demo`: the KV-cache win of in-kernel session routing, on one machine.

A lab of engines in pod namespaces (4 simulated vLLM engines, or 3 real vLLM CPU engines
with ``--engine vllm``), the controller on a static discovery file and two node agents.
Then, unattended:

1. a minute of multi-turn streaming chat (the official ``openai`` client on the project's
   session transport, a new connection every turn, clients behind both nodes) through
   the kvroute Service VIP, with a live view of every engine: breaker, kernel state,
   running and waiting requests, KV-cache usage, fleet-wide sessions, its own TTFT;
   one engine is killed (SIGKILL) a third of the way in and started again later;
2. the same workload (same shapes, same kill) through a plain Service VIP that picks a
   random engine per connection, as kube-proxy does;
3. a side-by-side summary: TTFT, the engines' own prefix-cache hit ratio, tokens/s,
   failed requests; then everything is torn down.

:func:`story` runs it and returns both phases' results; :func:`run` is the CLI's entry,
its exit status says whether the story held (kvroute's prefix-cache hit ratio above
random's, failures bounded by the requests in flight on the killed engine, the engine
back in every table).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from lab import bench_llm, chatload, fleet, traffic, vllm_engine

# A log (CI, a pipe) gets views as wide as the table needs, not 80 columns.
console = Console(highlight=False, width=None if Console().is_terminal else 110)

RANDOM_SERVICE = {"name": "llm-random", "vip": bench_llm.RANDOM_VIP, "affinity": "none",
                  "engine": None}
VICTIM = "gpu1"


@dataclasses.dataclass(frozen=True)
class Plan:
    engine: str  # sim | vllm
    engines: int
    seconds: float  # one phase: no session starts after this
    workload: chatload.Workload  # per node's clients

    @property
    def kill_at(self) -> float:
        return self.seconds / 3

    @property
    def revive_at(self) -> float:
        return self.seconds * 7 / 12


def plan(engine: str, seconds: float) -> Plan:
    """Simulated engines: 4, with 8 users behind each node. vLLM on two shared cores:
    3 engines, 2 users per node and short chats (the tiny model's context is 1,024
    tokens), so a CPU engine still answers in time."""
    if engine == "vllm":
        wl = chatload.Workload(users=2, sessions=10_000, turns=3, first_words=80,
                               turn_words=15, max_tokens=16, think_time=0.2,
                               seconds=seconds, timeout=120)
        return Plan(engine, 3, seconds, wl)
    wl = chatload.Workload(users=8, sessions=10_000, turns=5, first_words=300, turn_words=25,
                           max_tokens=48, think_time=0.2, seconds=seconds)
    return Plan(engine, 4, seconds, wl)


class Turns:
    """Follows the clients' progress files (one JSON line per finished turn)."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths
        self._offsets = dict.fromkeys(paths, 0)
        self.events: list[dict[str, Any]] = []

    def poll(self) -> None:
        for path in self.paths:
            with contextlib.suppress(FileNotFoundError), path.open() as f:
                f.seek(self._offsets[path])
                for line in f:
                    if not line.endswith("\n"):
                        break  # half written: read it next time
                    self.events.append(json.loads(line))
                    self._offsets[path] += len(line)

    def recent(self, now: float, window: float) -> list[dict[str, Any]]:
        return [e for e in self.events if e["t"] >= now - window]


def _controller_engines(fl: fleet.Fleet) -> dict[str, dict[str, Any]]:
    try:
        status = httpx.get(f"http://127.0.0.1:{fl.controller_http}/engines", timeout=1,
                           trust_env=False).json()
    except (httpx.HTTPError, ValueError):
        return {}
    return {e["identity"].split("/")[0]: e for e in status.get("engines", [])}


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1e3:.0f} ms"


def _view(fl: fleet.Fleet, watch: chatload.EngineWatch, turns: Turns, title: str,
          elapsed: float) -> Group:
    engines = _controller_engines(fl)
    try:
        kernel = fl.backends(0)
    except Exception:  # the maps may be mid-update; the next refresh shows them
        kernel = {}
    t = Table(box=None, title=title, title_justify="left")
    for col in ("engine", "breaker", "kernel", "running", "waiting", "KV", "sessions",
                "TTFT p50 (5s)"):
        t.add_column(col, no_wrap=True, justify="left" if col in ("engine", "breaker",
                                                                     "kernel") else "right")
    for name in fl.engines:
        ident = fl.engine_id(name)
        load = watch.loads.get(name)
        k = kernel.get(ident, {})
        t.add_row(f"{name} {ident.split(':')[0]}", engines.get(ident, {}).get("breaker", "-"),
                  k.get("state", "-") + (" (tripped)" if k.get("kernel_tripped") else ""),
                  "down" if load is None else f"{load.running:.0f}",
                  "-" if load is None else f"{load.waiting:.0f}",
                  "-" if load is None else f"{load.kv_usage:.0%}",
                  str(k.get("sessions", "-")), _ms(watch.ttft_p50(name, 5.0)))
    turns.poll()
    recent = turns.recent(elapsed, 10.0)
    ok = [e for e in recent if e["ok"]]
    ttft = traffic.percentiles([e["ttft"] for e in ok if e["ttft"] is not None], (50, 99))
    failed = sum(not e["ok"] for e in turns.events)
    footer = (f"t={elapsed:4.0f}s  client side, last 10 s: {len(ok) / 10:.1f} turns/s, "
              f"{sum(e['tokens'] for e in ok) / 10:.0f} tokens/s, TTFT p50 {_ms(ttft['p50'])} "
              f"p99 {_ms(ttft['p99'])}  |  turns done {len(turns.events)}, failed {failed}")
    return Group(t, footer)


def phase(fl: fleet.Fleet, p: Plan, watch: chatload.EngineWatch, policy: str, url: str,
          model: str, show: Callable[[Group], None], note: Callable[[str], None]) -> dict[str, Any]:
    """The workload through ``url`` from clients behind both nodes, the victim killed
    and started again on schedule; the summary of what the clients and engines saw."""
    assert fl.client is not None
    run = f"{policy}-{secrets.token_hex(3)}"
    paths = [fl.workdir / f"{run}-node{i}.jsonl" for i in range(len(fl.nodes))]
    results: list[list[traffic.TurnResult]] = [[] for _ in fl.nodes]
    errors: list[BaseException] = []
    client = fl.client

    def clients(i: int) -> None:
        try:
            # Each node's clients run their own sessions (their own nonce).
            results[i], _ = client.call(chatload.drive_blocking, url, p.workload,
                                        f"{run}n{i}", model, progress=paths[i],
                                        cgroup=fl.nodes[i].cgroup, timeout=p.seconds + 600)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=clients, args=(i,), daemon=True) for i in
               range(len(fl.nodes))]
    reviver: threading.Thread | None = None
    turns = Turns(paths)
    watch.reset()
    before, opens = watch.prefix(), bench_llm.breaker_opens(fl)
    started = time.monotonic()
    for th in threads:
        th.start()
    state, killed, revived = "steady", False, False
    while any(th.is_alive() for th in threads):
        elapsed = time.monotonic() - started
        show(_view(fl, watch, turns, f"{policy}: {url}  |  {state}", elapsed))
        if not killed and elapsed >= p.kill_at:
            fl.kill_engine(VICTIM)
            killed, state = True, f"{VICTIM} killed at t={p.kill_at:.0f}s"
            note(state)
        elif killed and not revived and elapsed >= p.revive_at:
            # A vLLM engine takes a while to start: the traffic goes on meanwhile.
            reviver = threading.Thread(target=fl.start_engine, args=(VICTIM,), daemon=True)
            reviver.start()
            revived, state = True, state + f", started again at t={p.revive_at:.0f}s"
            note(state)
        time.sleep(0.5)
    wall = time.monotonic() - started
    if reviver is not None:
        reviver.join(300)
    if errors:
        raise errors[0]
    time.sleep(0.5)  # the engines count a step's stats just after it
    all_turns = [t for r in results for t in r]
    row = chatload.summarize(all_turns, wall, chatload.prefix_delta(before, watch.prefix()),
                             list(watch.samples))
    row["policy"] = policy
    row["breaker_opens"] = bench_llm.breaker_opens(fl) - opens
    return row


def _active_everywhere(fl: fleet.Fleet, name: str) -> bool:
    ident = fl.engine_id(name)
    return all(fl.backends(n)[ident]["state"] == "active" for n in range(len(fl.nodes)))


def _summary(rows: list[dict[str, Any]]) -> Table:
    t = Table(title="the same workload, the same engine killed midway", title_justify="left")
    t.add_column("")
    for r in rows:
        t.add_column(r["policy"], justify="right")

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.1%}"

    lines: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("TTFT p50", lambda r: f"{r['ttft_ms']['p50']} ms"),
        ("TTFT p99", lambda r: f"{r['ttft_ms']['p99']} ms"),
        ("prefix-cache hit ratio (engines' metrics)", lambda r: pct(r["prefix_cache_hit_ratio"])),
        ("tokens/s", lambda r: str(r["tokens_per_s"])),
        ("turns on the previous turn's engine", lambda r: pct(r["turns_on_previous_engine"])),
        ("load imbalance (max/mean running)", lambda r: str(r["imbalance_running"])),
        ("requests (failed)", lambda r: f"{r['requests']} ({r['failed']})"),
        ("breaker openings (the killed engine's re-opens included)",
         lambda r: str(r["breaker_opens"])),
    ]
    for label, fmt in lines:
        t.add_row(label, *(fmt(r) for r in rows))
    if all(r["turns_on_previous_engine"] is None for r in rows):
        t.caption = ("which engine served a turn comes from the simulator's X-Engine-ID "
                     "header; vLLM sends none")
    return t


def story(engine: str = "sim", seconds: float = 60.0,
          vllm_venv: Path = vllm_engine.DEFAULT_VENV) -> dict[str, Any]:
    """The demo; returns both phases' rows and the checks, after teardown."""
    logging.getLogger("httpx").setLevel(logging.WARNING)
    p = plan(engine, seconds)
    kind = "real vLLM CPU engines" if engine == "vllm" else "simulated vLLM engines"
    console.rule("[bold]kvroute demo: session-affine LLM routing in the kernel")
    if engine == "vllm":
        console.print(f"{p.engines} vLLM engines (not 4): they share this machine's cores; "
                      "each takes a minute or so to start")
    options = bench_llm.fleet_options(engine)
    with fleet.Fleet(engines=p.engines, nodes=2, engine=engine, vllm_venv=vllm_venv,
                     extra_services=[RANDOM_SERVICE], **options) as fl:
        if not fleet.wait_for(fl.converged, 60):
            raise RuntimeError(f"the agents never converged:\n{fl.log('controller')}")
        ids = ", ".join(fl.engine_id(n) for n in fl.engines)
        console.print(f"lab: {p.engines} {kind} ({ids}), controller, agents node0 and "
                      f"node1; {p.workload.users} chat users behind each node, "
                      f"{p.workload.turns}-turn chats, streaming")
        urls = {n: f"http://{fl.engine_id(n)}" for n in fl.engines}
        model = chatload.warm(urls[next(iter(fl.engines))])
        live = Live(console=console, refresh_per_second=4) if console.is_terminal else None
        rows = []
        last: list[Group] = []  # the latest view

        def show(view: Group) -> None:
            last[:] = [view]
            if live:
                live.update(view)

        def note(event: str) -> None:
            if not live and last:  # a log (CI) gets the view before each event
                console.print(last[0])
            console.print(f"[bold]{event}")

        with chatload.EngineWatch(urls, 0.5 if engine == "vllm" else 0.25) as watch:
            for policy, url, what in (
                    ("kvroute", f"http://{fl.vip}:{fl.port}",
                     "session affinity + bounded load, fleet-wide"),
                    ("random", f"http://{bench_llm.RANDOM_VIP}:{fl.port}",
                     "a random engine per connection, as kube-proxy")):
                console.rule(f"{policy}: {what}, {p.seconds:.0f} s; {VICTIM} killed at "
                             f"t={p.kill_at:.0f}s, started again at t={p.revive_at:.0f}s")
                last.clear()
                with live or contextlib.nullcontext():
                    row = phase(fl, p, watch, policy, url, model, show, note)
                if not live and last:
                    console.print(last[0])
                rows.append(row)
                # The victim back in every node's table before the next phase.
                row["victim_back"] = fleet.wait_for(lambda: _active_everywhere(fl, VICTIM), 60)
        console.rule("summary")
        console.print(_summary(rows))
        console.rule("kvroute maps backends (node0)")
        console.print(fleet.kvroute("maps", "backends", "--pin-dir", str(fl.nodes[0].pin_dir)))
    console.rule("torn down: agents detached, controller stopped, namespaces deleted")
    kv, rnd = rows
    # What a kill may cost: the turns in flight on the victim (at most every user of
    # both nodes) and the connects the kernel lets through before it trips the engine.
    bound = 2 * p.workload.users + fl.fail_k
    checks = {
        "kvroute hits the prefix cache more than random": (
            (kv["prefix_cache_hit_ratio"] or 0) > (rnd["prefix_cache_hit_ratio"] or 0)),
        f"kvroute failed requests <= {bound}": kv["failed"] <= bound,
        f"{VICTIM} back in every table after each phase": kv["victim_back"] and rnd["victim_back"],
    }
    for what, ok in checks.items():
        console.print(f"{'ok  ' if ok else 'FAIL'} {what}")
    return {"plan": dataclasses.asdict(p), "rows": rows, "checks": checks}


def run(engine: str = "sim", seconds: float = 60.0,
        vllm_venv: Path = vllm_engine.DEFAULT_VENV) -> int:
    result = story(engine, seconds, vllm_venv)
    return 0 if all(result["checks"].values()) else 1
