"""A whole kvroute deployment on one machine, for the end-to-end tests, the
demo and the LLM bench: engines in pod namespaces (simulators, or real vLLM CPU
engines with ``engine="vllm"``), a controller with a static
discovery file, and one agent per "node" (each node is a cgroup and a pin
dir of its own, so two agents route the same clients independently).

The services file and the processes' command lines come from :mod:`lab.topology`,
as in the multi-node VM lab (:mod:`lab.multinode`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import yaml

from lab import cgroup, netns, podserver, scenario, topology, vllm_engine

ENGINE_PORT = topology.ENGINE_PORT
ENGINE_KINDS = ("sim", "vllm")
KVROUTE = str(Path(sys.executable).parent / "kvroute")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Defined with the scenario (which cannot import this module); tests and the demo use it
# from here.
wait_for = scenario.wait_for


@dataclasses.dataclass
class Node:
    name: str
    cgroup: cgroup.Cgroup
    pin_dir: Path
    ready: Path
    proc: subprocess.Popen[bytes] | None = None


def engine_of(vip: str, port: int, session: str | None, timeout: float = 2.0) -> str:
    """One new connection (tagged with the session, if any) and one request; the
    engine that answered, or 'error:<reason>'. Runs inside a client namespace."""
    from dataplane import client
    s = socket.socket()
    s.settimeout(timeout)
    try:
        if session is not None:
            client.tag_session(s, session)
        s.connect((vip, port))
        s.sendall(b"GET /v1/models HTTP/1.0\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        for line in data.split(b"\r\n"):
            if line.lower().startswith(b"x-engine-id:"):
                return line.split(b":", 1)[1].strip().decode()
        return "error:no engine id"
    except OSError as exc:
        return f"error:{exc.strerror or exc}"
    finally:
        s.close()


def engines_for(vip: str, port: int, sessions: Sequence[str | None]) -> list[str]:
    return [engine_of(vip, port, sid) for sid in sessions]


class Fleet:
    def __init__(self, subnet: str | None = None, engines: int = 3, nodes: int = 1,
                 vip: str = "10.96.0.10",
                 port: int = 80, scrape_interval: float = 0.05, tick: float = 0.05,
                 fail_k: int = 3, breaker: dict[str, float] | None = None,
                 epsilon: float = 0.25, stall_window: float = 0.75,
                 engine: str = "sim", vllm_venv: Path = vllm_engine.DEFAULT_VENV,
                 extra_services: Sequence[dict[str, Any]] = (),
                 sim_args: Sequence[str] = ()) -> None:
        if engine not in ENGINE_KINDS:
            raise ValueError(f"engine must be one of {', '.join(ENGINE_KINDS)}, got {engine!r}")
        if engine == "vllm" and not vllm_engine.available(vllm_venv):
            raise ValueError(f"no vLLM venv at {vllm_venv}: run `make vllm` first")
        self.lab = netns.Lab(subnet=subnet)
        self.n_engines = engines
        self.engine_kind, self.vllm_venv = engine, vllm_venv
        self.sim_args = list(sim_args)  # every simulator's options (e.g. --speed)
        # More services on the same endpoints (another VIP, another affinity): each dict
        # overrides the main service's fields; "engine": None makes it a plain Service.
        self.extra_services = [dict(s) for s in extra_services]
        self.vip, self.port = vip, port
        self.scrape_interval, self.tick, self.fail_k = scrape_interval, tick, fail_k
        # One outcome per scrape round: 3 failed rounds in a row (150 ms at the lab's
        # 50 ms scrapes, 750 ms with a hung engine's 250 ms timeouts) open a breaker.
        self.breaker = breaker or {"consecutive-failures": 3, "cooldown": 1}
        self.stall_window = stall_window
        self.epsilon = epsilon
        # Sticky until saturated: a live session leaves an engine over (1 + this) x the
        # mean load; None (the default) keeps sessions on any usable engine.
        self.move_epsilon: float | None = None
        self.workdir = Path(tempfile.mkdtemp(prefix="kvroute-fleet-"))
        self.static = self.workdir / "services.yaml"
        self.controller_port = free_port()
        self.controller_http = free_port()
        self.controller: subprocess.Popen[bytes] | None = None
        self.n_nodes = nodes
        self.nodes: list[Node] = []  # made by up(), owned by the lab
        self.engines: dict[str, netns.Pod] = {}
        self.engine_procs: dict[str, subprocess.Popen[bytes]] = {}
        self.client: netns.Pod | None = None

    # -- lifecycle ------------------------------------------------------------------------
    def up(self) -> Fleet:
        try:
            self.lab.up()
            for i in range(self.n_nodes):
                group = cgroup.Cgroup.create(f"kvr-fleet-node{i}")
                self.lab.own_cgroup(group)
                pin_dir = Path(f"/sys/fs/bpf/kvrfleet-{secrets.token_hex(2)}-{i}")
                self.lab.own_pin_dir(pin_dir)
                self.nodes.append(Node(f"node{i}", group, pin_dir,
                                       self.workdir / f"ready-node{i}"))
            for i in range(self.n_engines):
                pod = self.lab.add_pod(f"gpu{i}")
                self.engines[pod.name] = pod
            if self.engine_kind == "vllm":
                # Start-up is mostly waiting: all at once (start_many stops the others
                # when one fails).
                vllm_engine.start_many([functools.partial(self._start_vllm, n)
                                        for n in self.engines])
            else:
                for name in self.engines:
                    self.start_engine(name)
            self.client = self.lab.add_client("client")
            for pod in self.engines.values():
                podserver.wait_listening(pod, ENGINE_PORT, timeout=20)
            self.write_services()
            self.start_controller()
            for node in self.nodes:
                self.start_agent(node)
            return self
        except BaseException:
            self.down()
            raise

    def down(self) -> None:
        for node in self.nodes:
            if node.proc and node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)
                try:
                    node.proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    node.proc.kill()
            if node.pin_dir.exists():
                from dataplane import loader
                loader.uninstall(node.pin_dir)
        self.stop_controller()
        # Before the lab, which drops its record (naming these) once it is down.
        for node in self.nodes:
            node.cgroup.remove()
        self.lab.down()

    def __enter__(self) -> Fleet:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    # -- pieces -----------------------------------------------------------------------------
    def engine_id(self, name: str) -> str:
        return f"{self.engines[name].address}:{ENGINE_PORT}"

    def topology(self) -> topology.Topology:
        """This fleet as a topology: every node reaches the controller on loopback; the
        engines, in their pods, are spread over the nodes in turn."""
        nodes = [n.name for n in self.nodes] or [f"node{i}" for i in range(self.n_nodes)]
        return topology.Topology(
            nodes={n: "127.0.0.1" for n in nodes},
            engines=tuple(topology.Engine(name, nodes[i % len(nodes)], str(pod.address))
                          for i, (name, pod) in enumerate(self.engines.items())),
            controller=nodes[0], client=nodes[0], vip=self.vip, port=self.port,
            controller_port=self.controller_port, controller_http_port=self.controller_http)

    def start_engine(self, name: str, *extra: str) -> None:
        """Start (or restart) engine ``name``: a simulator, or a real vLLM CPU engine
        (which returns once it is healthy and warmed up, tens of seconds)."""
        if self.engine_kind == "vllm":
            if extra:
                raise ValueError("simulator options given to a vLLM engine")
            self._start_vllm(name)
            return
        pod = self.engines[name]
        (engine,) = [e for e in self.topology().engines if e.name == name]
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - the process owns it
        self.engine_procs[name] = pod.spawn(
            [*topology.Topology.engine_argv(sys.executable, engine), *self.sim_args, *extra],
            stdout=log, stderr=log)

    def _start_vllm(self, name: str) -> vllm_engine.Engine:
        pod = self.engines[name]
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - the process owns it

        def spawn(args: list[str], /, *, env: dict[str, str]) -> subprocess.Popen[bytes]:
            return pod.spawn(args, env=env, stdout=log, stderr=log)

        index = list(self.engines).index(name)
        # Each engine's OMP threads on a core of their own (round robin), so engines
        # sharing the machine's few cores do not fight over one.
        engine = vllm_engine.start(str(pod.address), ENGINE_PORT, spawn=spawn,
                                   venv=self.vllm_venv, cpu=index % (os.cpu_count() or 1),
                                   log_path=self.workdir / f"{name}.log")
        self.engine_procs[name] = engine.process  # type: ignore[assignment]
        return engine

    def kill_engine(self, name: str) -> None:
        """SIGKILL engine ``name`` and whatever it forked: a crash, no goodbye."""
        proc = self.engine_procs[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # spawn() gave it a session of its own
        proc.wait()

    def write_services(self, draining: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        options: dict[str, Any] = {"epsilon": self.epsilon, "breaker": self.breaker}
        if self.move_epsilon is not None:
            options["move-epsilon"] = self.move_epsilon
        doc = self.topology().services_doc(options, frozenset(draining))
        svc = doc["services"][0]
        for extra in self.extra_services:
            other = {**svc, **extra}
            if other.get("engine") is None:
                # A plain Service: no engine, so no load, breaker or epsilon of its own.
                for key in ("engine", "epsilon", "metrics-port", "breaker", "move-epsilon"):
                    other.pop(key, None)
            doc["services"].append(other)
        self.static.write_text(yaml.safe_dump(doc))

    def start_controller(self) -> None:
        log = open(self.workdir / "controller.log", "ab")  # noqa: SIM115
        self.controller = subprocess.Popen(
            self.topology().controller_argv(KVROUTE, str(self.static),
                                            extra=["--tick", str(self.tick)]),
            stdout=log, stderr=log)
        self.lab.own_process(self.controller.pid)

    def controller_listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.controller_port), timeout=0.2):
                return True
        except OSError:
            return False

    def stop_controller(self, sig: int = signal.SIGTERM) -> None:
        if self.controller and self.controller.poll() is None:
            self.controller.send_signal(sig)
            try:
                self.controller.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.controller.kill()
                self.controller.wait()
        self.controller = None

    def start_agent(self, node: Node, timeout: float = 60) -> None:
        node.ready.unlink(missing_ok=True)
        log = open(self.workdir / f"agent-{node.name}.log", "ab")  # noqa: SIM115
        node.proc = subprocess.Popen(
            self.topology().agent_argv(KVROUTE, node.name, extra=[
                "--cgroup", str(node.cgroup.path), "--pin-dir", str(node.pin_dir),
                "--ready-file", str(node.ready), "--scrape-interval",
                str(self.scrape_interval), "--stall-window", str(self.stall_window),
                "--fail-k", str(self.fail_k), "--detach-on-exit"]),
            stdout=log, stderr=log)
        self.lab.own_process(node.proc.pid)
        proc = node.proc
        if not wait_for(lambda: node.ready.exists() or proc.poll() is not None, timeout):
            raise RuntimeError(f"agent {node.name} not ready:\n{self.log(f'agent-{node.name}')}")
        if not node.ready.exists():
            raise RuntimeError(f"agent {node.name} exited:\n{self.log(f'agent-{node.name}')}")

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    # -- acting and looking -------------------------------------------------------------------
    def fault(self, name: str, **faults: Any) -> None:
        url = f"http://{self.engines[name].address}:{ENGINE_PORT}/admin/faults"
        try:
            httpx.post(url, json=faults, timeout=2.0, trust_env=False)
        except httpx.HTTPError:
            if not faults.get("crash"):  # a crash may cut the answer short
                raise

    @contextlib.contextmanager
    def loaded(self, hot: str) -> Iterator[str]:
        """Load engine ``hot`` for real (a shrunken KV cache and a queue of long requests
        sent straight to its pod) until every node's kernel sees its load and the
        controller has moved its weight; undone on exit, back to load 0 and the weight
        restored. Yields its engine id."""
        hot_id = self.engine_id(hot)
        stop = threading.Event()

        def hammer() -> None:
            body = {"model": "kvroute/tiny-sim", "prompt": "x " * 200, "max_tokens": 400}
            with httpx.Client(base_url=f"http://{hot_id}", timeout=30, trust_env=False) as c:
                while not stop.is_set():
                    try:
                        c.post("/v1/completions", json=body)
                    except httpx.HTTPError:
                        time.sleep(0.05)

        nodes = range(len(self.nodes))
        self.fault(hot, kv_blocks=64)
        threads = [threading.Thread(target=hammer, daemon=True) for _ in range(12)]
        for t in threads:
            t.start()
        try:
            if not wait_for(lambda: all(self.backends(n)[hot_id]["load"] > 0 for n in nodes),
                            10):
                raise RuntimeError(f"{hot} never showed a load")
            time.sleep(1.0)  # a few controller ticks: weights follow the load
            yield hot_id
        finally:
            stop.set()
            for t in threads:
                t.join(10)
            self.fault(hot, kv_blocks=4096)
        if not wait_for(lambda: all(self.backends(n)[hot_id]["load"] == 0 for n in nodes), 30):
            raise RuntimeError(f"{hot} kept a load after its queue ended")
        time.sleep(1.0)  # weights follow back

    def sessions(self, node: int, sessions: Sequence[str | None]) -> list[str]:
        assert self.client is not None
        return self.client.call(engines_for, self.vip, self.port, sessions,
                                cgroup=self.nodes[node].cgroup, timeout=120)

    def converged(self) -> bool:
        """Every agent watches the controller and has applied its latest snapshot."""
        return scenario.converged(self.topology())

    def backends(self, node: int) -> dict[str, dict[str, Any]]:
        """The node's kernel view: engine id (ip:port) -> state, load, counters."""
        from dataplane import inspect, maps
        with maps.MapSet(self.nodes[node].pin_dir) as m:
            return {b["address"].split("/")[0]: b for b in inspect.backends(m)}


def kvroute(*args: str) -> str:
    return subprocess.run([KVROUTE, *args], capture_output=True, text=True, check=True).stdout


def env_ok() -> str | None:
    """Why this machine cannot run a fleet, or None."""
    if os.geteuid() != 0:
        return "needs root (eBPF, cgroups, network namespaces)"
    return None
