"""Cluster DNS through a UDP VIP in the lab: Debian's dnsmasq as the resolvers, dig and a
compiled client (lab/dnsbench.c) as the clients.

``python -m lab.dns bench`` builds a lab with two dnsmasq pods and a client, puts a
dual-stack UDP service (an IPv4 and an IPv6 VIP, port 53) in front of them, checks that
``dig`` gets its answer from the VIP over both families, then measures queries a second
through the VIP against the same client asking one resolver directly, alternating the two
so the machine's load hits both alike, and kvroute's own in-kernel time per query from BPF
run-time stats (on a shared machine the steadier number). Needs root, dnsmasq (apt-get
install dnsmasq-base), dig (dnsutils) and cc.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lab.cgroup
import lab.connbench
import lab.netns
import lab.run
from dataplane import apply, bpfsys, loader, model
from dataplane.maps import MapSet
from dataplane.settings import Settings

SOURCE = Path(__file__).with_name("dnsbench.c")
NAME = "who.kvr.test"  # each resolver answers it with its own address: who answered
VIP4 = "10.96.53.10"
VIP6 = "fd00:96::53:10"
DNS_PORT = 53
TOOLS = ("dnsmasq", "dig", "cc")


def tools_missing() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


def dnsmasq_argv(pod: lab.netns.Pod) -> list[str]:
    """A resolver bound to the pod's two addresses that answers NAME with them (A and
    AAAA) and knows nothing else: no config file, no upstream, no /etc/hosts."""
    return ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv",
            "--no-hosts", "--pid-file=", "--log-facility=-", f"--port={DNS_PORT}",
            "--bind-interfaces", f"--listen-address={pod.address}",
            f"--listen-address={pod.address6}",
            f"--address=/{NAME}/{pod.address}", f"--address=/{NAME}/{pod.address6}"]


def dig(server: str, qtype: str = "A", timeout: float = 2.0) -> tuple[str, str]:
    """Ask ``server`` for NAME with dig: (the answer, the server dig says replied). dig
    itself refuses a reply from any other address than the one it asked (";; reply from
    unexpected source"), so an answer through a VIP proves the reply came from the VIP."""
    done = subprocess.run(["dig", f"@{server}", "-p", str(DNS_PORT), "+time=1", "+tries=2",
                           NAME, qtype], capture_output=True, text=True, timeout=timeout + 5,
                          check=False)
    answer = ""
    replied = ""
    for line in done.stdout.splitlines():
        if line.startswith(NAME + ".") and "\tIN\t" in line.replace(" ", "\t"):
            answer = line.split()[-1]
        if line.startswith(";; SERVER:"):
            replied = line.split()[2].split("#")[0]
    return answer, replied


def wait_answering(pod: lab.netns.Pod, timeout: float = 10.0) -> None:
    """Block until the pod's resolver answers, asked from inside the pod."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pod.call(dig, str(pod.address), timeout=10)[0]:
            return
        time.sleep(0.1)
    raise TimeoutError(f"dnsmasq in {pod.name} does not answer after {timeout}s")


@dataclasses.dataclass(frozen=True)
class Result:
    """One dnsbench run."""

    n: int
    ok: int
    errors: int
    wrong_source: int  # answers whose source was not the address asked
    p50_ns: int
    p99_ns: int
    rate: float  # answered queries a second


def parse(text: str) -> Result:
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError("dnsbench printed nothing")
    raw: dict[str, Any] = json.loads(lines[-1])
    return Result(n=int(raw["n"]), ok=int(raw["ok"]), errors=int(raw["errors"]),
                  wrong_source=int(raw["wrong_source"]), p50_ns=int(raw["p50_ns"]),
                  p99_ns=int(raw["p99_ns"]), rate=float(raw["rate"]))


def build() -> Path:
    return lab.connbench.build(source_file=SOURCE)


def query(binary: Path, netns: str, cgroup: lab.cgroup.Cgroup, server: str, count: int,
          mode: str) -> Result:
    """Run the compiled client in ``netns`` and ``cgroup`` against ``server``."""
    if mode not in ("reuse", "new"):
        raise ValueError(f"mode must be reuse or new, got {mode!r}")
    proc = lab.run.spawn(netns, [str(binary), server, str(DNS_PORT), str(count), mode, NAME],
                         cgroup=cgroup, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=600)
    if not out.strip():
        raise RuntimeError(f"dnsbench failed: {err.decode(errors='replace').strip()}")
    return parse(out.decode())


def service(pods: list[lab.netns.Pod]) -> dict[str, Any]:
    """The dual-stack UDP service in front of the resolvers."""
    return {"name": "kube-dns", "vip": VIP4, "vip6": VIP6, "port": DNS_PORT,
            "protocol": "udp",
            "backends": [{"address": str(p.address), "address6": str(p.address6),
                          "port": DNS_PORT} for p in pods]}


@dataclasses.dataclass
class DnsLab:
    the_lab: lab.netns.Lab
    pods: list[lab.netns.Pod]  # the resolvers
    client: lab.netns.Pod
    applier: apply.Applier
    datapath: loader.Datapath

    def run_stats(self) -> dict[str, tuple[int, int]]:
        """(run_time_ns, run_cnt) of every attached program; counted while BPF run-time
        stats are enabled (bpfsys.enable_stats)."""
        return {p.name: bpfsys.prog_run_stats(self.datapath.fds[p.name])
                for p in loader.PROGRAMS}


@contextlib.contextmanager
def dns_lab(resolvers: int = 2) -> Iterator[DnsLab]:
    """A lab with ``resolvers`` dnsmasq pods and a client, kvroute attached to the client
    cgroup with the DNS service applied."""
    with lab.netns.Lab() as the_lab:
        pods = [the_lab.add_pod(f"dns{i}") for i in range(resolvers)]
        for pod in pods:
            pod.spawn(dnsmasq_argv(pod), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = the_lab.add_client("client")
        for pod in pods:
            wait_answering(pod)
        pin_dir = Path(f"/sys/fs/bpf/kvrdns-{secrets.token_hex(3)}")
        the_lab.own_pin_dir(pin_dir)
        settings = Settings(pin_dir=pin_dir)
        datapath = loader.Datapath(settings)
        try:
            datapath.attach(the_lab.cgroup.path)
            with MapSet(pin_dir) as maps:
                applier = apply.Applier(maps, settings.hash_seed)
                try:
                    applier.apply(model.desired_from_dict({"services": [service(pods)]}))
                    yield DnsLab(the_lab, pods, client, applier, datapath)
                finally:
                    applier.close()
        finally:
            datapath.close()
            loader.uninstall(pin_dir)


def bench(count: int, rounds: int) -> dict[str, Any]:
    """dig through both VIPs, then queries a second: direct to dns0 vs through the VIP,
    for each family and both socket modes, alternated ``rounds`` times."""
    missing = tools_missing()
    if missing:
        raise SystemExit(f"missing tools: {', '.join(missing)} "
                         "(apt-get install -y dnsmasq-base dnsutils gcc)")
    binary = build()
    out: dict[str, Any] = {"queries": count, "rounds": rounds, "dig": {}, "runs": {}}
    with dns_lab() as env, _stats() as stats_on:
        the_lab, pods, client = env.the_lab, env.pods, env.client
        out["kernel_stats"] = stats_on
        answers = {str(p.address) for p in pods} | {str(p.address6) for p in pods}
        for vip, qtype in ((VIP4, "A"), (VIP6, "AAAA")):
            seen = [client.call(dig, vip, qtype, cgroup=the_lab.cgroup) for _ in range(8)]
            out["dig"][vip] = {"answers": sorted({a for a, _ in seen}),
                               "replied_from": sorted({r for _, r in seen})}
            if not {a for a, _ in seen} <= answers or {r for _, r in seen} != {vip}:
                raise RuntimeError(f"dig through {vip}: {seen}")
        targets = {"v4 direct": str(pods[0].address), "v4 vip": VIP4,
                   "v6 direct": str(pods[0].address6), "v6 vip": VIP6}
        for mode in ("reuse", "new"):
            for _ in range(rounds):
                for label, server in targets.items():
                    before = env.run_stats()
                    r = query(binary, client.netns, the_lab.cgroup, server, count, mode)
                    row = dataclasses.asdict(r)
                    row["kernel_ns"] = kernel_ns(before, env.run_stats(), r.ok)
                    out["runs"].setdefault(f"{label} {mode}", []).append(row)
    out["summary"] = summary(out["runs"])
    return out


@contextlib.contextmanager
def _stats() -> Iterator[bool]:
    """BPF run-time stats on for the bench (False where the kernel refuses them)."""
    try:
        fd = bpfsys.enable_stats()
    except OSError:
        yield False
        return
    try:
        yield True
    finally:
        os.close(fd)


def kernel_ns(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]],
              queries: int) -> float:
    """kvroute's in-kernel time per answered query over a run: every attached program
    (sendmsg, recvmsg, connect, release; a pick program's time is its caller's)."""
    spent = sum(after[k][0] - before[k][0] for k in after)
    return round(spent / queries, 1) if queries else 0.0


def summary(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Per family and mode, direct and through the VIP: the median of the runs' rates and
    of their median latencies, and VIP/direct of each. On a shared machine the rate moves
    with other work's tail; the median latency is the steadier of the two."""
    def median(xs: list[float]) -> float:
        xs = sorted(xs)
        return xs[len(xs) // 2]

    out = {}
    for fam in ("v4", "v6"):
        for mode in ("reuse", "new"):
            direct, vip = runs[f"{fam} direct {mode}"], runs[f"{fam} vip {mode}"]
            d_qps, v_qps = median([r["rate"] for r in direct]), median([r["rate"] for r in vip])
            d_p50 = median([r["p50_ns"] for r in direct]) / 1000
            v_p50 = median([r["p50_ns"] for r in vip]) / 1000
            out[f"{fam} {mode}"] = {
                "vip_kernel_ns": median([r["kernel_ns"] for r in vip]),
                # The same programs on queries to the resolver: a lookup that misses.
                "direct_kernel_ns": median([r["kernel_ns"] for r in direct]),
                "direct_qps": round(d_qps), "vip_qps": round(v_qps),
                "qps_ratio": round(v_qps / d_qps, 3) if d_qps else 0.0,
                "direct_p50_us": round(d_p50, 1), "vip_p50_us": round(v_p50, 1),
                "p50_ratio": round(v_p50 / d_p50, 3) if d_p50 else 0.0}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lab.dns",
                                     description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("bench", help="dig through the VIPs, then queries/s VIP vs direct")
    run.add_argument("--queries", type=int, default=20000, help="queries per run")
    run.add_argument("--rounds", type=int, default=3,
                     help="runs per target (direct and VIP alternate); the median counts")
    run.add_argument("--json", action="store_true", help="print every run as JSON")
    args = parser.parse_args(argv)
    if args.queries < 1 or args.rounds < 1:
        parser.error("--queries and --rounds must be positive")
    data = bench(args.queries, args.rounds)
    if args.json:
        json.dump(data, sys.stdout, indent=2)
        print()
        return
    for vip, seen in data["dig"].items():
        print(f"dig @{vip}: answers {', '.join(seen['answers'])}; "
              f"replied from {', '.join(seen['replied_from'])}")
    print(f"{'family/mode':<12} {'direct q/s':>11} {'VIP q/s':>9} {'ratio':>6} "
          f"{'direct p50 us':>14} {'VIP p50 us':>11} {'ratio':>6} {'kvroute ns/q':>13} "
          f"{'(direct)':>9}")
    for key, row in data["summary"].items():
        print(f"{key:<12} {row['direct_qps']:>11} {row['vip_qps']:>9} {row['qps_ratio']:>6} "
              f"{row['direct_p50_us']:>14} {row['vip_p50_us']:>11} {row['p50_ratio']:>6} "
              f"{row['vip_kernel_ns']:>13} {row['direct_kernel_ns']:>9}")


if __name__ == "__main__":
    main()
