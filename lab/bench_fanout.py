"""What engine loads cost the controller at fleet scale: the real gRPC server
(controller/grpc_server.py) fanning load changes out to ``--agents`` simulated agents.

Three kinds of process, on the same CPUs:

* the controller: a ``ControlServer`` and its ``Publisher`` holding one service of
  ``--engines`` engines (EngineRefs, so their loads are accepted), alone in its process so
  its CPU time is its own;
* ``--procs`` agent processes, each running its share of the agents as asyncio clients,
  one channel and one ``WatchSnapshots`` stream per agent (messages are counted as
  received bytes, and parsed only when they carry the probe engine);
* this process, the load generator: an agent's ``Report`` stream (as a node's agent
  reports its engines' scrapes, every second in a real fleet), in phases of ``--phases``
  RATExENGINES: that many reports a second, each changing that many engines' loads, for
  ``--seconds``. Every report carries the probe engine with a value that only grows; the
  time until the last agent holds that value (or a later one) is the fan-out latency.
  Times are CLOCK_MONOTONIC, one clock for every process on the machine.

The first phase sends nothing: the same server with the same agents and no changes is
the baseline every CPU figure is compared with. Phases of the same report rate and more
engines a report separate what a message costs from what an entry in it costs.

    python -m lab.bench_fanout --agents 1000 --phases 0x0,10x1,10x8,10x64
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc.aio

from controller import grpc_server
from dataplane import enginemetrics, model, reports, scraper
from dataplane.api import convert
from dataplane.api.pb import kvroute_pb2 as pb
from dataplane.api.pb import kvroute_pb2_grpc as pb_grpc
from lab import bench_bindings, fleet

WATCH = "/kvroute.v1.Control/WatchSnapshots"
KEEP_LATENCIES = 400  # per rate, in the results file (for the distribution plot)


def identity(i: int) -> str:
    return model.backend_identity(f"10.{1 + i // 250}.{i % 250}.1", 8000, "tcp")


def snapshot(engines: int, agents: int) -> model.Snapshot:
    """One service of ``engines`` engines spread over ``agents`` nodes."""
    backends = tuple(model.Backend(f"10.{1 + i // 250}.{i % 250}.1", 8000)
                     for i in range(engines))
    refs = tuple(model.EngineRef(identity(i), f"http://10.{1 + i // 250}.{i % 250}.1:8000"
                                 "/metrics", f"http://10.{1 + i // 250}.{i % 250}.1:8000/health",
                                 node=f"n{i % agents}") for i in range(engines))
    svc = model.Service(name="chat", vip="10.96.0.10", port=80, protocol=model.Protocol.TCP,
                        affinity=model.Affinity.SESSION, affinity_timeout=600,
                        table_size=model.auto_table_size("session", engines), epsilon=0.25,
                        probe_share=0.05, backends=backends)
    return model.Snapshot.of(1, (svc,), refs)


# -- the controller process -----------------------------------------------------------


async def _serve(port: int, engines: int, agents: int) -> None:
    publisher = grpc_server.Publisher()
    publisher.publish(snapshot(engines, agents))
    server = grpc_server.ControlServer(publisher, max_agents=agents + 16)
    await server.start(f"127.0.0.1:{port}")
    print(json.dumps({"ready": True}), flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(grace=0.1)


# -- an agents process ----------------------------------------------------------------


async def _agents(target: str, first: int, count: int, probe: bytes) -> None:
    """Watch streams until SIGTERM; then one JSON line: bytes and messages received per
    whole second of the monotonic clock (summed over this process's agents), and per
    agent the (probe value, arrival) pairs in arrival order."""
    per_second: dict[int, list[int]] = collections.defaultdict(lambda: [0, 0])
    seen: list[list[tuple[int, float]]] = [[] for _ in range(count)]
    got_first = [False] * count
    probe_ident = probe.decode()

    async def watch(k: int, ch: grpc.aio.Channel) -> None:
        call = ch.unary_stream(WATCH, request_serializer=pb.WatchRequest.SerializeToString,
                               response_deserializer=None)
        request = pb.WatchRequest(agent_id=f"sim-{first + k}", node=f"n{first + k}")
        async for raw in call(request):
            now = time.monotonic()
            bucket = per_second[int(now)]
            bucket[0] += len(raw)
            bucket[1] += 1
            got_first[k] = True
            if probe in raw:
                update = pb.SnapshotUpdate.FromString(raw)
                if update.WhichOneof("update") == "loads":
                    for entry in update.loads.loads:
                        if entry.identity == probe_ident:
                            seen[k].append((entry.load, now))

    channels = [grpc.aio.insecure_channel(target) for _ in range(count)]
    tasks = [asyncio.create_task(watch(k, ch)) for k, ch in enumerate(channels)]
    while not all(got_first):
        await asyncio.sleep(0.05)
    print(json.dumps({"ready": True}), flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    print(json.dumps({"per_second": {str(k): v for k, v in per_second.items()},
                      "seen": seen}), flush=True)
    for ch in channels:
        await ch.close(grace=None)


# -- the load generator ---------------------------------------------------------------


def _report(loads: dict[str, int]) -> pb.AgentReport:
    """An agent's report of engines whose running requests are ``value``/1000 (so their
    load units are exactly ``value``)."""
    scrapes = tuple(scraper.ScrapeResult(
        ident, True, True, 0.001,
        enginemetrics.EngineLoad(running=value / model.LOAD_PER_REQUEST, waiting=0.0,
                                 kv_usage=0.0, kv_family=enginemetrics.KV_USAGE, engines=1),
        None) for ident, value in loads.items())
    return convert.report_to_pb(reports.AgentReport("loadgen", "loadgen", 0, "",
                                                    engines=scrapes))


Phase = tuple[float, int]  # reports a second, engines whose load changed in each


async def _generate(target: str, engines: int, phases: Sequence[Phase], seconds: float,
                    controller_pid: int, agent_pids: Sequence[int]) -> list[dict[str, Any]]:
    """Each phase for ``seconds``: reports sent with their send times (each carries the
    probe engine's next value), and the CPU seconds of the controller and of the agent
    processes over the phase."""

    def agents_cpu() -> float:
        return sum(bench_bindings.cpu_seconds(pid) for pid in agent_pids)

    queue: asyncio.Queue[pb.AgentReport] = asyncio.Queue()

    async def requests() -> AsyncIterator[pb.AgentReport]:
        while True:
            yield await queue.get()

    out = []
    probe_value = 1000  # only grows, so "this value or a later one" is well defined
    other = 0
    async with grpc.aio.insecure_channel(target) as ch:
        call = pb_grpc.ControlStub(ch).Report(requests())
        for rate, per_report in phases:
            await asyncio.sleep(1.0)  # the previous phase's messages drain
            cpu0, agents0 = bench_bindings.cpu_seconds(controller_pid), agents_cpu()
            started = time.monotonic()
            probes: list[tuple[int, float]] = []
            while rate and time.monotonic() - started < seconds:
                probe_value += 1000
                loads = {identity(0): probe_value}
                for _ in range(per_report - 1):
                    other = other % (engines - 1) + 1
                    loads[identity(other)] = probe_value  # a new value: a change
                queue.put_nowait(_report(loads))
                probes.append((probe_value, time.monotonic()))
                await asyncio.sleep(max(0.0, started + len(probes) / rate - time.monotonic()))
            if not rate:
                await asyncio.sleep(seconds)
            elapsed = time.monotonic() - started
            out.append({"rate": rate, "per_report": per_report, "started": started,
                        "seconds": elapsed, "probes": probes,
                        "cpu": bench_bindings.cpu_seconds(controller_pid) - cpu0,
                        "agents_cpu": agents_cpu() - agents0})
        await asyncio.sleep(1.0)  # the last probes land
        call.cancel()
    return out


def wire_sizes() -> tuple[int, float]:
    """Bytes of a loads message on the wire: its fixed part, and each entry (engine
    identities of this bench's length, loads of 7 digits). From the encoder, not from
    the run: under load the agents' receive counts lag the phase they belong to."""
    one = convert.loads_update({identity(1): 1_000_000}).ByteSize()
    many = convert.loads_update({identity(i): 1_000_000 for i in range(1, 9)}).ByteSize()
    entry = (many - one) / 7
    return round(one - entry), entry


def _phase_row(phase: dict[str, Any], agents: int, per_second: dict[int, list[int]],
               seen: list[list[tuple[int, float]]]) -> dict[str, Any]:
    """One rate's row: CPU, bytes and messages per agent per second (whole seconds inside
    the phase), and the probes' fan-out latencies."""
    start, seconds = phase["started"], phase["seconds"]
    inside = [s for s in per_second if start <= s and s + 1 <= start + seconds]
    received = [per_second[s] for s in inside]
    span = max(1, len(inside))
    latencies, firsts, middles = [], [], []
    for value, sent_at in phase["probes"]:
        times = []
        for arrivals in seen:
            t = next((at for v, at in arrivals if v >= value), None)
            if t is None:
                break
            times.append(t - sent_at)
        else:
            times.sort()
            latencies.append(times[-1])
            firsts.append(times[0])
            middles.append(times[len(times) // 2])
    latencies.sort()
    row: dict[str, Any] = {
        "bench": f"load fan-out, {agents} agents, {phase['rate']:g} reports/s x "
                 f"{phase['per_report']} engines",
        "reports_per_s": round(len(phase["probes"]) / seconds, 1),
        "engines_per_report": phase["per_report"],
        "changes_per_s": round(len(phase["probes"]) * phase["per_report"] / seconds, 1),
        "controller_cpu": round(phase["cpu"] / seconds, 3),
        # the simulated agents' own CPU: near the machine's free cores, their queueing is
        # part of the latencies
        "agents_cpu": round(phase["agents_cpu"] / seconds, 3),
        "bytes_per_agent_s": round(sum(b for b, _ in received) / span / agents),
        "messages_per_agent_s": round(sum(m for _, m in received) / span / agents, 1),
        "probes": len(latencies), "probes_sent": len(phase["probes"]),
        "seconds": round(seconds, 1)}
    if latencies:
        row["fanout_p50_ms"] = round(latencies[len(latencies) // 2] * 1e3, 1)
        row["fanout_p99_ms"] = round(latencies[min(len(latencies) - 1,
                                                   int(len(latencies) * 0.99))] * 1e3, 1)
        # where the time goes: the first agent to hold a change, the median agent
        row["first_agent_p50_ms"] = round(statistics.median(firsts) * 1e3, 1)
        row["median_agent_p50_ms"] = round(statistics.median(middles) * 1e3, 1)
        step = max(1, len(latencies) // KEEP_LATENCIES)
        row["latencies_ms"] = [round(x * 1e3, 2) for x in latencies[::step]]
    return row


def _spawn(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "lab.bench_fanout", *args],
                            stdout=subprocess.PIPE, text=True)


def _ready(proc: subprocess.Popen[str], what: str) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line or not json.loads(line).get("ready"):
        raise RuntimeError(f"{what} did not start (exit {proc.poll()})")


PHASES: tuple[Phase, ...] = ((0, 0), (10, 1), (10, 8), (10, 32))


def run(agents: int = 1000, engines: int = 1000, phases: Sequence[Phase] = PHASES,
        seconds: float = 8.0, procs: int = 2) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The rows (one per phase) and the run's settings."""
    if not phases or phases[0][0] != 0:
        raise ValueError("the first phase must send nothing: the idle baseline")
    if engines < 2 or agents < 1 or procs < 1:
        raise ValueError("need engines >= 2, agents >= 1, procs >= 1")
    if seconds < 2:
        raise ValueError("need seconds >= 2: bytes are counted over whole seconds inside "
                         "a phase")
    if any(rate < 0 or not 0 <= k <= engines for rate, k in phases):
        raise ValueError(f"phases: reports/s >= 0 and 0..{engines} engines a report")
    port = fleet.free_port()
    target = f"127.0.0.1:{port}"
    server = _spawn(["--serve", str(port), "--engines", str(engines), "--agents", str(agents)])
    children: list[subprocess.Popen[str]] = []
    try:
        _ready(server, "the controller")
        share = -(-agents // procs)
        for first in range(0, agents, share):
            children.append(_spawn(["--watch", target, "--first", str(first), "--count",
                                    str(min(share, agents - first))]))
        for child in children:
            _ready(child, "an agents process")
        done = asyncio.run(_generate(target, engines, phases, seconds, server.pid,
                                     [c.pid for c in children]))
        per_second: dict[int, list[int]] = collections.defaultdict(lambda: [0, 0])
        seen: list[list[tuple[int, float]]] = []
        for child in children:
            child.send_signal(signal.SIGTERM)
            out, _ = child.communicate(timeout=60)
            got = json.loads(out.strip().splitlines()[-1])
            for k, (b, m) in got["per_second"].items():
                per_second[int(k)][0] += b
                per_second[int(k)][1] += m
            seen.extend([(v, t) for v, t in a] for a in got["seen"])
    finally:
        for proc in (*children, server):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    rows = [_phase_row(p, agents, per_second, seen) for p in done]
    overhead, entry = wire_sizes()
    return rows, {"agents": agents, "engines": engines, "agent_processes": len(children),
                  "seconds_per_phase": seconds, "message_overhead_bytes": overhead,
                  "entry_bytes": round(entry, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--watch", help=argparse.SUPPRESS)
    ap.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--agents", type=int, default=1000)
    ap.add_argument("--engines", type=int, default=1000)
    ap.add_argument("--phases", default=",".join(f"{r:g}x{k}" for r, k in PHASES),
                    help="RATExENGINES,...: reports a second, each changing that many "
                         "engines' loads; the first must be 0x0 (the idle baseline)")
    ap.add_argument("--seconds", type=float, default=8.0, help="per phase")
    ap.add_argument("--procs", type=int, default=2, help="agent processes")
    args = ap.parse_args(argv)
    if args.serve:
        asyncio.run(_serve(args.serve, args.engines, args.agents))
        return 0
    if args.watch:
        asyncio.run(_agents(args.watch, args.first, args.count, identity(0).encode()))
        return 0
    try:
        phases = [(float(r), int(k)) for r, k in (p.split("x") for p in args.phases.split(","))]
        rows, settings = run(args.agents, args.engines, phases, args.seconds, args.procs)
    except ValueError as exc:
        ap.error(f"--phases {args.phases!r}: {exc}")
    print(json.dumps({**settings, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
