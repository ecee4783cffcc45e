"""Memory the DaemonSet's and the controller's requests and limits are set from.

``python -m lab.bench_memory [--services 10000]`` runs a controller on a static file of
N services x 10 backends (session affinity, so every node builds Maglev tables) and one
agent following it, attached to a test cgroup of its own; it reports

- the agent's peak RSS during the compile (VmHWM when the log says the programs loaded),
- its peak RSS over the whole start (compile, first snapshot, apply),
- its steady RSS once the snapshot is applied (median over ``--settle`` seconds),
- the memory cgroup's peak, which also counts the kernel memory the agent's maps are
  charged to (the BPF maps are charged to the memcg of the process that creates them, so
  a pod's limit must hold them on the node's first start),
- the controller's steady RSS, and both processes' CPU use in steady state (no engine
  to scrape, no traffic: the floor, not a busy node).

Nothing routes: the backends are unroutable addresses and nothing connects. Everything
made (cgroups, pin dir, processes, files) is removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from dataplane import loader
from lab import cgroup, fleet

MEMCG_V1 = Path("/sys/fs/cgroup/memory")  # hybrid hosts: memory is a v1 controller


def _status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def _memory_group() -> Iterator[tuple[Path, str]]:
    v2 = cgroup.Cgroup.create("kvr-mem")
    if (v2.path / "memory.peak").exists():
        try:
            yield v2.path, "memory.peak"
        finally:
            v2.remove()
        return
    v2.remove()
    if not MEMCG_V1.is_dir():
        raise SystemExit("no memory cgroup controller found (v2 memory.peak or v1 memory)")
    path = MEMCG_V1 / f"kvr-mem-{secrets.token_hex(3)}"
    path.mkdir()
    try:
        yield path, "memory.max_usage_in_bytes"
    finally:
        for _ in range(50):
            try:
                path.rmdir()
                break
            except OSError:
                time.sleep(0.1)
        else:
            print(f"could not remove the memory cgroup {path}", file=sys.stderr)


@contextlib.contextmanager
def _stopped(procs: list[subprocess.Popen[bytes]]) -> Iterator[None]:
    """Stop ``procs`` on the way out: before their memory cgroup is removed."""
    try:
        yield
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def _services(n: int, per_service: int) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        vip = f"10.{100 + i // 65536}.{i // 256 % 256}.{i % 256}"
        endpoints = [{"address": f"10.{200 + (i * per_service + j) // 65536}."
                                 f"{(i * per_service + j) // 256 % 256}."
                                 f"{(i * per_service + j) % 256}",
                      "port": 8000, "node": f"node{j % 3}"} for j in range(per_service)]
        out.append({"name": f"svc-{i}", "vip": vip, "port": 80, "affinity": "session",
                    "endpoints": endpoints})
    return out


def measure(n_services: int, per_service: int, settle: float) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="kvroute-mem-"))
    static = work / "services.yaml"
    static.write_text(yaml.safe_dump({"services": _services(n_services, per_service)}))
    grpc_port, http_port = fleet.free_port(), fleet.free_port()
    pin_dir = Path(f"/sys/fs/bpf/kvrmem-{secrets.token_hex(3)}")
    attach_to = cgroup.Cgroup.create("kvr-mem-clients")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with _memory_group() as (memcg, peak_file), _stopped(procs):
            ctl_log = open(work / "controller.log", "wb")  # noqa: SIM115
            ctl = subprocess.Popen([fleet.KVROUTE, "controller", "--static", str(static),
                                    "--listen", f"127.0.0.1:{grpc_port}"],
                                   stdout=ctl_log, stderr=ctl_log)
            procs.append(ctl)
            ready = work / "ready"
            agent_log = work / "agent.log"
            with open(agent_log, "wb") as log:
                agent = subprocess.Popen(
                    [fleet.KVROUTE, "agent", "--controller", f"127.0.0.1:{grpc_port}",
                     "--node", "node0", "--cgroup", str(attach_to.path), "--pin-dir",
                     str(pin_dir), "--ready-file", str(ready), "--metrics",
                     f"127.0.0.1:{http_port}"],
                    stdout=log, stderr=subprocess.STDOUT,
                    preexec_fn=lambda: (memcg / "cgroup.procs").write_text("0"))
            procs.append(agent)
            started = time.monotonic()
            compile_peak = None
            while not ready.exists():
                if agent.poll() is not None:
                    raise SystemExit(f"agent exited:\n{agent_log.read_text()[-3000:]}")
                if time.monotonic() - started > 600:
                    raise SystemExit("agent not ready after 600 s")
                if compile_peak is None and "programs compiled" in agent_log.read_text():
                    compile_peak = _status(agent.pid)["VmHWM"]
                time.sleep(0.02)
            ready_after = time.monotonic() - started
            samples, ctl_samples = [], []
            cpu0 = (_cpu_seconds(agent.pid), _cpu_seconds(ctl.pid), time.monotonic())
            deadline = time.monotonic() + settle
            while time.monotonic() < deadline:
                samples.append(_status(agent.pid)["VmRSS"])
                ctl_samples.append(_status(ctl.pid)["VmRSS"])
                time.sleep(0.5)
            wall = time.monotonic() - cpu0[2]
            agent_cpu = (_cpu_seconds(agent.pid) - cpu0[0]) / wall
            ctl_cpu = (_cpu_seconds(ctl.pid) - cpu0[1]) / wall
            mib = 1 << 20
            return {
                "services": n_services, "backends_per_service": per_service,
                "agent_ready_seconds": round(ready_after, 1),
                "agent_compile_peak_rss_mib": round((compile_peak or 0) / mib, 1),
                "agent_start_peak_rss_mib": round(_status(agent.pid)["VmHWM"] / mib, 1),
                "agent_steady_rss_mib": round(statistics.median(samples) / mib, 1),
                "agent_memcg_peak_mib": round(int((memcg / peak_file).read_text()) / mib, 1),
                "agent_steady_cpu_cores": round(agent_cpu, 3),
                "controller_steady_cpu_cores": round(ctl_cpu, 3),
                "controller_steady_rss_mib": round(statistics.median(ctl_samples) / mib, 1),
                "controller_peak_rss_mib": round(_status(ctl.pid)["VmHWM"] / mib, 1),
            }
    finally:
        if pin_dir.exists():
            loader.uninstall(pin_dir)
        attach_to.remove()
        for f in work.iterdir():
            f.unlink()
        work.rmdir()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--services", type=int, default=10_000)
    ap.add_argument("--backends", type=int, default=10, help="per service")
    ap.add_argument("--settle", type=float, default=20.0,
                    help="seconds of steady state sampled after the first apply")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (eBPF, cgroups)", file=sys.stderr)
        return 1
    print(json.dumps(measure(args.services, args.backends, args.settle), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
