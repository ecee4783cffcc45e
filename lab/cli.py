"""`kvroute lab`: the one-machine lab (found by the kvroute CLI through its
``kvroute.commands`` entry point; nothing outside lab/ and tests/ imports this)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from lab import demo, fleet, netns, traffic, vllm_engine


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


lab.add_command(traffic.command)
