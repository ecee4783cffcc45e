"""`kvroute lab`: the one-machine lab (found by the kvroute CLI through its
``kvroute.commands`` entry point; nothing outside lab/ and tests/ imports this)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from lab import demo, fleet, multinode, netns, scenario, topology, traffic, vllm_engine


def _fail(message: str) -> None:
    raise click.ClickException(message)


@click.group()
def lab() -> None:
    """The one-machine lab: network namespaces as GPU pods, clients, engines, traffic."""


@lab.command("demo")
@click.option("--engine", type=click.Choice(fleet.ENGINE_KINDS), default="sim",
              show_default=True,
              help="Simulated vLLM engines (4), or real vLLM CPU engines (3; `make vllm` "
                   "installs them).")
@click.option("--seconds", type=click.FloatRange(6, 3600), default=60.0, show_default=True,
              help="Length of each phase (kvroute, then random routing).")
@click.option("--vllm-venv", type=click.Path(file_okay=False, path_type=Path),
              default=vllm_engine.DEFAULT_VENV, show_default=True,
              help="The venv `make vllm` made (with --engine vllm).")
def lab_demo(engine: str, seconds: float, vllm_venv: Path) -> None:
    """The whole system on one machine: engines in pod namespaces, the controller and
    two node agents; a minute of streaming multi-turn chat through the kvroute VIP with
    a live view, one engine killed midway and started again; the same workload under
    random routing; a side-by-side summary. Then everything is removed."""
    if os.geteuid() != 0:
        _fail("the lab needs root (network namespaces, cgroups, eBPF)")
    if engine == "vllm" and not vllm_engine.available(vllm_venv):
        _fail(f"no vLLM engine installed in {vllm_venv}: run `make vllm` first")
    sys.exit(demo.run(engine=engine, seconds=seconds, vllm_venv=vllm_venv))


@lab.command("clean")
@click.option("--all", "everything", is_flag=True,
              help="Also remove labs whose owner still runs, and kvr* namespaces, links and "
                   "cgroups that no lab recorded (labs of an older kvroute).")
def lab_clean(everything: bool) -> None:
    """Remove what labs whose owner process is gone left behind: processes, pins,
    namespaces, links and cgroups. Live labs and what no lab recorded stay (and are named)."""
    if os.geteuid() != 0:
        _fail("cleaning labs needs root (network namespaces, cgroups, bpffs)")
    report = netns.sweep(include_live=everything, unowned=everything)
    for line in [*report.lines(), *report.notes()] or ["nothing to remove"]:
        click.echo(line)
    if report.failures:
        sys.exit(1)


def _topology(path: Path) -> topology.Topology:
    try:
        return topology.load(path.read_text())
    except (OSError, topology.TopologyError) as exc:
        raise click.BadParameter(str(exc), param_hint="--topology") from None


@lab.command("node")
@click.option("--topology", "topology_file", required=True,
              type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="The fleet's topology (vagrant/topology.yaml).")
@click.option("--node", required=True, help="Which node of the topology this machine is.")
@click.option("--workdir", type=click.Path(path_type=Path, file_okay=False),
              default=Path("/run/kvroute-lab-node"), show_default=True,
              help="Logs and the controller's services file.")
def lab_node(topology_file: Path, node: str, workdir: Path) -> None:
    """Run this machine's part of a multi-node fleet until SIGTERM: the controller (on
    its node), the engines on this node, and an agent on the cgroup v2 root."""
    if os.geteuid() != 0:
        _fail("a fleet node needs root (eBPF, cgroups)")
    topo = _topology(topology_file)
    if node not in topo.nodes:
        raise click.BadParameter(f"{node!r} is not one of {sorted(topo.nodes)}",
                                 param_hint="--node")
    sys.exit(multinode.run_node(topo, node, workdir))


@lab.command("scenario")
@click.option("--topology", "topology_file", required=True,
              type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="The fleet's topology (vagrant/topology.yaml).")
@click.option("--sessions", type=click.IntRange(1, 100000), default=200, show_default=True)
@click.option("--crash/--no-crash", default=True, show_default=True,
              help="End by crashing the busiest engine and checking its sessions move.")
def lab_scenario(topology_file: Path, sessions: int, crash: bool) -> None:
    """Run the fleet scenario from this machine, the topology's client node: agents
    converge, sessions keep their engines, a crashed engine's sessions move."""
    topo = _topology(topology_file)
    try:
        scenario.run(topo, lambda names: fleet.engines_for(topo.vip, topo.port, names),
                     sessions=sessions, crash=crash, say=click.echo)
    except scenario.ScenarioError as exc:
        _fail(str(exc))


lab.add_command(traffic.command)
