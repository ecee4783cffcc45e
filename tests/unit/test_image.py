"""deploy/Dockerfile, as far as it can be checked without a container engine: what it
copies exists and is what the wheel is built from, and the wheel's entry point runs
from a clean venv (the image's own layout: a venv with the system site packages, for
Debian's bcc)."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tomllib
import venv
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"


def _instructions() -> list[tuple[str, list[str]]]:
    out, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            word, *rest = pending.split()
            out.append((word.upper(), rest))
            pending = ""
    return out


def test_the_dockerfile_copies_what_the_wheel_is_built_from() -> None:
    copied = []
    for word, args in _instructions():
        if word == "COPY":
            assert not any(a.startswith("--from") for a in args)
            *sources, dest = args
            assert dest.startswith("/src"), dest
            for source in sources:
                assert source != ".", "copy what the wheel needs, not the work tree (.venv)"
                assert (ROOT / source).exists(), f"COPY {source}: no such path"
                copied.append(source)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wheel = project["tool"]["hatch"]["build"]["targets"]["wheel"]
    needed = {"pyproject.toml", project["project"]["readme"], *wheel["packages"],
              *wheel["force-include"]}
    assert needed <= set(copied), f"the wheel also needs {needed - set(copied)}"
    words = [w for w, _ in _instructions()]
    assert words[0] == "FROM" and words[-1] == "ENTRYPOINT"
    assert ("ENTRYPOINT", ['["kvroute"]']) in _instructions()
    assert project["project"]["scripts"]["kvroute"]


def test_the_wheel_runs_from_a_clean_venv(tmp_path: Path) -> None:
    """The wheel (pip wheel) installed without its dependencies into a fresh venv made
    as the image makes it; the dependencies come from this test's own environment
    through a path entry, so the test stays fast and offline, while the project's own
    code, its data (the eBPF sources) and its entry points come from the wheel alone."""
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"),
         str(ROOT)], capture_output=True, text=True, timeout=300)
    if built.returncode != 0 and "hatchling" in built.stderr and "No matching" in built.stderr:
        pytest.skip("pip cannot fetch the build backend (hatchling) here")
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("kvroute-*.whl")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    site = Path(subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_path("
                                "'purelib'))"], capture_output=True, text=True,
                               check=True).stdout.strip())
    # The dependencies only: a path entry adds a folder without running its .pth files,
    # so the editable install of this tree does not come along.
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q",
         str(wheel)], capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}

    def run(*args: str) -> str:
        out = subprocess.run([str(env_dir / "bin" / "kvroute"), *args], capture_output=True,
                             text=True, cwd=tmp_path, env=env, timeout=120)
        assert out.returncode == 0, f"kvroute {' '.join(args)}: {out.stderr}"
        return out.stdout

    assert "agent" in run("--help") and "controller" in run("--help")
    assert "--controller HOST:PORT" in run("agent", "--help")
    assert "--services" in run("controller", "--help")
    # The code and the eBPF sources the agent compiles come from the wheel, not this tree.
    where = subprocess.run(
        [py, "-c", "import dataplane, controller; from dataplane import loader; "
                   "print(dataplane.__file__); print(controller.__file__); "
                   "print(loader.bpf_dir())"],
        capture_output=True, text=True, cwd=tmp_path, env=env, check=True).stdout.split()
    assert all(Path(w).is_relative_to(site) for w in where), where
    assert (Path(where[2]) / "sock_lb.c").exists() and (Path(where[2]) / "lib").is_dir()
