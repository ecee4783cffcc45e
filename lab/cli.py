"""`kvroute lab`: the one-machine lab (found by the kvroute CLI through its
``kvroute.commands`` entry point; nothing outside lab/ and tests/ imports this)."""

from __future__ import annotations

import os
import sys

import click

from lab import demo, netns, traffic


def _fail(message: str) -> None:
    raise click.ClickException(message)


@click.group()
def lab() -> None:
    """The one-machine lab: network namespaces as GPU pods, clients, engines, traffic."""


@lab.command("demo")
@click.option("--pods", type=click.IntRange(1, 32), default=3, show_default=True)
@click.option("--sessions", type=click.IntRange(1, 100000), default=200, show_default=True)
def lab_demo(pods: int, sessions: int) -> None:
    """The whole system on one machine: engine simulators in pod namespaces, the
    controller, two node agents; tagged sessions through the VIP, an engine killed
    under live traffic and brought back, the maps; then everything is removed."""
    if os.geteuid() != 0:
        _fail("the lab needs root (network namespaces, cgroups, eBPF)")
    sys.exit(demo.run(pods=pods, sessions=sessions))


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
