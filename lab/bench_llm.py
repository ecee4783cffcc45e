"""LLM workload benchmark: the same multi-turn chat workload under each routing policy.

On one lab (engines in pod namespaces, the controller, a node agent), the workload of
:mod:`lab.chatload` (streaming, the official ``openai`` client on the project's session
transport, a new connection every turn) runs once per policy, one after another:

- ``random``: a plain Service VIP with no affinity: every connection to a random engine,
  as kube-proxy does;
- ``least-loaded``: an LLM Service VIP without affinity and a bounded-load epsilon of 0:
  each connection goes to an engine at or below the mean load the engines report;
- ``kvroute``: the LLM Service with session affinity and bounded load (epsilon 0.25),
  fleet-wide sessions: a session keeps its engine, new sessions go by load;
- ``haproxy``: Debian's HAProxy in a pod of its own, in front of the same engines, as a
  reference L7 router: ``balance hdr(X-Session-ID)`` with ``hash-type consistent``.

Rows report TTFT p50/p99 (client side, connect included), tokens/s, the engines' own
prefix-cache hit ratio (their ``vllm:prefix_cache_*`` counters, before vs after), load
imbalance (mean over samples of max/mean running requests) and failed requests; ratios
are against ``random`` in the same run. Separately, the cost of the hop itself: a fresh
connection and one small request, direct to a pod, through the kvroute VIP and through
HAProxy, interleaved, and HAProxy's CPU time per request (from /proc) during its run.

On simulated engines always; on real vLLM CPU engines when ``make vllm`` installed them
(fewer engines, a shorter workload: the tiny model's context is 1,024 tokens and the
machine has two cores). ``python -m lab.bench --only llm`` writes ``bench/results/llm.json``
(lab.bench's results file, the full result under "detail").
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import socket
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from lab import chatload, fleet, podserver, vllm_engine

POLICIES = ("random", "least-loaded", "kvroute", "haproxy")
BASELINE = "random"
# The fleet's main service (session affinity) keeps fleet.Fleet's VIP; the baselines
# get VIPs of their own on the same endpoints.
RANDOM_VIP, LEAST_VIP = "10.96.0.11", "10.96.0.12"
BASELINE_SERVICES = (
    {"name": "llm-random", "vip": RANDOM_VIP, "affinity": "none", "engine": None},
    {"name": "llm-least", "vip": LEAST_VIP, "affinity": "none", "epsilon": 0.0},
)
PROXY_PORT = 8000


def workloads(kind: str, quick: bool) -> tuple[int, chatload.Workload]:
    """(engines, one round's workload) for an engine kind. Simulated engines: a closed
    loop of 16 users (quick: 8) over 4 engines. vLLM on two shared cores: far less,
    and short enough for the tiny model's 1,024-token context. A full run has two
    rounds of this, a quick one one."""
    if kind == "sim":
        if quick:
            return 4, chatload.Workload(users=8, sessions=24, turns=4, first_words=300,
                                        turn_words=25, max_tokens=32)
        return 4, chatload.Workload(users=16, sessions=32, turns=5, first_words=300,
                                    turn_words=25, max_tokens=48)
    if quick:
        return 2, chatload.Workload(users=4, sessions=8, turns=3, first_words=60,
                                    turn_words=15, max_tokens=12, timeout=120)
    return 3, chatload.Workload(users=4, sessions=8, turns=3, first_words=80,
                                turn_words=15, max_tokens=16, timeout=120)


def haproxy_config(bind: str, port: int, servers: Mapping[str, str]) -> str:
    """HAProxy as the reference L7 router: hash each request's X-Session-ID onto a
    consistent-hash ring of the engines. No health checks: nothing dies in the bench,
    and checks would add traffic the other policies do not have."""
    lines = [
        "global",
        "    maxconn 4096",
        "defaults",
        "    mode http",
        "    timeout connect 5s",
        "    timeout client 300s",
        "    timeout server 300s",
        # Forward each streamed token at once: without it, a small SSE write can wait
        # on the client's delayed ACK (Nagle), tens of ms of TTFT that are config, not hop.
        "    option http-no-delay",
        "frontend llm",
        f"    bind {bind}:{port}",
        "    default_backend engines",
        "backend engines",
        "    balance hdr(X-Session-ID)",
        "    hash-type consistent",
    ]
    lines += [f"    server {name} {addr}" for name, addr in servers.items()]
    return "\n".join(lines) + "\n"


def cpu_seconds(pid: int) -> float:
    """CPU time of a process, all its threads: the scheduler's nanosecond run times
    (/proc/PID/task/*/schedstat), since /proc/PID/stat counts 10 ms ticks, coarser than
    a proxy's CPU for a few hundred requests."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that just ended
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


@contextlib.contextmanager
def haproxy(fl: fleet.Fleet) -> Iterator[tuple[str, int]]:
    """HAProxy in a pod of its own in front of the fleet's engines; yields its base
    URL and its pid. The lab kills it at teardown like any pod's process."""
    binary = shutil.which("haproxy")
    if binary is None:
        raise RuntimeError("haproxy is not installed (apt-get install haproxy)")
    pod = fl.lab.add_pod("proxy")
    servers = {name: f"{p.address}:{fleet.ENGINE_PORT}" for name, p in fl.engines.items()}
    config = fl.workdir / "haproxy.cfg"
    config.write_text(haproxy_config(str(pod.address), PROXY_PORT, servers))
    log = open(fl.workdir / "haproxy.log", "ab")  # noqa: SIM115 - the process owns it
    proc = pod.spawn([binary, "-db", "-f", str(config)], stdout=log, stderr=log)
    try:
        podserver.wait_listening(pod, PROXY_PORT, timeout=10)
        yield f"http://{pod.address}:{PROXY_PORT}", proc.pid
    finally:
        proc.kill()
        proc.wait()


def _request_once(host: str, port: int, session: str, tag: bool) -> float:
    """A fresh connection (tagged if asked) and GET /v1/models with the session header,
    to the answer's last byte; seconds."""
    from dataplane import client
    t0 = time.perf_counter()
    with socket.socket() as s:
        s.settimeout(5)
        if tag:
            client.tag_session(s, session)
        s.connect((host, port))
        s.sendall(f"GET /v1/models HTTP/1.1\r\nHost: {host}\r\nX-Session-ID: {session}\r\n"
                  "Connection: close\r\n\r\n".encode())
        while s.recv(65536):
            pass
    return time.perf_counter() - t0


# name -> (host, port, tag the socket, session id of round r)
HopTarget = tuple[Callable[[int], str], int, bool, Callable[[int], str]]


def _hop_rounds(targets: dict[str, HopTarget], rounds: int) -> dict[str, list[float]]:
    """Runs in the client namespace: the targets one after another, ``rounds`` times, so
    drift on a shared machine hits them alike."""
    out: dict[str, list[float]] = {name: [] for name in targets}
    for r in range(rounds):
        for name, (host, port, tag, session) in targets.items():
            out[name].append(_request_once(host(r), port, session(r), tag))
    return out


def hop_cost(fl: fleet.Fleet, proxy_url: str, proxy_pid: int, rounds: int) -> dict[str, Any]:
    """Per-request latency of a fresh connection + one small request: direct to a pod,
    through the kvroute VIP and through HAProxy, and HAProxy's CPU per request. Direct
    takes the engines in turn and each round is another session (kvroute "live": one
    session throughout), so every path spreads over the same engines."""
    assert fl.client is not None
    pods = [str(p.address) for p in fl.engines.values()]
    proxy_host = proxy_url.split("//")[1].split(":")[0]

    def new(r: int) -> str:
        return f"hop-{r}"

    targets: dict[str, HopTarget] = {
        "direct": (lambda r: pods[r % len(pods)], fleet.ENGINE_PORT, False, new),
        "kvroute new session": (lambda r: fl.vip, fl.port, True, new),
        "kvroute live session": (lambda r: fl.vip, fl.port, True, lambda r: "hop-live"),
        "haproxy": (lambda r: proxy_host, PROXY_PORT, False, new)}
    cpu0 = cpu_seconds(proxy_pid)
    times = fl.client.call(_hop_rounds, targets, rounds, cgroup=fl.nodes[0].cgroup,
                           timeout=300)
    cpu = cpu_seconds(proxy_pid) - cpu0
    out: dict[str, Any] = {"rounds": rounds, "request": "new connection + GET /v1/models"}
    direct = statistics.median(times["direct"])
    for name, ts in times.items():
        ts = sorted(ts)
        p50, p99 = statistics.median(ts), ts[min(len(ts) - 1, int(0.99 * len(ts)))]
        out[name] = {"p50_us": round(p50 * 1e6, 1), "p99_us": round(p99 * 1e6, 1),
                     "extra_p50_us": round((p50 - direct) * 1e6, 1)}
    out["haproxy"]["cpu_us_per_request"] = round(cpu / rounds * 1e6, 1)
    return out


def fleet_options(kind: str) -> dict[str, Any]:
    """Breaker and scrape settings that a busy shared machine does not trip. The lab's
    defaults (50 ms scrapes, a 0.25 s timeout, 0.75 s without a token is a stall, 3
    failed rounds open) find a fault fast, but on two cores shared with other work a
    healthy engine misses them, its breaker opens and the traffic of every policy
    crowds onto the others. A dead engine is still cut at once: the kernel trips it
    after --fail-k refused connects."""
    if kind == "vllm":
        # A CPU engine busy with a prefill answers /metrics and /health slowly, and its
        # steps can take over a second.
        return {"scrape_interval": 1.0, "tick": 0.2, "stall_window": 15.0,
                "breaker": {"consecutive-failures": 5, "failure-ratio": 1.0, "cooldown": 2}}
    # Scrapes stay frequent (the load signal bounded load and least-loaded act on);
    # it takes 2 s of failed rounds in a row, not 0.15 s, to open a breaker, and the
    # failure ratio opens it only when every remembered round failed (by default half
    # of them do, which a starved engine's slow /health answers reach). The simulators run
    # at a quarter of their default speed: a 70B-class model's step times (~5k prompt
    # tokens/s, ~30 ms a decode step) instead of an 8B one's, so a re-prefilled
    # conversation costs TTFT above this machine's scheduling noise.
    return {"scrape_interval": 0.2, "tick": 0.1, "stall_window": 3.0,
            "breaker": {"consecutive-failures": 10, "failure-ratio": 1.0, "cooldown": 1},
            "sim_args": ("--speed", "0.25")}


def breaker_opens(fl: fleet.Fleet) -> int:
    """Breakers the controller opened so far (its log): a run during which healthy
    engines were cut says so in its row."""
    path = fl.workdir / "controller.log"
    return path.read_text(errors="replace").count("-> open") if path.exists() else 0


def run_kind(kind: str, quick: bool, say: Callable[[str], None],
             vllm_venv: Path = vllm_engine.DEFAULT_VENV,
             workload: tuple[int, chatload.Workload] | None = None,
             hop_rounds: int | None = None) -> dict[str, Any]:
    """Every policy on one lab of ``kind`` engines; the rows, ratios and hop cost.
    ``workload`` (engines, workload) and ``hop_rounds`` replace the defaults (tests)."""
    n, wl = workload or workloads(kind, quick)
    rounds = 1 if quick else 2
    started = time.time()
    with fleet.Fleet(engines=n, nodes=1, engine=kind, vllm_venv=vllm_venv,
                     extra_services=BASELINE_SERVICES, **fleet_options(kind)) as fl:
        if not fleet.wait_for(fl.converged, 60):
            raise RuntimeError(f"the agent never converged:\n{fl.log('controller')}")
        assert fl.client is not None
        urls = {name: f"http://{p.address}:{fleet.ENGINE_PORT}" for name, p in fl.engines.items()}
        with haproxy(fl) as (proxy_url, proxy_pid):
            hop = hop_cost(fl, proxy_url, proxy_pid,
                           hop_rounds or (100 if kind == "vllm" else 300))
            say(f"  [{kind}] hop: " + ", ".join(
                f"{k} {v['p50_us']:.0f} us" for k, v in hop.items() if isinstance(v, dict)))
            targets = {"random": f"http://{RANDOM_VIP}:{fl.port}",
                       "least-loaded": f"http://{LEAST_VIP}:{fl.port}",
                       "kvroute": f"http://{fl.vip}:{fl.port}", "haproxy": proxy_url}
            model = chatload.warm(next(iter(urls.values())))
            # Policies run one after another, in rounds of alternating order, so the
            # drift of a shared machine does not always favour the same policy.
            order = [POLICIES if r % 2 == 0 else POLICIES[::-1] for r in range(rounds)]
            got: dict[str, dict[str, Any]] = {
                p: {"turns": [], "wall": 0.0, "queries": 0.0, "hits": 0.0, "samples": [],
                    "cpu": 0.0, "opens": 0} for p in POLICIES}
            with chatload.EngineWatch(urls, 0.5 if kind == "vllm" else 0.1) as watch:
                for policy in (p for policies in order for p in policies):
                    run = f"{policy}-{secrets.token_hex(3)}"
                    watch.reset()
                    before, cpu0 = watch.prefix(), cpu_seconds(proxy_pid)
                    opens0 = breaker_opens(fl)
                    turns, wall = fl.client.call(
                        chatload.drive_blocking, targets[policy], wl, run, model,
                        cgroup=fl.nodes[0].cgroup, timeout=1800)
                    time.sleep(0.5)  # the engines count a step's stats just after it
                    queries, hits = chatload.prefix_delta(before, watch.prefix())
                    acc = got[policy]
                    acc["turns"] += turns
                    acc["wall"] += wall
                    acc["queries"] += queries
                    acc["hits"] += hits
                    acc["samples"] += watch.samples
                    acc["cpu"] += cpu_seconds(proxy_pid) - cpu0
                    acc["opens"] += breaker_opens(fl) - opens0
                    one = chatload.summarize(turns, wall, (queries, hits), list(watch.samples))
                    one["breaker_opens"] = breaker_opens(fl) - opens0
                    say(f"  [{kind}] {policy:<13} {_line(one)}")
    rows = []
    for policy, acc in got.items():
        row = chatload.summarize(acc["turns"], acc["wall"], (acc["queries"], acc["hits"]),
                                 acc["samples"])
        row["policy"] = policy
        row["breaker_opens"] = acc["opens"]
        if policy == "haproxy":
            row["proxy_cpu_s"] = round(acc["cpu"], 3)
            row["proxy_cpu_us_per_request"] = round(acc["cpu"] / max(1, row["requests"]) * 1e6,
                                                    1)
        rows.append(row)
    base = next(r for r in rows if r["policy"] == BASELINE)
    for row in rows:
        row["vs_random"] = chatload.ratios(row, base)
    return {"engines": n, "engine": kind, "workload": dataclasses.asdict(wl), "rounds": rounds,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "seconds": round(time.time() - started, 1), "hop": hop, "rows": rows}


def _line(row: Mapping[str, Any]) -> str:
    hit = row["prefix_cache_hit_ratio"]
    return (f"TTFT p50 {row['ttft_ms']['p50']} ms p99 {row['ttft_ms']['p99']} ms  "
            f"{row['tokens_per_s']} tok/s  prefix hit "
            f"{'-' if hit is None else f'{hit:.1%}'}  imbalance {row['imbalance_running']}  "
            f"failed {row['failed']}/{row['requests']}"
            + (f"  breakers opened {row['breaker_opens']}" if row.get("breaker_opens") else ""))


def run(quick: bool, results: Path | None = None,
        vllm_venv: Path = vllm_engine.DEFAULT_VENV,
        say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The LLM workload on simulated engines, and on real vLLM CPU engines when
    installed (else the result says why not); written to ``results`` as JSON if given.
    No default file: bench/results/llm.json is lab.bench's (results_doc), and this shape
    written there would replace it with one README cannot render."""
    def default_say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    say = say or default_say
    out: dict[str, Any] = {"command": " ".join(["python -m lab.bench", *sys.argv[1:]]),
                           "quick": quick, "kernel": os.uname().release}
    say("llm: simulated engines")
    out["sim"] = run_kind("sim", quick, say)
    if vllm_engine.available(vllm_venv):
        say("llm: real vLLM CPU engines")
        out["vllm"] = run_kind("vllm", quick, say, vllm_venv)
    else:
        out["vllm"] = {"skipped": f"no vLLM venv at {vllm_venv} (make vllm installs one)"}
        say(f"llm: vLLM {out['vllm']['skipped']}")
    if results is not None:
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text(json.dumps(out, indent=2) + "\n")
    return out


def rows(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The result as the main bench's table rows (one per engine kind and policy)."""
    out: list[dict[str, Any]] = []
    for kind in ("sim", "vllm"):
        part = result.get(kind) or {}
        if "skipped" in part:
            out.append({"bench": f"llm workload, {kind}", "skipped": part["skipped"]})
            continue
        for row in part.get("rows", []):
            vs = row["vs_random"]
            out.append({"bench": f"llm {kind} x{part['engines']}, {row['policy']}",
                        "ttft_p50_ms": row["ttft_ms"]["p50"], "ttft_p99_ms": row["ttft_ms"]["p99"],
                        "tok_s": row["tokens_per_s"],
                        "prefix_hit": row["prefix_cache_hit_ratio"],
                        "imbalance": row["imbalance_running"], "failed": row["failed"],
                        "ttft_p50_x_random": vs["ttft_p50_x"]})
        if part.get("hop"):
            hop = part["hop"]
            out.append({"bench": f"llm {kind}, hop: new connection + small request",
                        **{f"{k.replace(' ', '_')}_extra_p50_us": hop[k]["extra_p50_us"]
                           for k in ("kvroute new session", "kvroute live session", "haproxy")},
                        "haproxy_cpu_us_per_request": hop["haproxy"]["cpu_us_per_request"]})
    return out


def as_results_doc(result: Mapping[str, Any], converted_from: str) -> dict[str, Any]:
    """A result :func:`run` wrote itself (top-level "sim"/"vllm" parts) re-wrapped as the
    results file ``python -m lab.bench --only llm`` writes (lab.bench.results_doc), so
    README renders it like every other benchmark. Nothing is measured or guessed here:
    the date, start and kernel are the result's own, the seconds the sum of its parts';
    what the old file never recorded (CPUs, load average) stays None, and
    ``converted_from`` says where the file came from."""
    parts = [result[k] for k in ("sim", "vllm") if "started" in (result.get(k) or {})]
    if not parts:
        raise ValueError("no measured part (sim or vllm) in the result")
    started = min(str(p["started"]) for p in parts)
    return {"bench": "llm", "command": result["command"], "date": started[:10],
            "started": started, "seconds": round(sum(float(p["seconds"]) for p in parts), 1),
            "kernel": result["kernel"], "cpus": None, "loadavg_at_start": None,
            "converted_from": converted_from, "quick": result.get("quick", False),
            "detail": dict(result), "rows": rows(result)}
