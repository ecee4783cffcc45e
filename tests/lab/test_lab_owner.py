"""A run killed without teardown (SIGKILL, a timeout) leaves its lab; the next lab, or the
next test session, removes it by itself, and leaves every live lab alone.

The labs here belong to child processes, so they can be killed like a real run; whatever
a test leaves is swept in its finally, by the labs' names only.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyroute2
import pyroute2.netns
import pytest
from click.testing import CliRunner

import lab.netns
import lab.owner
from dataplane import cli
from tests.conftest import sweep_dead_labs

# A lab in its own process: a pod with a process in it, a host process, an extra cgroup and
# a pin dir with a kvroute map, all owned by the lab; then it waits to be killed.
CHILD = textwrap.dedent("""
    import json, os, secrets, subprocess, sys, time
    from pathlib import Path
    from dataplane import bpfsys
    from lab import cgroup, netns
    lb = netns.Lab().up()
    pod = lb.add_pod("gpu0")
    in_pod = pod.spawn(["sleep", "600"])
    on_host = subprocess.Popen(["sleep", "600"])
    lb.own_process(on_host.pid)
    extra = cgroup.Cgroup.create("kvrtest-owned")
    lb.own_cgroup(extra)
    pin_dir = Path(f"/sys/fs/bpf/kvrtest-owned-{secrets.token_hex(3)}")
    lb.own_pin_dir(pin_dir)
    pin_dir.mkdir()
    fd = bpfsys.create_map(bpfsys.BPF_MAP_TYPE_ARRAY, "kvr_meta", 4, 4, 1)
    bpfsys.obj_pin(fd, pin_dir / "kvr_meta")
    print(json.dumps({"names": lb.names, "netns": pod.netns, "links": [lb.bridge, pod.veth_host],
                      "cgroups": [str(lb.cgroup.path), str(extra.path)],
                      "pin_dir": str(pin_dir), "pids": [in_pod.pid, on_host.pid]}), flush=True)
    time.sleep(600)
""")


def _running(pid: int) -> bool:
    return lab.owner.process_start(pid) is not None


def present(made: dict[str, Any]) -> dict[str, bool]:
    """Which of a child lab's things exist now."""
    with pyroute2.IPRoute() as ipr:
        links = {str(m.get("IFLA_IFNAME")) for m in ipr.get_links()}
    return {
        "netns": made["netns"] in pyroute2.netns.listnetns(),
        "links": all(name in links for name in made["links"]),
        "cgroups": all(Path(p).exists() for p in made["cgroups"]),
        "pins": Path(made["pin_dir"]).exists(),
        "processes": all(_running(pid) for pid in made["pids"]),
        "record": lab.owner.Store().path(made["names"]).exists(),
    }


ALL = dict.fromkeys(("netns", "links", "cgroups", "pins", "processes", "record"), True)
NONE = dict.fromkeys(ALL, False)


class ChildLab:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE,
                                     cwd=Path(__file__).parents[2])
        self.made: dict[str, Any] = {}

    def ready(self) -> ChildLab:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"the child lab did not come up (exit {self.proc.wait()})"
        self.made = json.loads(line)
        return self

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait() == -signal.SIGKILL


@pytest.fixture
def child_labs() -> Iterator[list[ChildLab]]:
    if os.geteuid() != 0:
        pytest.skip("lab tests need root (network namespaces, cgroups, bpffs)")
    labs: list[ChildLab] = []
    yield labs
    for child in labs:
        if child.proc.poll() is None:
            child.kill()
        if not child.made:
            continue
        lab.netns.sweep(only=child.made["names"], include_live=True)
        for pid in child.made["pids"]:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_killed_labs_leftovers_go_at_the_next_lab_and_session_live_ones_stay(
        child_labs: list[ChildLab], caplog: pytest.LogCaptureFixture) -> None:
    killed, live = ChildLab(), ChildLab()
    child_labs += [killed, live]
    killed.ready(), live.ready()
    killed.kill()
    assert present(killed.made) == ALL  # SIGKILL ran no teardown
    with caplog.at_level(logging.WARNING, logger="lab.netns"):
        fresh = lab.netns.Lab().up()
    fresh.down()
    assert present(killed.made) == NONE
    assert present(live.made) == ALL
    logged = caplog.messages
    names = killed.made["names"]
    assert f"removed lab {names} (owner pid {killed.proc.pid} gone)" in logged
    assert f"removed namespace {killed.made['netns']}" in logged
    assert f"removed pins {killed.made['pin_dir']}" in logged
    assert {f"removed link {name}" for name in killed.made["links"]} <= set(logged)
    assert {f"removed cgroup {path}" for path in killed.made["cgroups"]} <= set(logged)
    assert f"removed process {killed.made['pids'][1]}" in logged  # the host one
    assert f"removed process {killed.made['pids'][0]} (in netns)" in logged
    assert not [m for m in logged if live.made["names"] in m]
    # The session start (tests/conftest.py) does the same when the other one is killed too.
    live.kill()
    written: list[str] = []
    sweep_dead_labs(written.append)
    assert present(live.made) == NONE
    assert f"kvroute: removed lab {live.made['names']} (owner pid {live.proc.pid} gone)" \
        in written


def test_two_labs_starting_at_once_get_their_own_subnets(
        child_labs: list[ChildLab]) -> None:
    first, second = ChildLab(), ChildLab()  # both started before either is waited for
    child_labs += [first, second]
    first.ready(), second.ready()
    subnets = {r.names: r.subnet for r in lab.owner.Store().load_all()}
    assert subnets[first.made["names"]] != subnets[second.made["names"]]


def test_lab_clean_removes_dead_labs_and_names_the_live_ones_it_leaves(
        child_labs: list[ChildLab]) -> None:
    dead, live = ChildLab(), ChildLab()
    child_labs += [dead, live]
    dead.ready(), live.ready()
    dead.kill()
    result = CliRunner().invoke(cli.main, ["lab", "clean"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert f"removed lab {dead.made['names']} (owner pid {dead.proc.pid} gone)" in lines
    assert f"left alone: live lab {live.made['names']} (owner pid {live.proc.pid}); " \
        "--all removes it" in lines
    assert present(dead.made) == NONE
    assert present(live.made) == ALL
