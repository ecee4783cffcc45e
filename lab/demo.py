"""`make demo`: kvroute end to end on one machine.

A fleet of simulated vLLM engines in pod namespaces, the controller on a
static discovery file, and two node agents (two cgroups, two pin dirs).
Tagged multi-turn sessions go through the Service VIP; the demo shows that
each session keeps its engine (and its KV cache) on both nodes, that sessions
started through one node while an engine's weight was cut reach the same
engine through the other node after the weight moved back, then kills an
engine midway under live traffic while a live view shows breakers, loads and
routing react, brings it back, prints the kernel maps and tears down.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from typing import Any

import httpx
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from lab import fleet

console = Console(highlight=False)


def _affinity_table(title: str, counts: collections.Counter[str], names: dict[str, str]) -> Table:
    t = Table(title=title, box=None, title_justify="left")
    t.add_column("engine")
    t.add_column("connections", justify="right")
    for ident, name in names.items():
        t.add_row(f"{name} ({ident})", str(counts[ident]))
    errors = sum(v for k, v in counts.items() if k.startswith("error"))
    if errors:
        t.add_row("refused", str(errors))
    return t


class Traffic:
    """Sessions in a loop from node 0's clients, counting where each connect went."""

    def __init__(self, fl: fleet.Fleet, sessions: int) -> None:
        self.fl = fl
        self.ids = [f"live-{i}" for i in range(sessions)]
        self.window: collections.deque[tuple[float, str]] = collections.deque()
        self.errors = 0
        # Of those, connects the kernel let through to the dead engine and the engine
        # refused: what the kernel's trip after K bounds. The others were requests in
        # flight on the engine when it died (reset, or no answer).
        self.refused = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            for engine in self.fl.sessions(0, list(self.ids[:25])):
                self.window.append((time.monotonic(), engine))
                if engine.startswith("error"):
                    self.errors += 1
                    self.refused += engine == "error:Connection refused"
            self.ids = self.ids[25:] + self.ids[:25]

    def recent(self, seconds: float = 2.0) -> collections.Counter[str]:
        cutoff = time.monotonic() - seconds
        while self.window and self.window[0][0] < cutoff:
            self.window.popleft()
        return collections.Counter(e for _, e in self.window)


def _live_view(fl: fleet.Fleet, traffic: Traffic, names: dict[str, str], note: str) -> Group:
    try:
        status = httpx.get(f"http://127.0.0.1:{fl.controller_http}/engines", timeout=1,
                           trust_env=False).json()
    except (httpx.HTTPError, ValueError):
        status = {"engines": [], "agents": [], "version": "?"}
    kernel = fl.backends(0)
    recent = traffic.recent()
    t = Table(box=None, title=f"live view: snapshot {status['version']}  |  {note}",
              title_justify="left")
    for col in ("engine", "node", "breaker", "kernel", "running", "kv", "weight", "conn/2s"):
        t.add_column(col, no_wrap=True)
    for e in sorted(status["engines"], key=lambda e: e["identity"]):
        ident = e["identity"].split("/")[0]
        load: dict[str, Any] = e.get("load") or {}
        k = kernel.get(ident, {})
        t.add_row(names.get(ident, ident), str(e.get("node") or "-"), e["breaker"],
                  k.get("state", "-") + ("*" if k.get("kernel_tripped") else ""),
                  str(int(load.get("running", 0))), f"{load.get('kv_usage', 0):.0%}",
                  str(e.get("weight", "-")), str(recent[ident]))
    agents = ", ".join(f"{a['agent_id']} v{a['applied_version']}"
                       f"{' ok' if a['converged'] else ' behind'}" for a in status["agents"])
    return Group(t, f"agents: {agents}   refused connects so far: {traffic.errors}")


def run(pods: int = 3, sessions: int = 200) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    console.rule("[bold]kvroute demo: in-kernel, load- and breaker-aware session routing")
    with fleet.Fleet(engines=pods, nodes=2) as fl:
        names = {fl.engine_id(n): n for n in fl.engines}
        console.print(f"lab: {pods} simulated vLLM engines "
                      f"({', '.join(f'{n}={fl.engine_id(n)}' for n in fl.engines)}), "
                      f"controller on 127.0.0.1:{fl.controller_port}, agents node0 and node1")
        assert fleet.wait_for(fl.converged, 30), fl.log("controller")

        ids = [f"user-{i}" for i in range(sessions)]
        turns = [fl.sessions(0, ids) for _ in range(3)]
        sticky = sum(1 for i in range(sessions) if len({t[i] for t in turns}) == 1)
        console.print(_affinity_table(f"{sessions} sessions x 3 turns through "
                                      f"{fl.vip}:{fl.port} from node0",
                                      collections.Counter(e for t in turns for e in t), names))
        console.print(f"sessions that kept one engine (and its KV cache) on every turn: "
                      f"[bold]{sticky}/{sessions}[/bold]")
        other = fl.sessions(1, ids)
        same = sum(1 for a, b in zip(turns[0], other, strict=True) if a == b)
        console.print(f"the same sessions from node1 (another agent, its own maps): "
                      f"[bold]{same}/{sessions}[/bold] reach the same engine")

        console.rule("load gpu1 (its weight drops), start sessions through node0, "
                     "then look them up through node1")
        busy = [f"busy-{i}" for i in range(100)]
        with fl.loaded("gpu1"):
            on0 = fl.sessions(0, busy)
        console.print(_affinity_table("100 new sessions through node0 while gpu1 was loaded",
                                      collections.Counter(on0), names))
        on1 = fl.sessions(1, busy)
        kept = sum(1 for a, b in zip(on0, on1, strict=True) if a == b)
        console.print(f"after the load ended and weights moved back, through node1: "
                      f"[bold]{kept}/{len(busy)}[/bold] reach the engine node0 bound them to "
                      "(bindings are fleet-wide: node1's kernel got them from the controller)")

        console.rule("kill gpu1 under live traffic, then bring it back")
        traffic = Traffic(fl, sessions)
        traffic.thread.start()
        note = "steady"
        started = time.monotonic()
        at_crash = refused = 0
        # A terminal gets a live view; a log (CI) gets the view at each phase's end.
        live = Live(console=console, refresh_per_second=4) if console.is_terminal else None
        shown: set[str] = set()
        with live or contextlib.nullcontext():
            while (elapsed := time.monotonic() - started) < 12:
                if elapsed > 3 and note == "steady":
                    fl.fault("gpu1", crash=True)
                    note = "gpu1 crashed at t=3s"
                if elapsed > 7 and note == "gpu1 crashed at t=3s":
                    at_crash, refused = traffic.errors, traffic.refused
                    fl.start_engine("gpu1")
                    note = "gpu1 crashed at t=3s, restarted at t=7s"
                view = _live_view(fl, traffic, names, f"t={elapsed:.0f}s {note}")
                if live:
                    live.update(view)
                else:
                    phase = "3" if elapsed > 2.5 and elapsed < 3 else \
                        "7" if 6.5 < elapsed < 7 else "12" if elapsed > 11.5 else ""
                    if phase and phase not in shown:
                        shown.add(phase)
                        console.print(view)
                time.sleep(0.25)
        traffic.stop.set()
        traffic.thread.join(30)
        console.print(f"refused connects while gpu1 was down: [bold]{refused}[/bold] (the "
                      f"kernel trips an engine after {fl.fail_k} refused connects; the "
                      "controller then opens its breaker on every node); requests lost in "
                      f"flight when it died: {at_crash - refused}; failed after its restart: "
                      f"{traffic.errors - at_crash} (half-open probes before it listened)")
        fl.fault("gpu1", latency_ms=0)  # wait until it is back in every table
        fleet.wait_for(lambda: fl.backends(0)[fl.engine_id("gpu1")]["state"] == "active", 20)

        pin = str(fl.nodes[0].pin_dir)
        for args in (["maps", "services"], ["maps", "backends"],
                     ["explain", f"{fl.vip}:{fl.port}", "--session", "user-7"]):
            console.rule("kvroute " + " ".join(args) + " (node0)")
            console.print(fleet.kvroute(*args, "--pin-dir", pin))
        ok = (sticky == sessions and same == sessions and kept == len(busy)
              and refused <= fl.fail_k)
    console.rule("torn down: agents detached, controller stopped, namespaces deleted")
    return 0 if ok else 1
