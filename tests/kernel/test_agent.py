"""The agent as users run it: a process that can die at any moment without
routing stopping, reloads its file, rejects bad input whole, and removes
everything when asked."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from dataplane import apply, loader
from dataplane.maps import MapSet
from lab.fleet import wait_for
from tests.kernel.conftest import POD_PORT, connect_names

KVROUTE = str(Path(sys.executable).parent / "kvroute")
VIP = "10.96.20.1"


@pytest.fixture
def small_lab() -> Iterator[Any]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    from lab import netns, podserver
    lb = netns.Lab().up()
    try:
        for i in range(2):
            pod = lb.add_pod(f"gpu{i}")
            pod.spawn([sys.executable, "-m", "lab.podserver", "--name", pod.name,
                       "--port", str(POD_PORT)])
        lb.add_client("client")
        for pod in lb.pods.values():
            podserver.wait_listening(pod, POD_PORT)
        yield lb
    finally:
        lb.down()


def _write_config(path: Path, lab: Any, affinity: str = "session") -> None:
    path.write_text(yaml.safe_dump({"services": [{
        "name": "llm", "vip": VIP, "port": 80, "affinity": affinity,
        "backends": [{"address": str(p.address), "port": POD_PORT} for p in lab.pods.values()],
    }]}))


class AgentProc:
    def __init__(self, cfg: Path, lab: Any, pin_dir: Path, tmp: Path) -> None:
        self.cfg, self.lab, self.pin_dir, self.tmp = cfg, lab, pin_dir, tmp
        self.n = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tmp / "agent.log"
        self.prefix: list[str] = []  # runs the agent through this (e.g. setpriv)

    def start(self, *extra: str) -> None:
        self.n += 1
        ready = self.tmp / f"ready{self.n}"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.prefix, KVROUTE, "agent", "--config", str(self.cfg),
                 "--cgroup", str(self.lab.cgroup.path),
                 "--pin-dir", str(self.pin_dir), "--ready-file", str(ready), *extra],
                stdout=log, stderr=subprocess.STDOUT)
        self.lab.own_process(self.proc.pid)
        assert wait_for(lambda: ready.exists() or self.proc.poll() is not None, timeout=60), \
            self.log.read_text()
        assert ready.exists(), self.log.read_text()

    def signal(self, sig: int) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)


@pytest.fixture
def agent(small_lab: Any, tmp_path: Path) -> Iterator[AgentProc]:
    pin_dir = Path(f"/sys/fs/bpf/kvrtest-agent-{secrets.token_hex(3)}")
    small_lab.own_pin_dir(pin_dir)
    cfg = tmp_path / "kvroute.yaml"
    _write_config(cfg, small_lab)
    a = AgentProc(cfg, small_lab, pin_dir, tmp_path)
    try:
        yield a
    finally:
        if a.proc and a.proc.poll() is None:
            a.proc.kill()
            a.proc.wait()
        if pin_dir.exists():
            loader.uninstall(pin_dir)


def _connect_loop(seconds: float) -> dict[str, int]:
    out: dict[str, int] = {}
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        name = connect_names(VIP, 80, 0, [f"loop-{i % 50}"])[0]
        out[name] = out.get(name, 0) + 1
        i += 1
    return out


def test_sigkill_and_restart_during_a_connect_loop_loses_no_connect(agent: AgentProc) -> None:
    agent.start()
    client = agent.lab.clients["client"]
    result: dict[str, Any] = {}
    loop = threading.Thread(target=lambda: result.update(client.call(
        _connect_loop, 8.0, cgroup=agent.lab.cgroup, timeout=60)))
    loop.start()
    time.sleep(1.5)
    assert agent.signal(signal.SIGKILL) == -signal.SIGKILL
    # While no agent runs, the pinned links and maps keep routing...
    time.sleep(1.0)
    # ...and a new agent (a fresh compile: an upgrade looks the same) swaps in.
    agent.start()
    loop.join()
    errors = {k: v for k, v in result.items() if k.startswith("error")}
    assert errors == {}, result
    assert sum(result.values()) > 100
    assert set(result) == {"gpu0", "gpu1"}
    log = agent.log.read_text()
    assert "sock4_connect: replaced" in log and "adopted 1 services" in log


def test_bad_file_is_rejected_whole_and_the_maps_stay(agent: AgentProc) -> None:
    agent.start()
    with MapSet(agent.pin_dir) as maps:
        before = apply.read_view(maps)
        good = agent.cfg.read_text()
        # The first service is fine, the second is not: nothing may be applied.
        bad = yaml.safe_load(good)
        bad["services"].append({"name": "broken", "vip": "10.96.20.2", "port": 80,
                                "backends": [{"address": "10.77.92.10", "port": 70000}]})
        bad["services"][0]["backends"] = bad["services"][0]["backends"][:1]
        agent.cfg.write_text(yaml.safe_dump(bad))
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "not applied" in agent.log.read_text(), timeout=10)
        assert "port" in agent.log.read_text()
        assert apply.read_view(maps) == before
    names = agent.lab.clients["client"].call(
        connect_names, VIP, 80, 0, [f"s{i}" for i in range(20)], cgroup=agent.lab.cgroup)
    assert set(names) <= {"gpu0", "gpu1"}


def test_detach_on_exit_removes_everything(agent: AgentProc) -> None:
    agent.start("--detach-on-exit")
    assert agent.signal(signal.SIGTERM) == 0
    assert not agent.pin_dir.exists()
    # No program is left on the cgroup: the VIP is just an unrouted address now.
    names = agent.lab.clients["client"].call(
        connect_names, VIP, 80, 1, sock_timeout=0.5, cgroup=agent.lab.cgroup)
    assert names[0].startswith("error:")


def test_bad_file_at_start_changes_nothing(small_lab: Any, tmp_path: Path) -> None:
    pin_dir = Path(f"/sys/fs/bpf/kvrtest-bad-{secrets.token_hex(3)}")
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("services:\n  - name: x\n    vip: 10.96.20.300\n    port: 80\n")
    proc = subprocess.run(
        [KVROUTE, "agent", "--config", str(cfg), "--cgroup", str(small_lab.cgroup.path),
         "--pin-dir", str(pin_dir)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "vip" in proc.stderr and "nothing changed" in proc.stderr
    assert not pin_dir.exists()


# -- the DaemonSet's capabilities and probes -------------------------------------------------

DAEMONSET = Path(__file__).parents[2] / "deploy" / "kubernetes" / "base" / "daemonset.yaml"


def _manifest_caps() -> list[str]:
    (ds,) = [d for d in yaml.safe_load_all(DAEMONSET.read_text()) if d]
    (agent,) = ds["spec"]["template"]["spec"]["containers"]
    caps = agent["securityContext"]["capabilities"]
    assert caps["drop"] == ["ALL"] and not agent["securityContext"].get("privileged")
    return [c.lower() for c in caps["add"]]


def _setpriv(caps: list[str]) -> list[str]:
    return ["setpriv", "--bounding-set=" + ",".join(["-all", *(f"+{c}" for c in caps)]),
            "--inh-caps=-all", "--"]


def _bounding_set(pid: int) -> set[str]:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines()
                if x.startswith("CapBnd:"))
    decoded = subprocess.run(["capsh", f"--decode={line.split()[1]}"], capture_output=True,
                             text=True, check=True).stdout
    return {c.removeprefix("cap_") for c in decoded.strip().split("=", 1)[1].split(",") if c}


def test_the_agent_runs_with_exactly_the_daemonsets_capabilities(agent: AgentProc) -> None:
    import httpx

    from lab import fleet
    for tool in ("setpriv", "capsh"):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            pytest.skip(f"{tool} (util-linux / libcap2-bin) is not installed")
    caps = _manifest_caps()
    port = fleet.free_port()
    agent.prefix = _setpriv(caps)
    agent.start("--metrics", f"127.0.0.1:{port}")
    assert agent.proc is not None
    # This machine may lack some (a container without SYS_RESOURCE): never more than these.
    mine = _bounding_set(os.getpid())
    assert _bounding_set(agent.proc.pid) == set(caps) & mine
    http = f"http://127.0.0.1:{port}"
    assert httpx.get(f"{http}/readyz", trust_env=False).status_code == 200
    assert httpx.get(f"{http}/livez", trust_env=False).status_code == 200
    names = agent.lab.clients["client"].call(
        connect_names, VIP, 80, 0, [f"s{i}" for i in range(10)], cgroup=agent.lab.cgroup)
    assert set(names) <= {"gpu0", "gpu1"} and names, names
    # A restart adopts the pinned maps and swaps the links: the DaemonSet's rolling update.
    assert agent.signal(signal.SIGKILL) == -signal.SIGKILL
    agent.start("--metrics", f"127.0.0.1:{port}")
    assert "sock4_connect: replaced" in agent.log.read_text()
    names = agent.lab.clients["client"].call(
        connect_names, VIP, 80, 0, [f"s{i}" for i in range(10)], cgroup=agent.lab.cgroup)
    assert set(names) <= {"gpu0", "gpu1"} and names, names
    assert agent.signal(signal.SIGTERM) == 0
    # Each capability is there for a reason: without SYS_ADMIN that restart fails.
    without = [c for c in caps if c != "sys_admin"]
    proc = subprocess.run(
        [*_setpriv(without), KVROUTE, "agent", "--config", str(agent.cfg), "--cgroup",
         str(agent.lab.cgroup.path), "--pin-dir", str(agent.pin_dir)],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Operation not permitted" in proc.stderr, proc.stderr


def test_readyz_turns_red_when_the_pins_are_removed(agent: AgentProc) -> None:
    import httpx

    from lab import fleet
    port = fleet.free_port()
    agent.start("--metrics", f"127.0.0.1:{port}")
    url = f"http://127.0.0.1:{port}/readyz"
    assert httpx.get(url, trust_env=False).text == "ok\n"
    loader.uninstall(agent.pin_dir)  # the operator removed kvroute under a running agent
    r = httpx.get(url, trust_env=False)
    assert r.status_code == 503 and "not pinned" in r.text
