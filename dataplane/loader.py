"""Compile, load, pin and attach the kvroute programs (the bcc edge).

Attachments are bpf links pinned under <pin_dir>/links: they outlive the
agent, so routing never stops while it restarts, and a new agent swaps its
freshly compiled programs in with an atomic link update. Maps are pinned by
the C source itself (BPF_TABLE_PINNED), so a new load adopts them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dataplane import abi, bpfsys, host
from dataplane.settings import Settings

log = logging.getLogger(__name__)

ENTRY_FILES = ("sock_lb.c", "sock_ops.c")


@dataclasses.dataclass(frozen=True)
class Program:
    name: str
    prog_type: int
    attach_type: int


PROGRAMS = (
    Program("sock4_connect", bpfsys.PROG_CGROUP_SOCK_ADDR, bpfsys.ATTACH_CGROUP_INET4_CONNECT),
    Program("sock4_getpeername", bpfsys.PROG_CGROUP_SOCK_ADDR,
            bpfsys.ATTACH_CGROUP_INET4_GETPEERNAME),
    Program("sock_setsockopt", bpfsys.PROG_CGROUP_SOCKOPT, bpfsys.ATTACH_CGROUP_SETSOCKOPT),
    Program("sock_ops", bpfsys.PROG_SOCK_OPS, bpfsys.ATTACH_CGROUP_SOCK_OPS),
)


class LoadError(RuntimeError):
    """The programs could not be compiled, loaded or attached; the message says why."""


def bpf_dir() -> Path:
    """The C sources: inside an installed wheel (dataplane/_bpf) or the source tree (bpf/)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_bpf", here.parent / "bpf"):
        if (candidate / "sock_lb.c").exists():
            return candidate
    raise LoadError(f"eBPF sources not found next to {here} (expected _bpf/ or ../bpf/)")


_INCLUDE = re.compile(r'^#include "([^"]+)"\s*$')


def assemble_source(root: Path | None = None) -> str:
    """The entry files with their project headers inlined.

    bcc rewrites map calls (map.lookup(...)) only in its main file, so the
    helpers in bpf/lib/*.h must become part of it; #line keeps compiler
    messages pointing at the real file and line.
    """
    root = root or bpf_dir()
    seen: set[Path] = set()

    def inline(path: Path) -> list[str]:
        out = [f'#line 1 "{path.relative_to(root)}"']
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            match = _INCLUDE.match(line)
            if not match:
                out.append(line)
                continue
            dep = (path.parent / match.group(1)).resolve()
            if dep not in seen:
                seen.add(dep)
                out.extend(inline(dep))
                out.append(f'#line {lineno + 1} "{path.relative_to(root)}"')
        return out

    lines: list[str] = []
    for entry in ENTRY_FILES:
        lines.extend(inline((root / entry).resolve()))
    return "\n".join(lines) + "\n"


def preflight(settings: Settings) -> None:
    """Every host requirement, checked before anything is touched."""
    host.require_root()
    host.require_kernel_headers()
    bpffs = settings.pin_dir
    while not host.bpffs_mounted(bpffs) and bpffs != bpffs.parent:
        bpffs = bpffs.parent
    if not host.bpffs_mounted(bpffs):
        raise host.HostError(
            f"{settings.pin_dir} is not on a bpffs mount "
            "(mount one with: mount -t bpf bpf /sys/fs/bpf, or run deploy/node-setup.sh)")
    host.cgroup2_root()


class Datapath:
    """The compiled programs, loaded into the kernel; maps pinned and adopted."""

    def __init__(self, settings: Settings) -> None:
        preflight(settings)
        try:
            from bcc import BPF  # Debian's python3-bpfcc
        except ImportError as exc:
            raise LoadError(
                "bcc is not importable: install Debian's python3-bpfcc and use a venv "
                "created with --system-site-packages (make setup does both)") from exc
        self.settings = settings
        settings.pin_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.bpf: Any = BPF(text=assemble_source(), cflags=[*settings.cflags(),
                                                                 "-Wno-unused-function"])
            self.fds = {
                p.name: self.bpf.load_func(p.name, p.prog_type, attach_type=p.attach_type).fd
                for p in PROGRAMS
            }
        except Exception as exc:  # bcc raises bare Exception for compile and verifier errors
            raise LoadError(f"loading the eBPF programs failed: {exc}") from exc
        meta = abi.Meta(hash_seed=settings.hash_seed, fail_k=settings.fail_k,
                        candidates=settings.candidates, abi_version=abi.ABI_VERSION)
        bpfsys.update(self.bpf["kvr_meta"].map_fd, abi.ct.c_uint32(0), meta)

    def attach(self, cgroup: Path) -> list[str]:
        """Attach every program to a cgroup v2 directory, or swap it in where a pinned
        link exists already (restart or upgrade). Returns what was done, per program."""
        links = self.settings.pin_dir / "links"
        links.mkdir(exist_ok=True)
        cgroup_id = os.stat(cgroup).st_ino
        done: list[str] = []
        with _dir_fd(cgroup) as cg_fd:
            for prog in PROGRAMS:
                pin = links / prog.name
                if pin.exists():
                    link_fd = bpfsys.obj_get(pin)
                    try:
                        attached_to = bpfsys.link_cgroup_id(link_fd)
                        if attached_to != cgroup_id:
                            raise LoadError(
                                f"{self.settings.pin_dir} is attached to another cgroup "
                                f"(id {attached_to}); run `kvroute uninstall` first")
                        bpfsys.link_update(link_fd, self.fds[prog.name])
                        done.append(f"{prog.name}: replaced")
                    finally:
                        os.close(link_fd)
                else:
                    link_fd = bpfsys.link_create(self.fds[prog.name], cg_fd, prog.attach_type)
                    try:
                        bpfsys.obj_pin(link_fd, pin)
                    finally:
                        os.close(link_fd)
                    done.append(f"{prog.name}: attached")
        return done

    def close(self) -> None:
        """Drop this process's handles; pinned maps and links stay."""
        self.bpf.cleanup()


@contextmanager
def _dir_fd(path: Path) -> Iterator[int]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise LoadError(f"cannot open cgroup {path}: {exc.strerror}") from exc
    try:
        yield fd
    finally:
        os.close(fd)


def uninstall(pin_dir: Path) -> list[str]:
    """Detach every pinned link and remove every pin: routing by kvroute ends."""
    removed: list[str] = []
    links = pin_dir / "links"
    if links.is_dir():
        for pin in sorted(links.iterdir()):
            fd = bpfsys.obj_get(pin)
            try:
                bpfsys.link_detach(fd)
            finally:
                os.close(fd)
            pin.unlink()
            removed.append(f"link {pin.name}")
        links.rmdir()
    if pin_dir.is_dir():
        for pin in sorted(pin_dir.iterdir()):
            if pin.is_dir():
                shutil.rmtree(pin)
            else:
                pin.unlink()
            removed.append(f"map {pin.name}")
        pin_dir.rmdir()
    return removed
