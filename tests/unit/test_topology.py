"""The topology both labs start their fleet from (lab/topology.py): the VM lab's file
loads, each VM runs what it should (lab/multinode.py's plan) with options the
commands have, and bad files are refused naming the field."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
import yaml

from dataplane import cli
from lab import multinode, topology
from lab.engine_sim import cli as engine_cli

pytestmark = pytest.mark.unit

VAGRANT_TOPOLOGY = Path(__file__).parents[2] / "vagrant" / "topology.yaml"


def _topo() -> topology.Topology:
    return topology.load(VAGRANT_TOPOLOGY.read_text())


def _options(command: click.Command) -> set[str]:
    return {opt for p in command.params for opt in p.opts + p.secondary_opts}


def _check_argv(argv: tuple[str, ...] | list[str]) -> None:
    """Every option an argv passes exists in the command it runs."""
    if argv[1:3] == ("-m", "lab.engine_sim") or list(argv[1:3]) == ["-m", "lab.engine_sim"]:
        command: click.Command = engine_cli.command
        rest = list(argv[3:])
    else:
        command = cli.main.get_command(click.Context(cli.main), argv[1])  # type: ignore[assignment]
        rest = list(argv[2:])
    known = _options(command)
    flags = [a for a in rest if a.startswith("--")]
    assert flags and all(f in known for f in flags), (argv, set(flags) - known)


def test_the_vm_labs_fleet_runs_where_the_issue_says() -> None:
    topo = _topo()
    work = Path("/run/x")
    pieces = {node: [p.name for p in multinode.plan(topo, node, "kvroute", "python3", work)]
              for node in topo.nodes}
    # The controller and the client on one node, engines on two others, an agent on every one.
    assert pieces == {"ctl": ["controller", "agent"], "engine1": ["gpu0", "gpu1", "agent"],
                      "engine2": ["gpu2", "gpu3", "agent"]}
    assert topo.client == topo.controller == "ctl"
    for node in topo.nodes:
        for piece in multinode.plan(topo, node, "kvroute", "python3", work):
            _check_argv(piece.argv)
            assert piece.restart == piece.name.startswith("gpu")
    (ctl, _) = multinode.plan(topo, "ctl", "kvroute", "python3", work)
    assert "192.168.56.10:7070" in ctl.argv and "--insecure-listen" in ctl.argv
    agent = multinode.plan(topo, "engine1", "kvroute", "python3", work)[-1]
    args = list(agent.argv)
    assert args[args.index("--controller") + 1] == "192.168.56.10:7070"
    assert args[args.index("--node") + 1] == "engine1"
    engine = multinode.plan(topo, "engine2", "kvroute", "python3", work)[1]
    assert engine.argv[-6:] == ("--port", "8001", "--engine-id", "192.168.56.12:8001",
                                "--seed", "3")


def test_the_services_file_names_every_engine_and_its_node() -> None:
    topo = _topo()
    (svc,) = topo.services_doc({"epsilon": 0.5})["services"]
    assert (svc["vip"], svc["port"], svc["engine"], svc["epsilon"]) == ("10.96.0.10", 80,
                                                                       "vllm", 0.5)
    assert "metrics-port" not in svc  # two ports: each engine is scraped on its own
    assert [(e["node"], f"{e['address']}:{e['port']}") for e in svc["endpoints"]] == [
        (e.node, e.identity) for e in topo.engines]
    draining = topo.services_doc(draining=frozenset({"gpu1"}))["services"][0]["endpoints"]
    assert [e.get("terminating", False) for e in draining] == [False, True, False, False]


def test_the_static_discovery_reads_the_services_file(tmp_path: Path) -> None:
    from controller.discovery import static
    path = tmp_path / "services.yaml"
    path.write_text(yaml.safe_dump(_topo().services_doc()))
    (spec,) = static.StaticDiscovery(str(path)).snapshot()
    assert {f"{e.address}:{e.port}" for e in spec.endpoints} == {
        e.identity for e in _topo().engines}
    assert {e.node for e in spec.endpoints} == {"engine1", "engine2"}


@pytest.mark.parametrize(("change", "message"), [
    ({"controller": "nope"}, "controller: 'nope' is not one of the nodes"),
    ({"client": "x"}, "client: 'x' is not one of the nodes"),
    ({"engines": []}, "engines: none"),
    ({"nodes": {"ctl": "300.1.1.1", "engine1": "192.168.56.11", "engine2": "192.168.56.12"}},
     "address"),
    ({"colour": "blue"}, "unknown keys: colour"),
    ({"engines": [{"name": "gpu0", "node": "mars", "address": "10.0.0.1"}]},
     "gpu0 is on 'mars'"),
    ({"engines": [{"name": "gpu0", "node": "ctl", "address": "10.0.0.1"},
                  {"name": "gpu1", "node": "ctl", "address": "10.0.0.1"}]}, "share"),
    ({"engines": [{"name": "gpu0", "node": "ctl", "adress": "10.0.0.1"}]}, "engines:"),
])
def test_a_bad_topology_is_refused_naming_the_field(change: dict[str, object],
                                                     message: str) -> None:
    doc = {**yaml.safe_load(VAGRANT_TOPOLOGY.read_text()), **change}
    with pytest.raises(topology.TopologyError, match=message.replace("(", r"\(")):
        topology.load(yaml.safe_dump(doc))
    with pytest.raises(topology.TopologyError, match="not in the topology"):
        multinode.plan(_topo(), "engine9", "kvroute", "python3", Path("/run/x"))
