"""Where a fleet's pieces run: nodes, the engines on them, the controller's node, the
client's node, and the command lines that start each piece.

One definition for both labs: :class:`lab.fleet.Fleet` (nodes as cgroups and pin dirs
on one machine, engines in network namespaces) and the multi-node VM lab (``vagrant/``:
nodes are machines, engines listen on their node's address), which reads a topology
file (``vagrant/topology.yaml``) and runs :func:`lab.multinode.run_node` on every VM.
The services file the controller discovers from, and the controller's, agents' and
engines' command lines, are built here, so both labs start the same processes with the
same options. Pure: no I/O beyond parsing the text it is given.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

ENGINE_PORT = 8000
CONTROLLER_PORT = 7070
CONTROLLER_HTTP_PORT = 9090
AGENT_HTTP_PORT = 9091


class TopologyError(ValueError):
    """The topology file is unusable; the message names the field."""


@dataclasses.dataclass(frozen=True)
class Engine:
    name: str  # the pod's name ("gpu0")
    node: str  # the node it runs on (its agent scrapes it)
    address: str
    port: int = ENGINE_PORT

    @property
    def identity(self) -> str:
        """How kvroute names it: the endpoint, ``address:port``."""
        return f"{self.address}:{self.port}"


@dataclasses.dataclass(frozen=True)
class Topology:
    nodes: Mapping[str, str]  # node name -> the address others reach it at
    engines: tuple[Engine, ...]
    controller: str  # node running the controller
    client: str  # node the scenario's client connects from
    vip: str = "10.96.0.10"
    port: int = 80
    controller_port: int = CONTROLLER_PORT
    controller_http_port: int = CONTROLLER_HTTP_PORT
    # Plaintext gRPC off loopback (a lab's private network only; the controller refuses
    # it otherwise).
    insecure: bool = False

    def __post_init__(self) -> None:
        problems = []
        for role in ("controller", "client"):
            if getattr(self, role) not in self.nodes:
                problems.append(f"{role}: {getattr(self, role)!r} is not one of the nodes")
        for e in self.engines:
            if e.node not in self.nodes:
                problems.append(f"engines: {e.name} is on {e.node!r}, not one of the nodes")
        ids = [e.identity for e in self.engines]
        if len(set(ids)) != len(ids) or len({e.name for e in self.engines}) != len(ids):
            problems.append("engines: two engines share a name or an address:port")
        if not self.engines:
            problems.append("engines: none")
        try:
            for where in (self.vip, *self.nodes.values(), *(e.address for e in self.engines)):
                ipaddress.IPv4Address(where)
        except ValueError as exc:
            problems.append(f"address: {exc}")
        if problems:
            raise TopologyError("; ".join(problems))

    @property
    def controller_target(self) -> str:
        return f"{self.nodes[self.controller]}:{self.controller_port}"

    @property
    def controller_url(self) -> str:
        return f"http://{self.nodes[self.controller]}:{self.controller_http_port}"

    def on(self, node: str) -> list[Engine]:
        return [e for e in self.engines if e.node == node]

    def services_doc(self, options: Mapping[str, Any] | None = None,
                     draining: frozenset[str] = frozenset()) -> dict[str, Any]:
        """The controller's static discovery file: one vLLM service at the VIP over every
        engine, with ``options`` (static-file keys: affinity, epsilon, breaker, ...)."""
        endpoints = []
        for e in self.engines:
            ep: dict[str, Any] = {"address": e.address, "port": e.port, "node": e.node,
                                  "pod": e.name}
            if e.name in draining:
                ep.update(ready=False, serving=True, terminating=True)
            endpoints.append(ep)
        ports = {e.port for e in self.engines}
        svc: dict[str, Any] = {"name": "llm", "vip": self.vip, "port": self.port,
                               "engine": "vllm", "affinity": "session"}
        if len(ports) == 1:
            svc["metrics-port"] = ports.pop()  # else: each endpoint's own port
        svc.update(options or {})
        svc["endpoints"] = endpoints
        return {"services": [svc]}

    def controller_argv(self, kvroute: str, static: str, listen_host: str | None = None,
                        extra: Sequence[str] = ()) -> list[str]:
        host = listen_host or self.nodes[self.controller]
        argv = [kvroute, "controller", "--static", static,
                "--listen", f"{host}:{self.controller_port}",
                "--metrics", f"{host}:{self.controller_http_port}", *extra]
        if self.insecure:
            argv.append("--insecure-listen")
        return argv

    def agent_argv(self, kvroute: str, node: str, extra: Sequence[str] = ()) -> list[str]:
        if node not in self.nodes:
            raise TopologyError(f"node {node!r} is not in the topology")
        return [kvroute, "agent", "--controller", self.controller_target, "--node", node,
                *extra]

    @staticmethod
    def engine_argv(python: str, engine: Engine, listen: str = "0.0.0.0") -> list[str]:
        return [python, "-m", "lab.engine_sim", "--host", listen, "--port", str(engine.port),
                "--engine-id", engine.identity, "--seed", engine.name.removeprefix("gpu")]


def load(text: str) -> Topology:
    """A topology from YAML::

        nodes: {ctl: 192.168.56.10, engine1: 192.168.56.11}
        controller: ctl
        client: ctl
        engines:
          - {name: gpu0, node: engine1, address: 192.168.56.11, port: 8000}
    """
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise TopologyError(f"not YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise TopologyError("expected a mapping with nodes, engines, controller and client")
    known = {f.name for f in dataclasses.fields(Topology)}
    unknown = set(doc) - known
    if unknown:
        raise TopologyError(f"unknown keys: {', '.join(sorted(unknown))}")
    nodes = doc.get("nodes")
    if not isinstance(nodes, dict) or not nodes:
        raise TopologyError("nodes: expected a mapping of node name to address")
    try:
        engines = tuple(Engine(**e) for e in doc.get("engines") or [])
        return Topology(**{**doc, "nodes": {str(k): str(v) for k, v in nodes.items()},
                           "engines": engines})
    except TypeError as exc:
        raise TopologyError(f"engines: {exc}") from None
