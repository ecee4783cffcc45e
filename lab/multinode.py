"""One node of the multi-node lab (``vagrant/``): start the pieces a topology puts on
this node and keep them running.

``kvroute lab node --topology FILE --node NAME`` runs, in the foreground until
SIGTERM: the controller (on the controller's node, on the static services file the
topology makes), this node's engines (simulators on the node's own address) and an
agent attached to the node's cgroup v2 root (as the DaemonSet's is) with the default
pin dir. Command lines and the services file come from :mod:`lab.topology`, as in the
netns lab. An engine that exits (the scenario crashes one) is started again after a
pause, so the scenario can run again; the controller or the agent exiting stops the
node with an error.
"""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from lab import topology

RESTART_AFTER = 3.0  # seconds a crashed engine stays down (the breaker opens meanwhile)


@dataclasses.dataclass(frozen=True)
class Piece:
    name: str  # "controller", "agent", or the engine's name
    argv: tuple[str, ...]
    restart: bool  # started again when it exits (engines)


def plan(topo: topology.Topology, node: str, kvroute: str, python: str,
         workdir: Path) -> list[Piece]:
    """What runs on ``node``, in start order."""
    if node not in topo.nodes:
        raise topology.TopologyError(f"node {node!r} is not in the topology "
                                     f"({', '.join(sorted(topo.nodes))})")
    address = topo.nodes[node]
    pieces = []
    if node == topo.controller:
        argv = topo.controller_argv(kvroute, str(workdir / "services.yaml"), listen_host=address)
        pieces.append(Piece("controller", tuple(argv), restart=False))
    for engine in topo.on(node):
        argv = topo.engine_argv(python, engine, listen=engine.address)
        pieces.append(Piece(engine.name, tuple(argv), restart=True))
    argv = topo.agent_argv(kvroute, node, extra=[
        "--metrics", f"{address}:{topology.AGENT_HTTP_PORT}"])
    pieces.append(Piece("agent", tuple(argv), restart=False))
    return pieces


def run_node(topo: topology.Topology, node: str, workdir: Path) -> int:
    """Start this node's pieces, supervise them until SIGTERM/SIGINT; 0 on a clean stop."""
    workdir.mkdir(parents=True, exist_ok=True)
    if node == topo.controller:
        (workdir / "services.yaml").write_text(yaml.safe_dump(topo.services_doc()))
    kvroute = str(Path(sys.executable).parent / "kvroute")
    pieces = plan(topo, node, kvroute, sys.executable, workdir)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    down_since: dict[str, float] = {}
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def start(piece: Piece) -> None:
        log = open(workdir / f"{piece.name}.log", "ab")  # noqa: SIM115 - the process owns it
        procs[piece.name] = subprocess.Popen(piece.argv, stdout=log, stderr=log)
        print(f"{node}: started {piece.name}: {' '.join(piece.argv)}", flush=True)

    status = 0
    try:
        for piece in pieces:
            start(piece)
        while not stop:
            time.sleep(0.5)
            for piece in pieces:
                if procs[piece.name].poll() is None:
                    continue
                if not piece.restart:
                    print(f"{node}: {piece.name} exited ({procs[piece.name].returncode}); "
                          f"see {workdir / (piece.name + '.log')}", file=sys.stderr)
                    stop, status = True, 1
                    break
                since = down_since.setdefault(piece.name, time.monotonic())
                if time.monotonic() - since >= RESTART_AFTER:
                    del down_since[piece.name]
                    start(piece)
    finally:
        for proc in reversed(list(procs.values())):
            if proc.poll() is None:
                proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    return status
