"""What the probe finds in the running kernel, the fallbacks it selects, and a load
against the shipped UAPI headers (dataplane/features.py, dataplane/uapi.py)."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from dataplane import apply, features, loader, model, uapi
from dataplane.maps import MapSet
from dataplane.settings import Settings
from lab import cgroup
from tests.kernel.conftest import Node, connect_names

pytestmark = pytest.mark.kernel_matrix

KVROUTE = str(Path(sys.executable).with_name("kvroute"))


def _release_tuple(release: str) -> tuple[int, int]:
    major, minor = release.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()))


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("probing the kernel needs root (it loads tiny test programs)")


def test_probe_agrees_with_the_release_each_feature_arrived_in() -> None:
    # Debian's kernels are upstream stable series: a feature is there exactly from the
    # release FEATURES names. A wrong probe, or a wrong release in the table, fails here.
    # No lab needed: it runs even where the programs do not load.
    _require_root()
    running = _release_tuple(os.uname().release)
    found = loader.probe_kernel()
    expected = {f.name: running >= _release_tuple(f.since) for f in features.FEATURES}
    assert found == expected


def test_the_datapath_is_built_for_what_the_probe_found(node: Node) -> None:
    assert node.datapath.plan == features.decide(loader.probe_kernel(), os.uname().release)


def test_check_kernel_names_every_feature_and_the_headers() -> None:
    _require_root()
    proc = subprocess.run([KVROUTE, "check-kernel", "--json"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["ok"] is True and data["kernel"] == os.uname().release
    assert {r["name"] for r in data["features"]} == {f.name for f in features.FEATURES}
    assert data["headers"].startswith(f"{uapi.find('auto').kind}: ")
    # The packet path's verdict follows its own features only.
    packet = {f.name for f in features.FEATURES if f.packet_path}
    assert packet and data["packet_path"] is all(
        r["present"] for r in data["features"] if r["name"] in packet)


def test_without_set_retval_a_refused_connect_fails_with_eperm(node: Node) -> None:
    """The fallback for kernels before 5.18, built on any kernel from the shipped headers:
    a service with no usable backend refuses with EPERM; a usable one still routes."""
    found = {f.name: True for f in features.FEATURES} | {"helper_set_retval": False}
    plan = features.decide(found, os.uname().release)
    assert not plan.set_retval and "-DENABLE_SET_RETVAL" not in plan.cflags
    pin_dir = Path(f"/sys/fs/bpf/kvrtest-compat-{secrets.token_hex(3)}")
    node.lab.own_pin_dir(pin_dir)
    group = cgroup.Cgroup.create("kvrtest-compat")
    node.lab.own_cgroup(group)
    settings = Settings(pin_dir=pin_dir, kernel_headers="shipped")
    try:
        datapath = loader.Datapath(settings, plan=plan)
        try:
            assert datapath.headers.kind == "shipped"
            datapath.attach(group.path)
            with MapSet(pin_dir) as maps:
                applier = apply.Applier(maps, settings.hash_seed)
                try:
                    applier.apply(model.desired_from_dict({"services": [
                        {"name": "gone", "vip": "10.96.30.1", "port": 80,
                         "backends": [node.backend("gpu0", state="open")]},
                        {"name": "up", "vip": "10.96.30.2", "port": 80,
                         "backends": [node.backend("gpu1")]}]}))
                    out = node.client.call(connect_names, "10.96.30.1", 80, 2, cgroup=group,
                                           timeout=120)
                    assert out == ["error:EPERM"] * 2
                    assert node.client.call(connect_names, "10.96.30.2", 80, 2,
                                            cgroup=group, timeout=120) == ["gpu1"] * 2
                finally:
                    applier.close()
        finally:
            datapath.close()
            loader.uninstall(pin_dir)
    finally:
        group.remove()
