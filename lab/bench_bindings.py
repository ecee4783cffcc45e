"""What fleet-wide session bindings cost: the real controller gRPC server, simulated agents.

The controller runs in a process of its own (so its CPU is its own), holding ``--live``
bindings whose last touches are spread over one affinity timeout (so expiries run at
live/timeout a second, the steady state of ``--rate`` new sessions a second when
live = rate x timeout). ``--agents`` simulated agents, asyncio clients in one process,
each open the watch stream (counting the bytes they receive) and a ReportBindings stream
carrying their share of the new sessions and of the touches (a live session is touched at
most 4 times a timeout on a node), batched every ``--batch`` seconds as agents do. Agent 0
also binds a probe session every 100 ms; the time until the last agent holds it is the
fan-out latency.

    python -m lab.bench_bindings --agents 100 --rate 2000 --live 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc.aio

from controller import bindings as table_mod
from controller import grpc_server
from dataplane import bindings, model
from dataplane.api import convert
from dataplane.api.pb import kvroute_pb2 as pb
from dataplane.api.pb import kvroute_pb2_grpc as pb_grpc
from lab import fleet

SERVICE = "chat"
PROBE_BASE = 0xF000_0000_0000_0000


def _snapshot(engines: int, timeout: int) -> model.Snapshot:
    backends = tuple(model.Backend(f"10.{1 + i // 250}.{i % 250}.1", 8000) for i in range(engines))
    svc = model.Service(name=SERVICE, vip="10.96.0.10", port=80, protocol=model.Protocol.TCP,
                        affinity=model.Affinity.SESSION, affinity_timeout=timeout,
                        table_size=model.auto_table_size("session", engines),
                        epsilon=0.25, probe_share=0.05, backends=backends)
    return model.Snapshot.of(1, (svc,))


def _identities(snap: model.Snapshot) -> list[str]:
    svc = snap.desired.services[0]
    return [model.backend_identity(b.address, b.port, "tcp") for b in svc.backends]


def _owner(idents: list[str], key: int) -> str:
    """The engine a preloaded session is bound to (its touches name the same one)."""
    return idents[key % len(idents)]


# -- the controller process -----------------------------------------------------------


async def _serve(port: int, live: int, timeout: int, engines: int) -> None:
    snap = _snapshot(engines, timeout)
    idents = _identities(snap)
    table = table_mod.BindingTable()
    table.set_snapshot(snap)
    now = time.monotonic()
    chunk = max(100, live // 1000)
    for start in range(0, live, chunk):
        n = min(chunk, live - start)
        # touched uniformly over the last timeout: expiries then run at live/timeout a second
        at = now - timeout + timeout * (start + n / 2) / live
        rows = [(SERVICE, _owner(idents, 1 + start + i), "", 1 + start + i) for i in range(n)]
        table.report(bindings.Report("preload", "preload", bindings.group(rows)), at)
    table.take()
    publisher = grpc_server.Publisher()
    publisher.publish(snap)
    server = grpc_server.ControlServer(publisher, bindings=table)
    await server.start(f"127.0.0.1:{port}")
    print(json.dumps({"ready": True, "live": len(table)}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    stats = table.stats
    print(json.dumps({"live": len(table), "accepted": stats.accepted, "expired": stats.expired,
                      "conflicts": stats.conflicts, "relearned": stats.relearned,
                      "binding_reports": server.binding_reports}), flush=True)
    await server.stop(grace=0.1)


# -- the agents process ---------------------------------------------------------------


class _Sim:
    def __init__(self, i: int, target: str, idents: list[str], per_agent_rate: float,
                 per_agent_touch: float, batch: float, live: int) -> None:
        self.i, self.target, self.idents = i, target, idents
        self.rate, self.touch_rate, self.batch, self.live = (per_agent_rate, per_agent_touch,
                                                             batch, live)
        self.bytes = 0
        self.messages = 0
        self.keys = 0  # bound keys received, the table dump included
        self.loaded_at: float | None = None  # when the dump had arrived whole
        self.probes: dict[int, float] = {}  # probe key -> receive time
        self.rng = random.Random(i)
        self.next_key = 2**40 * (i + 1)

    async def watch(self, stub: Any, counting: asyncio.Event) -> None:
        call = stub.WatchSnapshots(pb.WatchRequest(agent_id=f"sim-{self.i}", node=f"n{self.i}"))
        async for update in call:
            if counting.is_set():
                self.bytes += update.ByteSize()
                self.messages += 1
            if update.WhichOneof("update") == "bindings":
                now = time.monotonic()
                self.keys += sum(len(g.keys) for g in update.bindings.bound)
                if self.loaded_at is None and self.keys >= self.live:
                    self.loaded_at = now
                for g in update.bindings.bound:
                    for k in g.keys:
                        if k >= PROBE_BASE:
                            self.probes.setdefault(k, now)

    async def reports(self, probe_sent: dict[int, float]) -> AsyncIterator[pb.BindingReport]:
        carry_new = carry_touch = 0.0
        probe_at = time.monotonic()
        probe = 0
        while True:
            await asyncio.sleep(self.batch)
            carry_new += self.rate * self.batch
            carry_touch += self.touch_rate * self.batch
            rows = []
            for _ in range(int(carry_new)):
                self.next_key += 1
                rows.append((SERVICE, self.idents[self.rng.randrange(len(self.idents))], "",
                             self.next_key))
            carry_new -= int(carry_new)
            touched = [1 + self.rng.randrange(self.live) for _ in range(int(carry_touch))]
            touches = [(SERVICE, _owner(self.idents, k), "", k) for k in touched]
            carry_touch -= int(carry_touch)
            if self.i == 0 and time.monotonic() - probe_at >= 0.1:
                probe_at = time.monotonic()
                probe += 1
                key = PROBE_BASE + probe
                probe_sent[key] = probe_at
                rows.append((SERVICE, self.idents[0], "", key))
            if rows or touches:
                rep = bindings.Report(f"sim-{self.i}", f"n{self.i}", bindings.group(rows),
                                      bindings.group(touches))
                yield convert.binding_report_to_pb(rep)


async def _agents(target: str, n: int, rate: float, live: int, timeout: int, engines: int,
                  batch: float, warmup: float, seconds: float, pid: int) -> dict[str, Any]:
    idents = _identities(_snapshot(engines, timeout))
    touch_rate = live * 4 / timeout  # fleet-wide, at most 4 touches a timeout a session
    sims = [_Sim(i, target, idents, rate / n, touch_rate / n, batch, live) for i in range(n)]
    counting = asyncio.Event()
    probe_sent: dict[int, float] = {}
    channels = [grpc.aio.insecure_channel(target) for _ in range(n)]
    tasks = []
    for sim, ch in zip(sims, channels, strict=True):
        stub = pb_grpc.ControlStub(ch)
        tasks.append(asyncio.create_task(sim.watch(stub, counting)))
        tasks.append(asyncio.ensure_future(stub.ReportBindings(sim.reports(probe_sent))))
    opened = time.monotonic()
    # every stream open and its table dump received whole (or the warm-up is over)
    while time.monotonic() - opened < warmup and not all(s.loaded_at for s in sims):
        await asyncio.sleep(0.1)
    loaded = [s.loaded_at - opened for s in sims if s.loaded_at is not None]
    await asyncio.sleep(0.5)
    counting.set()
    started = time.monotonic()
    cpu0 = cpu_seconds(pid)
    await asyncio.sleep(seconds)
    elapsed = time.monotonic() - started
    cpu = cpu_seconds(pid) - cpu0
    counting.clear()
    await asyncio.sleep(1.0)  # the last probes land
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for ch in channels:
        await ch.close(grace=None)
    lat = []
    for key, sent in probe_sent.items():
        if not started <= sent <= started + elapsed:
            continue  # sent while the table dumps were still going out
        got = [s.probes.get(key) for s in sims]
        if all(g is not None for g in got):
            lat.append(max(got) - sent)  # type: ignore[type-var,operator]
    lat.sort()
    per_agent = [s.bytes / elapsed for s in sims]
    return {
        "controller_cpu": round(cpu / elapsed, 3),
        "dump_all_agents_s": round(max(loaded), 1) if len(loaded) == n else None,
        "seconds": round(elapsed, 1),
        "bytes_per_agent_s": round(statistics.mean(per_agent)),
        "messages_per_agent_s": round(statistics.mean(s.messages / elapsed for s in sims), 1),
        "probes": len(lat), "probes_sent": len(probe_sent),
        "fanout_p50_ms": round(lat[len(lat) // 2] * 1000, 1) if lat else None,
        "fanout_p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000, 1)
        if lat else None,
    }


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run(agents: int = 100, rate: float = 2000, live: int = 1_000_000, timeout: int = 500,
        engines: int = 64, batch: float = 0.05, seconds: float = 20.0,
        port: int = 0) -> dict[str, Any]:
    port = port or fleet.free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lab.bench_bindings", "--serve", str(port), "--live", str(live),
         "--timeout", str(timeout), "--engines", str(engines)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())
        assert ready.get("ready"), ready
        rss_loaded = _rss_mb(proc.pid)
        result = asyncio.run(_agents(f"127.0.0.1:{port}", agents, rate, live, timeout, engines,
                                     batch, 120.0, seconds, proc.pid))
        proc.send_signal(signal.SIGTERM)
        tail = json.loads(proc.stdout.readline())
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    return {"bench": f"bindings {agents} agents, {rate:g} new/s, {live} live",
            "controller_rss_mb": round(rss_loaded),
            **result, "live_after": tail["live"], "expired": tail["expired"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--agents", type=int, default=100)
    ap.add_argument("--rate", type=float, default=2000, help="new sessions/s, fleet-wide")
    ap.add_argument("--live", type=int, default=1_000_000)
    ap.add_argument("--timeout", type=int, default=500, help="affinity timeout, seconds")
    ap.add_argument("--engines", type=int, default=64)
    ap.add_argument("--batch", type=float, default=0.05, help="agent batching, seconds")
    ap.add_argument("--seconds", type=float, default=20.0)
    args = ap.parse_args(argv)
    if args.serve:
        asyncio.run(_serve(args.serve, args.live, args.timeout, args.engines))
        return 0
    print(json.dumps(run(args.agents, args.rate, args.live, args.timeout, args.engines,
                         args.batch, args.seconds), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
