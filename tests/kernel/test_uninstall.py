"""`kvroute uninstall` on bpffs removes kvroute's pins and nothing else.

Each test pins into a bpffs instance of its own, mounted on a temporary folder (every bpffs
mount is a new, empty instance), so no pin of another tool or test is ever at risk, even
from an uninstall that would wrongly remove everything.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dataplane import bpfsys, loader
from dataplane.settings import Settings
from lab import cgroup
from tests.kernel.conftest import private_bpffs

KVROUTE = str(Path(sys.executable).parent / "kvroute")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([KVROUTE, *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def bpffs(tmp_path: Path) -> Iterator[Path]:
    with private_bpffs(tmp_path / "bpf") as mount:
        yield mount


def pin_map(path: Path, name: str | None = None) -> None:
    """Pin a small array map at ``path``, its own name ``name`` (default: the pin's)."""
    fd = bpfsys.create_map(bpfsys.BPF_MAP_TYPE_ARRAY, name or path.name, 4, 4, 1)
    try:
        bpfsys.obj_pin(fd, path)
    finally:
        os.close(fd)


def map_name(path: Path) -> str:
    fd = bpfsys.obj_get(path)
    try:
        return str(bpfsys.map_info(fd).name.decode())
    finally:
        os.close(fd)


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_foreign_pins_beside_kvroutes_survive_uninstall(bpffs: Path) -> None:
    pin_dir = bpffs / "kvroute"
    group = cgroup.Cgroup.create("kvrtest-uninstall")
    try:
        datapath = loader.Datapath(Settings(pin_dir=pin_dir))
        try:
            datapath.attach(group.path)
        finally:
            datapath.close()
        pin_map(pin_dir / "their_map")
        pin_map(pin_dir / "kvr_health_old", "kvr_health")  # a kvroute name, but not its pin
        (pin_dir / "theirs").mkdir()
        pin_map(pin_dir / "theirs" / "kvr_meta")  # inside a foreign folder: never entered
        pin_map(pin_dir / "links" / "their_link")
        link = bpfsys.obj_get(pin_dir / "links" / "sock4_connect")
        try:
            assert bpfsys.link_cgroup_id(link) == os.stat(group.path).st_ino
            proc = _run("uninstall", "--pin-dir", str(pin_dir))
            assert proc.returncode == 0, proc.stderr
            assert bpfsys.link_cgroup_id(link) == 0  # detached: routing by kvroute ended
        finally:
            os.close(link)
    finally:
        group.remove()
    assert tree(pin_dir) == ["kvr_health_old", "links", "links/their_link", "their_map",
                             "theirs", "theirs/kvr_meta"]
    assert map_name(pin_dir / "their_map") == "their_map"
    assert map_name(pin_dir / "theirs" / "kvr_meta") == "kvr_meta"
    out = proc.stdout.splitlines()
    assert "removed link sock4_connect" in out and "removed map kvr_meta" in out
    assert "left in place: their_map: not one of kvroute's pins" in out
    assert "left in place: theirs: a folder kvroute did not make" in out
    assert f"left in place: {pin_dir} stays: it holds what kvroute did not make" in out


def test_a_map_under_a_kvroute_name_but_of_another_name_stays(bpffs: Path) -> None:
    pin_dir = bpffs / f"kvrtest-{secrets.token_hex(2)}"
    pin_dir.mkdir()
    pin_map(pin_dir / "kvr_meta")
    pin_map(pin_dir / "kvr_affinity", "not_affinity")
    removed = loader.uninstall(pin_dir)
    assert removed == ["map kvr_meta"]
    assert tree(pin_dir) == ["kvr_affinity"]


def test_a_folder_of_foreign_pins_and_the_bpffs_root_are_refused(bpffs: Path) -> None:
    foreign = bpffs / "othertool"
    foreign.mkdir()
    pin_map(foreign / "their_map")
    pin_map(bpffs / "kvr_meta")  # even kvroute's names at the root: the root is refused
    before = tree(bpffs)
    proc = _run("uninstall", "--pin-dir", str(foreign))
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"Error: {foreign} holds none of kvroute's pins")
    assert proc.stderr.count("\n") == 1
    proc = _run("uninstall", "--pin-dir", str(bpffs))
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"Error: --pin-dir {bpffs} is the root of a bpffs mount")
    assert tree(bpffs) == before
    # The node's own bpffs likewise; only asked once the private root was refused above.
    node_pins = tree(Path("/sys/fs/bpf"))
    proc = _run("uninstall", "--pin-dir", "/sys/fs/bpf")
    assert proc.returncode == 1 and "is the root of a bpffs mount" in proc.stderr
    assert set(node_pins) <= set(tree(Path("/sys/fs/bpf")))
