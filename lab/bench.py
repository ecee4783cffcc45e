"""`make bench`: the issue's speed targets, each against a baseline measured in
the same run on the same machine (these machines are shared and noisy, so
ratios mean more than absolute times).

1. connect() latency through a VIP / direct to the pod, with 10, 1,000 and
   10,000 services in the maps (target <= 1.05 at 10,000), timed by a compiled client,
   beside kube-proxy's iptables and nftables shapes (lab/bench_connect.py; the rows go
   to bench/results/connect.json too);
2. full apply of 10,000 services x 10 backends to empty maps (target <= 0.35 s);
3. Maglev builds of one table, M=16381 and 65537 x 10, 100, 1,000 backends, with the
   controller's weights against equal weights (target <= 50 ms at 65537 x 1,000), and of
   10,000 services' tables at once (lab/bench_maglev.py);
4. fleet-wide session bindings through the real gRPC server: 100 simulated agents,
   2,000 new sessions/s, 1M live (controller CPU, bytes per agent per second, time from
   a binding on one node to the last agent; lab/bench_bindings.py);
5. engine loads fanned out by the real gRPC server to 1,000 simulated agents (controller
   CPU over idle, time from a load change to the last agent, bytes per agent per second;
   lab/bench_fanout.py);
6. failover: failed new connects and time to recovery after an engine dies, measured in
   the lab fleet, beside kube-proxy's and Envoy's timelines modelled from their
   documented defaults at the measured rate (lab/bench_failover.py);
7. the LLM workload: multi-turn streaming chat (the openai client) under random,
   least-loaded, kvroute and HAProxy routing, on simulated engines and on real vLLM
   CPU engines when installed (lab/bench_llm.py);
8. DNS through a dual-stack UDP VIP: queries/s and latency through the VIP vs direct to
   dnsmasq, and kvroute's in-kernel time per query (lab/dns.py).

Each benchmark's rows go to bench/results/NAME.json (quick/NAME.json with --quick);
`python -m lab.benchreport` renders README's section and the plots from them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import ipaddress
import json
import os
import secrets
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from dataplane import apply, loader, model
from dataplane.maps import MapSet
from dataplane.settings import Settings

POD_PORT = 8000
RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"


def _services(n: int, pods: list[str], per_service: int, affinity: str = "none",
              first_vip: str = "10.100.0.1") -> list[dict[str, Any]]:
    base = ipaddress.IPv4Address(first_vip)
    out = []
    for i in range(n):
        bes = [{"address": pods[(i + j) % len(pods)] if len(pods) >= per_service else
                str(ipaddress.IPv4Address("10.200.0.0") + i * per_service + j),
                "port": POD_PORT} for j in range(per_service)]
        out.append({"name": f"svc-{i}", "vip": str(base + i), "port": 80, "affinity": affinity,
                    "backends": bes})
    return out


@contextlib.contextmanager
def _datapath(cgroup: Path | None = None) -> Iterator[tuple[Settings, MapSet]]:
    """Programs loaded under a pin dir of their own (attached to `cgroup` if given),
    removed afterwards whatever happens."""
    settings = Settings(pin_dir=Path(f"/sys/fs/bpf/kvrbench-{secrets.token_hex(2)}"))
    dp = loader.Datapath(settings)
    try:
        if cgroup is not None:
            dp.attach(cgroup)
        with MapSet(settings.pin_dir) as maps:
            yield settings, maps
    finally:
        dp.close()
        loader.uninstall(settings.pin_dir)


def bench_connect(counts: tuple[int, ...], rounds: int,
                  per_round: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """connect() latency by the compiled client (lab/bench_connect.py): direct, kvroute's
    affinities (fleet mode on and off), kube-proxy's iptables and nftables shapes. The
    rows, and the run's settings and notes."""
    from lab import bench_connect as bc
    rows, notes = bc.run(counts, rounds, per_round, say=lambda line: print(line, file=sys.stderr,
                                                                         flush=True))
    return rows, {"counts": list(counts), "rounds": rounds, "per_round": per_round,
                  "notes": notes}


def results_doc(bench: str, argv: list[str], started: float, loadavg: float,
                rows: list[dict[str, Any]], extra: dict[str, Any] | None = None
                ) -> dict[str, Any]:
    """What one benchmark's results file holds: the command that made it, when, how long
    it took, on what, and the machine's load average when it started (a shared machine's
    noise)."""
    return {"bench": bench, "command": " ".join(["python -m lab.bench", *argv]),
            "date": time.strftime("%Y-%m-%d", time.gmtime(started)),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "seconds": round(time.time() - started, 1), "kernel": os.uname().release,
            "cpus": os.cpu_count(), "loadavg_at_start": round(loadavg, 2),
            **(extra or {}), "rows": rows}


def _fleet(n_services: int, per_service: int, affinity: str) -> model.Snapshot:
    """A controller's snapshot of n services with backends of their own. No engine
    references: the targets are about services x backends (100,000 EngineRefs, one per
    backend, add about 1.3 s of URL checks to a full snapshot's decode)."""
    desired = model.desired_from_dict({"services": _services(n_services, [], per_service,
                                                             affinity)})
    return model.Snapshot.of(1, desired.services)


APPLY_TARGETS = {"none": 0.35, "session": 3.0}  # seconds, full apply of 10,000 x 10


def bench_apply(n_services: int, per_service: int,
                affinities: tuple[str, ...] = tuple(APPLY_TARGETS)) -> list[dict[str, Any]]:
    """The agent's apply path, from the gRPC message to the kernel maps (the protobuf
    decode and the model's validation included, as an agent receives it)."""
    from dataplane.api import convert
    rows: list[dict[str, Any]] = []
    with _datapath() as (settings, maps):
        for affinity in affinities:
            target = APPLY_TARGETS[affinity]
            wire = convert.full_update(_fleet(n_services, per_service, affinity))
            data = wire.SerializeToString()
            applier = apply.Applier(maps, settings.hash_seed)
            started = time.perf_counter()
            msg = convert.pb.SnapshotUpdate.FromString(data)
            snap = convert.snapshot_from_pb(msg.full)
            decoded = time.perf_counter()
            result = applier.apply(snap.desired)
            total = time.perf_counter() - started
            size = snap.services[0].table_size
            rows.append({
                "bench": f"full apply {n_services} x {per_service}, {affinity}, M={size}",
                "value_s": round(total, 3), "decode_validate_s": round(decoded - started, 3),
                "maglev_s": round(result.build_seconds, 3),
                "write_s": round(result.write_seconds, 3),
                "target_s": target, "ratio_to_target": round(total / target, 2)})
            if affinity == "none":
                rows.extend(_apply_changes(applier, snap))
            applier.apply(model.DesiredState())
            applier.close()
    return rows


def _apply_changes(applier: apply.Applier, snap: model.Snapshot) -> list[dict[str, Any]]:
    """One engine's load and one service's backends changing in the applied fleet: the
    message as the agent receives it, to the kernel (median of 20)."""
    from dataplane.api import convert
    rows = []
    middle = snap.services[len(snap.services) // 3]
    ident = middle.identity(middle.backends[0])
    load_times = []
    for i in range(20):
        data = convert.loads_update({ident: 1000 + i}).SerializeToString()
        started = time.perf_counter()
        loads = convert.loads_from_pb(convert.pb.SnapshotUpdate.FromString(data).loads)
        written = applier.set_loads(loads)
        load_times.append(time.perf_counter() - started)
        assert written >= 1
    rows.append({"bench": f"one engine's load change, {len(snap.services)} services",
                 "value_ms": round(statistics.median(load_times) * 1e3, 3), "target_ms": 5,
                 "ratio_to_target": round(statistics.median(load_times) * 1e3 / 5, 3)})
    delta_times = []
    current = snap
    victim = snap.services[len(snap.services) // 2]
    for i in range(20):
        backends = (*victim.backends[1:], model.Backend(f"10.250.{i // 200}.{i % 200 + 1}",
                                                        POD_PORT))
        changed = dataclasses.replace(victim, backends=backends)
        others = [s for s in current.services if s.name != victim.name]
        new = model.Snapshot.of(current.version + 1, (*others, changed), current.engines)
        data = convert.delta_update(model.delta(current, new)).SerializeToString()
        started = time.perf_counter()
        msg = convert.pb.SnapshotUpdate.FromString(data)
        got = model.apply_delta(current, convert.delta_from_pb(msg.delta))
        result = applier.apply(got.desired)
        delta_times.append(time.perf_counter() - started)
        assert result.summary.get("tables_written") == 1, result.summary
        current, victim = got, changed
    rows.append({"bench": f"delta of one service's backends, {len(snap.services)} services",
                 "value_ms": round(statistics.median(delta_times) * 1e3, 2), "target_ms": 20,
                 "ratio_to_target": round(statistics.median(delta_times) * 1e3 / 20, 3)})
    return rows


def bench_maglev(quick: bool) -> list[dict[str, Any]]:
    from lab import bench_maglev
    return list(bench_maglev.run(quick=quick))


def bench_bindings(quick: bool) -> list[dict[str, Any]]:
    from lab import bench_bindings as bb
    if quick:
        return [bb.run(agents=20, rate=400, live=100_000, seconds=8)]
    return [bb.run(agents=100, rate=2000, live=1_000_000, seconds=20)]


def bench_fanout(quick: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from lab import bench_fanout as bf
    if quick:
        return bf.run(agents=200, engines=200, phases=bf.PHASES[:3], seconds=4)
    return bf.run(agents=1000, engines=1000, phases=bf.PHASES, seconds=8)


def bench_failover(quick: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from lab import bench_failover as bf
    return bf.run(rate=200, engines=4, before=2, after=5 if quick else 10)


def bench_llm(quick: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from lab import bench_llm as bl
    result = bl.run(quick, results=None)
    return bl.rows(result), {"detail": result}


def bench_dns(quick: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One row per family and socket use (reuse: one socket for every query; new: a socket
    per query, as a stub resolver without a pool does), from lab.dns's medians; the
    runs themselves and dig's answers go beside them."""
    from lab import dns
    # 20,000 x 3 is `python -m lab.dns bench`'s default; quick keeps the 16 runs short
    queries, rounds = (3000, 1) if quick else (20000, 3)
    data = dns.bench(queries, rounds)
    rows = [{"bench": f"dns {key}", "family": key.split()[0], "mode": key.split()[1], **row}
            for key, row in data["summary"].items()]
    return rows, {"queries": queries, "rounds_per_target": rounds,
                  "kernel_stats": data["kernel_stats"], "dig": data["dig"], "runs": data["runs"]}


Bench = Callable[[], "list[dict[str, Any]] | tuple[list[dict[str, Any]], dict[str, Any]]"]


def benches(quick: bool) -> dict[str, Bench]:
    """Every benchmark by name, in the order `make bench` runs them, sized for a full run
    or a quick one."""
    # 30 rounds: the connect bench is most of `make bench` (15 minutes on 2 idle cores)
    rounds, per_round = (8, 1000) if quick else (30, 2000)
    counts = (10, 1_000) if quick else (10, 1_000, 10_000)
    return {"maglev": lambda: bench_maglev(quick),
            # its targets are for 10,000 services; the quick run leaves session out
            "apply": lambda: bench_apply(10_000, 10, ("none",) if quick else ("none", "session")),
            "connect": lambda: bench_connect(counts, rounds, per_round),
            "bindings": lambda: bench_bindings(quick),
            "fanout": lambda: bench_fanout(quick),
            "failover": lambda: bench_failover(quick),
            "llm": lambda: bench_llm(quick),
            "dns": lambda: bench_dns(quick)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print the rows as JSON at the end")
    ap.add_argument("--quick", action="store_true",
                    help="fewer rounds and smaller fleets (the README's smoke table); "
                         "results to bench/results/quick/")
    ap.add_argument("--only", choices=tuple(benches(False)), action="append",
                    help="run this benchmark (repeat for several; default: all)")
    ap.add_argument("--results", type=Path, default=None,
                    help="where the JSON files go (default: bench/results, or "
                         "bench/results/quick with --quick)")
    args = ap.parse_args(argv)
    out = args.results or (RESULTS / "quick" if args.quick else RESULTS)
    every: list[dict[str, Any]] = []
    for name, run in benches(args.quick).items():
        if args.only and name not in args.only:
            continue
        started, loadavg = time.time(), os.getloadavg()[0]
        got = run()
        rows, extra = got if isinstance(got, tuple) else (got, {})
        out.mkdir(parents=True, exist_ok=True)
        doc = results_doc(name, argv, started, loadavg, rows, {"quick": args.quick, **extra})
        (out / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
        every.extend(rows)
        if not args.json:
            for row in rows:
                shown = dict(row)
                label = shown.pop("bench", None) or shown.pop("name")
                print(f"{label:<52} " + "  ".join(f"{k}={v}" for k, v in shown.items()
                                                  if not isinstance(v, list) or len(v) <= 4),
                      flush=True)
    if args.json:
        print(json.dumps(every, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
