"""connect() latency through kvroute, kube-proxy's rule shapes and direct to the pod, timed
by the compiled client (lab/connbench.c: ~1 us of its own per connect, where a Python loop
costs ~30 us and hides the datapath).

One lab: a pod serving the measured service's 10 backends (10 ports, one epoll loop), and a
client namespace per variant, so no variant's rules or hooks touch another's connects:

* ``direct``: to the pod's address, no rules, no program (the baseline of every ratio);
* ``kvroute``: one namespace in the lab's cgroup, where kvroute's programs are attached,
  with three measured services (affinity none, client, session) after N-3 others; the
  session service is timed with a new tag per connect (a new session) and one fixed tag (a
  live session); also a direct connect under the programs (a connect they leave alone);
* ``kvroute fleet``: the same namespace in a second cgroup with a second datapath whose
  applier runs in fleet mode (new bindings announced on kvr_events, drained between runs);
* kube-proxy's iptables shape restored with ``iptables-nft-restore`` and with
  ``iptables-legacy-restore``, and its nftables shape with ``nft -f``, each in its own
  namespace, N services with the measured one last (KUBE-SERVICES is walked in order).

Every variant runs once a round, rounds interleaved and the order rotated per round, and
each figure is the median over rounds of the ratio to the direct run of the same round.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import itertools
import os
import secrets
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pyroute2

import lab.cgroup
import lab.connbench
import lab.netns
import lab.run
from dataplane import apply, bpfsys, events, loader, model
from dataplane.maps import MapSet
from dataplane.settings import Settings

BACKENDS = 10  # per service, the measured one's all real (ports on the pod)
FIRST_PORT = 8000
VIP_PORT = 80
VIP_NET = "10.96.0.0/16"  # routed in the rule namespaces, as a node's default route would
MEASURED = {"none": "10.96.0.1", "client": "10.96.0.2", "session": "10.96.0.3"}
FILLER_VIP = ipaddress.IPv4Address("10.100.0.1")
FILLER_BE = ipaddress.IPv4Address("10.200.0.1")  # backends that need not exist
LOAD_TIMEOUT = 600.0  # seconds a restore may take before its variant is reported as failed
RULE_TOOLS = {"iptables-nft": "iptables-nft-restore", "iptables-legacy": "iptables-legacy-restore",
              "nftables": "nft"}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way of connecting: who connects (namespace, cgroup), to what, with which tag."""

    key: str
    label: str
    client: str  # the lab client's name
    cgroup: str | None  # "kvroute" or "fleet": the cgroup the client runs in
    via_vip: str | None  # None: direct to the pod
    tag: str = "none"


VARIANTS = (
    Variant("direct", "direct to the pod", "direct", None, None),
    Variant("kvr-miss", "direct, kvroute attached (no service)", "kvr", "kvroute", None),
    Variant("kvr-none", "kvroute, affinity none", "kvr", "kvroute", MEASURED["none"]),
    Variant("kvr-client", "kvroute, affinity client", "kvr", "kvroute", MEASURED["client"]),
    Variant("kvr-session-new", "kvroute, session, new tag", "kvr", "kvroute",
            MEASURED["session"], "new"),
    Variant("kvr-session-live", "kvroute, session, live tag", "kvr", "kvroute",
            MEASURED["session"], "fixed"),
    Variant("fleet-client", "kvroute fleet, affinity client", "kvr", "fleet",
            MEASURED["client"]),
    Variant("fleet-session-new", "kvroute fleet, session, new tag", "kvr", "fleet",
            MEASURED["session"], "new"),
    Variant("fleet-session-live", "kvroute fleet, session, live tag", "kvr", "fleet",
            MEASURED["session"], "fixed"),
    Variant("iptables-nft", "kube-proxy iptables (iptables-nft)", "iptnft", None,
            MEASURED["none"]),
    Variant("iptables-legacy", "kube-proxy iptables (iptables-legacy)", "iptleg", None,
            MEASURED["none"]),
    Variant("nftables", "kube-proxy nftables", "nft", None, MEASURED["none"]),
)
# What a session connect costs over `none`, and fleet mode over single-node: pairs of
# variants compared round by round (numerator, denominator).
COSTS = (
    ("kvr-client", "kvr-none"), ("kvr-session-new", "kvr-none"),
    ("kvr-session-live", "kvr-none"), ("kvr-miss", "direct"),
    ("fleet-client", "kvr-client"), ("fleet-session-new", "kvr-session-new"),
    ("fleet-session-live", "kvr-session-live"),
)
RULE_CLIENTS = {"iptables-nft": "iptnft", "iptables-legacy": "iptleg", "nftables": "nft"}


def measured_backends(pod: str) -> tuple[tuple[str, int], ...]:
    return tuple((pod, FIRST_PORT + j) for j in range(BACKENDS))


def rule_services(n: int, pod: str) -> list[lab.connbench.Svc]:
    """n services for the rule shapes: n-1 others, then the measured one (last)."""
    out = []
    for i in range(n - 1):
        bes = tuple((str(FILLER_BE + i * BACKENDS + j), FIRST_PORT) for j in range(BACKENDS))
        out.append(lab.connbench.Svc(f"bench/svc-{i}", str(FILLER_VIP + i), VIP_PORT, bes))
    out.append(lab.connbench.Svc("bench/measured", MEASURED["none"], VIP_PORT,
                                 measured_backends(pod)))
    return out


def kvroute_services(n: int, pod: str) -> list[dict[str, Any]]:
    """n services for kvroute: n-3 others, then the three measured ones (none, client,
    session) last; the same backends as the rule shapes."""
    out: list[dict[str, Any]] = []
    for i in range(max(0, n - len(MEASURED))):
        bes = [{"address": str(FILLER_BE + i * BACKENDS + j), "port": FIRST_PORT}
               for j in range(BACKENDS)]
        out.append({"name": f"svc-{i}", "vip": str(FILLER_VIP + i), "port": VIP_PORT,
                    "backends": bes})
    for affinity, vip in MEASURED.items():
        out.append({"name": f"measured-{affinity}", "vip": vip, "port": VIP_PORT,
                    "affinity": affinity,
                    "backends": [{"address": a, "port": p} for a, p in measured_backends(pod)]})
    return out


def rule_file(kind: str, services: Sequence[lab.connbench.Svc]) -> str:
    if kind == "nftables":
        return lab.connbench.nft_ruleset(services)
    return lab.connbench.iptables_restore(services)


def rule_argv(kind: str, path: Path) -> list[str]:
    if kind == "nftables":
        return ["nft", "-f", str(path)]
    return [RULE_TOOLS[kind], str(path)]


@dataclasses.dataclass
class _Node:
    """One datapath attached to one cgroup, with its applier and event drain."""

    cgroup: lab.cgroup.Cgroup
    settings: Settings
    datapath: loader.Datapath
    maps: MapSet
    applier: apply.Applier
    reader: events.EventReader
    events: int = 0

    def drain(self) -> None:
        self.events += self.reader.consume()

    def run_stats(self) -> dict[str, tuple[int, int]]:
        """(run_time_ns, run_cnt) of each attached program (a tail call's time is its
        caller's), counted while BPF stats are enabled."""
        return {p.name: bpfsys.prog_run_stats(self.datapath.fds[p.name])
                for p in loader.PROGRAMS}


@dataclasses.dataclass(frozen=True)
class BpfCost:
    """kvroute's programs over one run: connect4's time per call, and all programs' time
    (connect4, setsockopt, sock_ops, getpeername) per connect."""

    connect4_ns: float
    all_ns: float
    connect4_calls: int


def bpf_cost(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]],
             connects: int) -> BpfCost:
    dt = {k: after[k][0] - before[k][0] for k in after}
    dn = {k: after[k][1] - before[k][1] for k in after}
    calls = dn.get("sock4_connect", 0)
    return BpfCost(connect4_ns=dt.get("sock4_connect", 0) / calls if calls else float("nan"),
                   all_ns=sum(dt.values()) / connects, connect4_calls=calls)


@contextlib.contextmanager
def _node(the_lab: lab.netns.Lab, cgroup: lab.cgroup.Cgroup, fleet: bool) -> Iterator[_Node]:
    pin_dir = Path(f"/sys/fs/bpf/kvrbench-{secrets.token_hex(3)}")
    the_lab.own_pin_dir(pin_dir)  # a killed bench's pins go with the next sweep
    settings = Settings(pin_dir=pin_dir)
    datapath = loader.Datapath(settings)
    try:
        datapath.attach(cgroup.path)
        with MapSet(settings.pin_dir) as maps:
            applier = apply.Applier(maps, settings.hash_seed, fleet=fleet)
            node = _Node(cgroup, settings, datapath, maps, applier,
                         events.EventReader(maps, lambda _e: None))
            try:
                yield node
            finally:
                node.reader.close()
                applier.apply(model.DesiredState())
                applier.close()
    finally:
        datapath.close()
        loader.uninstall(pin_dir)


def route_vips(netns: str) -> None:
    """The VIPs routed out of eth0, as a node's default route would send them: without a
    route, connect() fails with ENETUNREACH before netfilter sees a packet."""
    with pyroute2.IPRoute(netns=netns) as ns:
        eth0 = ns.link_lookup(ifname="eth0")[0]
        ns.route("add", dst=VIP_NET, oif=eth0, scope="link")


def run_tool(netns: str, argv: list[str],
             timeout: float = LOAD_TIMEOUT) -> tuple[float, str | None]:
    """Run a restore command in netns; (seconds, None) or (seconds, why it failed)."""
    started = time.perf_counter()
    proc = lab.run.spawn(netns, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return timeout, f"{argv[0]} did not finish in {timeout:.0f} s"
    took = time.perf_counter() - started
    if proc.returncode != 0:
        text = (err or out).decode(errors="replace").strip().splitlines()
        return took, f"{' '.join(argv[:1])} exited {proc.returncode}: " + \
            (text[0] if text else "no output")
    return took, None


def connect(binary: Path, netns: str, cgroup: lab.cgroup.Cgroup | None, addr: str,
             port: int, count: int, warmup: int, tag: str) -> lab.connbench.Result:
    argv = lab.connbench.connect_argv(binary, addr, port, count, warmup, tag)
    proc = lab.run.spawn(netns, argv, cgroup=cgroup, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=120)
    try:
        return lab.connbench.parse(out.decode())
    except ValueError as exc:
        raise ValueError(f"{exc} {err.decode(errors='replace').strip()}".strip()) from None


@dataclasses.dataclass(frozen=True)
class Paired:
    """One run of a variant and the direct runs just before and after it: its ratios are
    to their mean, so drift on a shared machine hits both sides of each ratio alike."""

    got: lab.connbench.Result
    before: lab.connbench.Result
    after: lab.connbench.Result
    bpf: BpfCost | None = None  # kvroute's variants only

    def base(self, field: str) -> float:
        return (getattr(self.before, field) + getattr(self.after, field)) / 2

    def ratio(self, field: str) -> float:
        return float(getattr(self.got, field)) / self.base(field)


def _quartiles(values: Sequence[float]) -> list[float]:
    return [round(q, 3) for q in statistics.quantiles(values, n=4)[::2]] if len(values) > 1 \
        else []


def summarise(n: int, runs: dict[str, list[Paired]], direct: Sequence[lab.connbench.Result],
              why: dict[str, str]) -> list[dict[str, Any]]:
    """Rows for one service count: each variant's medians over rounds (and the quartiles
    of its p50 ratio), then what one variant costs over another."""
    rows: list[dict[str, Any]] = []
    drift = [b.p50_ns / a.p50_ns for a, b in itertools.pairwise(direct)]
    rows.append({"bench": f"connect direct to the pod, {n} services", "variant": "direct",
                 "services": n,
                 "value_us": round(statistics.median(r.p50_ns for r in direct) / 1e3, 2),
                 "p99_us": round(statistics.median(r.p99_ns for r in direct) / 1e3, 2),
                 "rate_per_s": round(statistics.median(r.rate for r in direct)),
                 "noise_iqr": _quartiles(drift),  # one direct run over the one before
                 "runs": len(direct), "errors": sum(r.errors for r in direct)})
    for v in VARIANTS[1:]:
        name = (f"connect via VIP, {n} services" if v.key == "kvr-none"
                else f"connect {v.label}, {n} services")
        got = runs.get(v.key, [])
        if v.key in why or not got:
            rows.append({"bench": name, "variant": v.key, "services": n,
                         "unavailable": why.get(v.key, "no run completed")})
            continue
        p50 = [g.ratio("p50_ns") for g in got]
        row: dict[str, Any] = {
            "bench": name, "variant": v.key, "services": n,
            "value_us": round(statistics.median(g.got.p50_ns for g in got) / 1e3, 2),
            "baseline_us": round(statistics.median(g.base("p50_ns") for g in got) / 1e3, 2),
            "ratio": round(statistics.median(p50), 3), "ratio_iqr": _quartiles(p50),
            "p99_us": round(statistics.median(g.got.p99_ns for g in got) / 1e3, 2),
            "p99_ratio": round(statistics.median(g.ratio("p99_ns") for g in got), 3),
            "rate_per_s": round(statistics.median(g.got.rate for g in got)),
            "rate_ratio": round(statistics.median(g.ratio("rate") for g in got), 3),
            "runs": len(got), "errors": sum(g.got.errors for g in got)}
        costs = [g.bpf for g in got if g.bpf is not None]
        if costs:
            row["bpf_connect4_ns"] = round(statistics.median(c.connect4_ns for c in costs))
            row["bpf_all_ns_per_connect"] = round(statistics.median(c.all_ns for c in costs))
        if v.key == "kvr-none":
            row["target_ratio"] = 1.05
        rows.append(row)
    for num, den in COSTS:
        a, b = runs.get(num, []), runs.get(den, [])
        if num in why or den in why or not a or len(a) != len(b):
            continue
        ratios = [x.ratio("p50_ns") / y.ratio("p50_ns") for x, y in zip(a, b, strict=True)]
        deltas = [(x.got.p50_ns - x.base("p50_ns")) - (y.got.p50_ns - y.base("p50_ns"))
                  for x, y in zip(a, b, strict=True)]
        row = {"bench": f"cost of {num} over {den}, {n} services", "services": n,
               "p50_delta_ns": round(statistics.median(deltas)),
               "delta_iqr_ns": [round(q) for q in _quartiles(deltas)],
               "ratio": round(statistics.median(ratios), 3), "ratio_iqr": _quartiles(ratios)}
        ca = [x.bpf for x in a if x.bpf is not None]
        cb = [y.bpf for y in b if y.bpf is not None]
        if ca and cb:  # in-kernel time: no round trip in it, so far less noise
            row["bpf_connect4_delta_ns"] = round(statistics.median(c.connect4_ns for c in ca)
                                                 - statistics.median(c.connect4_ns for c in cb))
            row["bpf_all_delta_ns"] = round(statistics.median(c.all_ns for c in ca)
                                            - statistics.median(c.all_ns for c in cb))
        rows.append(row)
    return rows


def run(counts: Sequence[int], rounds: int, per_round: int, warmup: int = 200,
        say: Callable[[str], object] = print) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows, and notes (what was installed, what could not run and why)."""
    notes: list[str] = []
    missing: dict[str, str] = {}  # variants that cannot run at all here, and why
    try:
        done = lab.connbench.ensure_tools()
        if done:
            notes.append(done)
            say(done)
    except RuntimeError as exc:
        missing = {kind: f"iptables/nftables not installed: {exc}" for kind in RULE_TOOLS}
    binary = lab.connbench.build()
    rows: list[dict[str, Any]] = []
    ports = [FIRST_PORT + j for j in range(BACKENDS)]
    with lab.netns.Lab() as the_lab, contextlib.ExitStack() as stack:
        pod = the_lab.add_pod("pod")
        server = pod.spawn(lab.connbench.serve_argv(binary, ports), stdout=subprocess.PIPE)
        assert server.stdout is not None
        if b"listening" not in server.stdout.readline():
            raise RuntimeError(f"connbench serve did not start (exit {server.poll()})")
        clients = {name: the_lab.add_client(name)
                   for name in sorted({v.client for v in VARIANTS})}
        for client in RULE_CLIENTS.values():
            route_vips(clients[client].netns)
        fleet_cg = lab.cgroup.Cgroup.create(f"{the_lab.names}-fleet")
        the_lab.own_cgroup(fleet_cg)
        stack.callback(fleet_cg.remove)
        nodes = {"kvroute": stack.enter_context(_node(the_lab, the_lab.cgroup, fleet=False)),
                 "fleet": stack.enter_context(_node(the_lab, fleet_cg, fleet=True))}
        cgroups = {key: node.cgroup for key, node in nodes.items()}
        # Run-time stats while the bench runs (a reference: closed, they stop unless
        # another holder wants them). They add two clock reads to every program run.
        stats_fd = bpfsys.enable_stats()
        stack.callback(os.close, stats_fd)
        notes.append("BPF run-time stats enabled during the run (BPF_ENABLE_STATS): "
                     "bpf_* fields are in-kernel ns; they add two clock reads a program run")
        pod_addr = str(pod.address)
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kvr-connbench-")))
        for n in counts:
            say(f"connect: {n} services, loading")
            desired = model.desired_from_dict({"services": kvroute_services(n, pod_addr)})
            for key, node in nodes.items():
                node.applier.apply(model.DesiredState())  # from empty: a load, not a delta
                started = time.perf_counter()
                node.applier.apply(desired)
                took = time.perf_counter() - started
                rows.append({"bench": f"load {n} services x {BACKENDS}, {key} apply",
                             "services": n, "value_s": round(took, 3)})
            svcs = rule_services(n, pod_addr)
            why = dict(missing)
            for kind, client in RULE_CLIENTS.items():
                if kind in why:
                    continue
                empty, full = tmp / f"{kind}-empty", tmp / f"{kind}-{n}"
                empty.write_text(rule_file(kind, []))
                full.write_text(rule_file(kind, svcs))
                netns = clients[client].netns
                _, err = run_tool(netns, rule_argv(kind, empty))
                took, err = (0.0, err) if err else run_tool(netns, rule_argv(kind, full))
                if err:
                    why[kind] = f"load failed: {err}"
                    rows.append({"bench": f"load {n} services x {BACKENDS}, {kind}",
                                 "services": n, "unavailable": why[kind]})
                    continue
                rows.append({"bench": f"load {n} services x {BACKENDS}, {kind}",
                             "services": n, "value_s": round(took, 3)})
            say(f"connect: {n} services, {rounds} rounds x {per_round} connects per variant")
            runs: dict[str, list[Paired]] = {v.key: [] for v in VARIANTS[1:]}
            direct: list[lab.connbench.Result] = []
            run_why = dict(why)

            def once(v: Variant) -> tuple[lab.connbench.Result, BpfCost | None]:
                node = nodes.get(v.cgroup or "")
                before = node.run_stats() if node else {}
                res = connect(binary, clients[v.client].netns, cgroups.get(v.cgroup or ""),
                              v.via_vip or pod_addr, VIP_PORT if v.via_vip else FIRST_PORT,
                              per_round, warmup, v.tag)
                if node is None:
                    return res, None
                cost = bpf_cost(before, node.run_stats(), per_round + warmup)
                node.drain()
                return res, cost

            others = VARIANTS[1:]
            for r in range(rounds):
                # Each variant between two direct runs, the order rotated per round.
                direct.append(once(VARIANTS[0])[0])
                for v in others[r % len(others):] + others[:r % len(others)]:
                    if v.key in run_why:
                        continue
                    try:
                        res, cost = once(v)
                    except (ValueError, subprocess.TimeoutExpired) as exc:
                        run_why[v.key] = f"connbench failed: {exc}"
                        continue
                    direct.append(once(VARIANTS[0])[0])
                    runs[v.key].append(Paired(res, direct[-2], direct[-1], cost))
            rows.extend(summarise(n, runs, direct, run_why))
        notes.append(f"fleet datapath: {nodes['fleet'].events} binding events drained")
    return rows, notes

