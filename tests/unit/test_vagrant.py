"""vagrant/Vagrantfile, as far as it can be checked without starting a VM: `vagrant
validate` for each box, the VMs are the topology's nodes, and a box it does not know
is refused naming the choices."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.unit

VAGRANT = Path(__file__).parents[2] / "vagrant"
BOXES = ["debian12", "ubuntu2404"]


def _validate(tmp_path: Path, box: str, provider: str | None) -> subprocess.CompletedProcess[str]:
    if shutil.which("vagrant") is None:
        pytest.skip("vagrant is not installed (make setup installs Debian's vagrant)")
    env = {**os.environ, "KVROUTE_BOX": box, "VAGRANT_DOTFILE_PATH": str(tmp_path / ".vagrant"),
           "VAGRANT_CHECKPOINT_DISABLE": "1"}
    argv = ["vagrant", "validate"]
    if provider is None:
        argv.append("--ignore-provider")
    else:
        env["VAGRANT_DEFAULT_PROVIDER"] = provider
    return subprocess.run(argv, cwd=VAGRANT, env=env, capture_output=True, text=True,
                          timeout=120)


def _libvirt() -> bool:
    if shutil.which("vagrant") is None:
        return False
    plugins = subprocess.run(["vagrant", "plugin", "list"], capture_output=True, text=True,
                             timeout=60).stdout
    return "vagrant-libvirt" in plugins


@pytest.mark.parametrize("box", BOXES)
def test_the_vagrantfile_validates(tmp_path: Path, box: str) -> None:
    """With the libvirt plugin (Debian packages it; VirtualBox it does not), the provider
    blocks are validated too; without it they are ignored, and the test says so."""
    libvirt = _libvirt()
    out = _validate(tmp_path, box, "libvirt" if libvirt else None)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "validated successfully" in out.stdout
    if not libvirt:
        pytest.skip("validated without the provider blocks: the vagrant-libvirt plugin is "
                    "not installed (Debian: vagrant-libvirt)")


def test_the_vms_are_the_topologys_nodes(tmp_path: Path) -> None:
    out = _validate(tmp_path, BOXES[0], None)
    assert out.returncode == 0, out.stdout + out.stderr
    machines = set(re.findall(r"==> (\S+): Ignoring provider config", out.stdout))
    nodes = yaml.safe_load((VAGRANT / "topology.yaml").read_text())["nodes"]
    assert machines == set(nodes)


def test_an_unknown_box_is_refused(tmp_path: Path) -> None:
    out = _validate(tmp_path, "windows95", None)
    assert out.returncode != 0
    assert "KVROUTE_BOX=windows95: expected one of debian12, ubuntu2404" in out.stdout + out.stderr
