"""`make demo`: the socket load balancer on one machine, end to end.

Builds a lab (GPU pods in network namespaces serving their names), runs the
agent on a generated config, drives tagged multi-turn sessions through the
Service VIP, drains one pod, shows the maps, and tears everything down.
"""

from __future__ import annotations

import collections
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from lab import netns, podserver

VIP, PORT, POD_PORT = "10.96.0.10", 80, 8000
console = Console(highlight=False)


def _sessions(vip: str, port: int, sessions: list[str], turns: int) -> list[list[str]]:
    """Each session opens a new tagged connection per turn, as a chat client would."""
    import socket

    from dataplane import client
    out = []
    for sid in sessions:
        seen = []
        for _ in range(turns):
            with socket.socket() as s:
                s.settimeout(2)
                client.tag_session(s, sid)
                try:
                    s.connect((vip, port))
                    seen.append(podserver.ask_on(s))
                except OSError as exc:
                    seen.append(f"error:{exc.strerror}")
        out.append(seen)
    return out


def _config(lab: netns.Lab, draining: str | None = None) -> dict[str, Any]:
    return {"services": [{
        "name": "llm-chat", "vip": VIP, "port": PORT, "affinity": "session",
        "backends": [{"address": str(p.address), "port": POD_PORT,
                      "state": "draining" if p.name == draining else "active"}
                     for p in lab.pods.values()],
    }]}


def _kvroute(*args: str) -> str:
    exe = str(Path(sys.executable).parent / "kvroute")
    return subprocess.run([exe, *args], capture_output=True, text=True, check=True).stdout


def _table(title: str, results: list[list[str]], pods: list[str]) -> Table:
    counts = collections.Counter(name for turns in results for name in turns)
    console.print(f"[bold]{title}")
    t = Table(box=None)
    t.add_column("backend")
    t.add_column("connections", justify="right")
    for name in [*pods, *sorted(k for k in counts if k not in pods)]:
        t.add_row(name, str(counts[name]))
    return t


def run(pods: int = 3, sessions: int = 200, turns: int = 3) -> int:
    pin_dir = Path(f"/sys/fs/bpf/kvroute-demo-{secrets.token_hex(2)}")
    workdir = Path(tempfile.mkdtemp(prefix="kvroute-demo-"))
    cfg = workdir / "kvroute.yaml"
    agent: subprocess.Popen[bytes] | None = None
    with netns.Lab(subnet="10.77.50.0/24") as lab:
        console.rule("[bold]kvroute demo: in-kernel session affinity on one machine")
        for i in range(pods):
            pod = lab.add_pod(f"gpu{i}")
            pod.spawn([sys.executable, "-m", "lab.podserver", "--name", pod.name,
                       "--port", str(POD_PORT)], stdout=subprocess.DEVNULL)
        client = lab.add_client("client")
        for pod in lab.pods.values():
            podserver.wait_listening(pod, POD_PORT)
        where = ", ".join(f"{p.name}={p.address}" for p in lab.pods.values())
        console.print(f"lab: {pods} GPU pods ({where}), client {client.address}, "
                      f"cgroup {lab.cgroup.path}")
        cfg.write_text(yaml.safe_dump(_config(lab)))
        ready = workdir / "ready"
        log = open(workdir / "agent.log", "wb")  # noqa: SIM115 - closed in finally
        try:
            agent = subprocess.Popen(
                [str(Path(sys.executable).parent / "kvroute"), "agent", "--config", str(cfg),
                 "--cgroup", str(lab.cgroup.path), "--pin-dir", str(pin_dir),
                 "--ready-file", str(ready), "--detach-on-exit"], stdout=log, stderr=log)
            started = time.monotonic()
            while not ready.exists():
                if agent.poll() is not None:
                    console.print((workdir / "agent.log").read_text())
                    return 1
                time.sleep(0.1)
            console.print(f"agent: programs compiled, attached and config applied in "
                          f"{time.monotonic() - started:.1f}s; service llm-chat at {VIP}:{PORT}")

            ids = [f"user-{i}" for i in range(sessions)]
            results = client.call(_sessions, VIP, PORT, ids, turns, cgroup=lab.cgroup)
            names = list(lab.pods)
            console.print(_table(f"{sessions} sessions x {turns} turns through {VIP}:{PORT}",
                                 results, names))
            sticky = sum(1 for turns_ in results if len(set(turns_)) == 1)
            console.print(f"sessions that kept one backend across all turns: "
                          f"[bold]{sticky}/{sessions}[/bold]")

            console.rule("drain gpu0 (a terminating pod): no new sessions, its sessions move")
            cfg.write_text(yaml.safe_dump(_config(lab, draining="gpu0")))
            agent.send_signal(signal.SIGHUP)
            time.sleep(1.0)
            after = client.call(_sessions, VIP, PORT, ids, 1, cgroup=lab.cgroup)
            moved = sum(1 for b, a in zip(results, after, strict=True) if b[0] != a[0])
            on_gpu0 = sum(1 for b in results if b[0] == "gpu0")
            console.print(_table("next turn of every session", after, names))
            console.print(f"sessions moved: {moved} (all {on_gpu0} that were on gpu0, no other)")

            console.rule("kvroute maps services")
            console.print(_kvroute("maps", "services", "--pin-dir", str(pin_dir)))
            console.rule("kvroute maps backends")
            console.print(_kvroute("maps", "backends", "--pin-dir", str(pin_dir)))
            console.rule("kvroute explain 10.96.0.10:80 --session user-7")
            console.print(_kvroute("explain", f"{VIP}:{PORT}", "--session", "user-7",
                                   "--pin-dir", str(pin_dir)))
            ok = sticky == sessions and moved == on_gpu0
        finally:
            if agent and agent.poll() is None:
                agent.send_signal(signal.SIGTERM)
                agent.wait(timeout=30)
            log.close()
            if pin_dir.exists():  # the agent died early: remove what it left
                from dataplane import loader
                loader.uninstall(pin_dir)
    console.rule("torn down: programs detached, maps removed, namespaces deleted")
    return 0 if ok else 1
