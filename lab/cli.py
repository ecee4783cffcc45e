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
def lab_clean() -> None:
    """Remove leftovers of crashed labs (namespaces, links, cgroups named kvr*)."""
    report = netns.sweep()
    for bucket in ("namespaces", "links", "cgroups"):
        for name in getattr(report, bucket):
            click.echo(f"removed {bucket[:-1]} {name}")
    for failure in report.failures:
        click.echo(f"could not remove: {failure}", err=True)


lab.add_command(traffic.command)
