"""Fetch a listed kernel: Debian's generic image of its suite, unpacked into a cache.

apt runs with a private configuration (its own sources list, lists and cache under
``build/kernels/apt/SUITE``) built from the mirrors the host's apt already uses, so the
system's sources and package state are never touched. An image is downloaded and unpacked
(``dpkg-deb -x``) once per package version: a second run finds it and does nothing.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import time
from pathlib import Path

from lab.kernels import matrix

KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))
INDEX_MAX_AGE = 6 * 3600  # package lists are read again after this long (s)


@dataclasses.dataclass(frozen=True)
class Image:
    kernel: matrix.Kernel
    package: str
    version: str
    root: Path  # the unpacked package: boot/vmlinuz-RELEASE, lib/modules/RELEASE

    @property
    def release(self) -> str:
        return matrix.release_of(self.package)

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.release}"


def _host_sources() -> list[str]:
    texts: list[str] = []
    for path in SOURCES:
        files = sorted(path.glob("*.sources")) + sorted(path.glob("*.list")) \
            if path.is_dir() else [path]
        texts.extend(f.read_text() for f in files if f.is_file())
    return texts


def _apt(cache: Path, kernel: matrix.Kernel) -> list[str]:
    """apt options that confine it to a private tree for ``kernel``'s suite."""
    uris = matrix.mirrors(_host_sources())
    if kernel.archive not in uris:
        raise matrix.MatrixError(f"the host's apt sources name no {kernel.archive} archive "
                                 f"to fetch {kernel.suite} from")
    tree = cache / "apt" / kernel.suite
    for sub in ("lists/partial", "archives/partial"):
        (tree / sub).mkdir(parents=True, exist_ok=True)
    (tree / "sources.list").write_text(
        f"deb [signed-by={KEYRING}] {uris[kernel.archive]} {kernel.suite} main\n")
    return ["-o", f"Dir::Etc::SourceList={tree / 'sources.list'}",
            "-o", "Dir::Etc::SourceParts=/dev/null",
            "-o", f"Dir::State={tree}", "-o", f"Dir::State::Lists={tree / 'lists'}",
            "-o", "Dir::State::status=/dev/null",
            "-o", f"Dir::Cache={tree}", "-o", f"Dir::Cache::Archives={tree / 'archives'}",
            "-o", "APT::Architecture=amd64", "-o", "Debug::NoLocking=1",
            "-o", "APT::Sandbox::User=root"]


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if proc.returncode != 0:
        raise matrix.MatrixError(f"{what} failed ({proc.returncode}): "
                                 f"{(proc.stderr or proc.stdout).strip()[-800:]}")
    return proc.stdout


def fetch(kernel: matrix.Kernel, cache: Path, log: bool = True) -> Image:
    """The newest generic image of ``kernel``'s suite, unpacked under ``cache``."""
    cache = cache.resolve()  # apt takes relative Dir:: paths as relative to each other
    opts = _apt(cache, kernel)
    lists = cache / "apt" / kernel.suite / "lists"
    fresh = [p for p in lists.glob("*_Packages*")
             if time.time() - p.stat().st_mtime < INDEX_MAX_AGE]
    if not fresh:
        _run(["apt-get", *opts, "-qq", "update"], f"apt-get update for {kernel.suite}")
    depends = _run(["apt-cache", *opts, "show", "--no-all-versions", matrix.IMAGE_META],
                   f"apt-cache show {matrix.IMAGE_META} ({kernel.suite})")
    line = next((ln for ln in depends.splitlines() if ln.startswith("Depends:")), "")
    package, version = matrix.image_package(kernel, line.removeprefix("Depends:"))
    root = cache / "images" / f"{package}_{version}"
    image = Image(kernel, package, version, root)
    if (root / ".unpacked").exists() and image.vmlinuz.exists():
        return image
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    if log:
        print(f"kernel {kernel.name}: downloading {package} {version}", flush=True)
    _run(["apt-get", *opts, "-qq", "download", f"{package}={version}"],
         f"apt-get download {package}", cwd=debs)
    deb = next(debs.glob(f"{package}_*.deb"), None)
    if deb is None:
        raise matrix.MatrixError(f"apt-get download {package} left no .deb in {debs}")
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    _run(["dpkg-deb", "-x", str(deb), str(root)], f"dpkg-deb -x {deb.name}")
    deb.unlink()  # the unpacked tree is the cache; the .deb would double it
    if not image.vmlinuz.exists():
        raise matrix.MatrixError(f"{deb.name} holds no {image.vmlinuz.name}")
    (root / ".unpacked").touch()
    return image
