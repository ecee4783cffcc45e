"""Compile, load, pin and attach the kvroute programs (the bcc edge).

Attachments are bpf links pinned under <pin_dir>/links: they outlive the
agent, so routing never stops while it restarts, and a new agent swaps its
freshly compiled programs in with an atomic link update. Maps are pinned by
the C source itself (BPF_TABLE_PINNED), so a new load adopts them.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import re
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from dataplane import abi, bpfsys, features, host, maps, pins, uapi
from dataplane.settings import Settings

log = logging.getLogger(__name__)

ENTRY_FILES = ("sock_lb.c", "sock_ops.c")


@dataclasses.dataclass(frozen=True)
class Program:
    name: str
    prog_type: int
    attach_type: int


_SOCK_ADDR = bpfsys.PROG_CGROUP_SOCK_ADDR
PROGRAMS = (
    Program("sock4_connect", _SOCK_ADDR, bpfsys.ATTACH_CGROUP_INET4_CONNECT),
    Program("sock6_connect", _SOCK_ADDR, bpfsys.ATTACH_CGROUP_INET6_CONNECT),
    Program("sock4_sendmsg", _SOCK_ADDR, bpfsys.ATTACH_CGROUP_UDP4_SENDMSG),
    Program("sock6_sendmsg", _SOCK_ADDR, bpfsys.ATTACH_CGROUP_UDP6_SENDMSG),
    Program("sock4_recvmsg", _SOCK_ADDR, bpfsys.ATTACH_CGROUP_UDP4_RECVMSG),
    Program("sock6_recvmsg", _SOCK_ADDR, bpfsys.ATTACH_CGROUP_UDP6_RECVMSG),
    Program("sock4_getpeername", _SOCK_ADDR, bpfsys.ATTACH_CGROUP_INET4_GETPEERNAME),
    Program("sock6_getpeername", _SOCK_ADDR, bpfsys.ATTACH_CGROUP_INET6_GETPEERNAME),
    Program("sock_release", bpfsys.PROG_CGROUP_SOCK, bpfsys.ATTACH_CGROUP_INET_SOCK_RELEASE),
    Program("sock_setsockopt", bpfsys.PROG_CGROUP_SOCKOPT, bpfsys.ATTACH_CGROUP_SETSOCKOPT),
    Program("sock_ops", bpfsys.PROG_SOCK_OPS, bpfsys.ATTACH_CGROUP_SOCK_OPS),
)

# Loaded and reached by tail call (slot abi.PROG_PICK of the named program array), never
# attached: fleet residency (pick) and the table walk each have a verifier budget of their
# own (see bpf/lib/sock.h). One per attach type: the kernel refuses tail calls between
# programs of different ones. Walk programs come first: the agent fills the arrays in this
# order, so a pick program is never reachable before the walk program it jumps to.
TAIL_CALLS = (
    ("kvr_walk_c4", Program("sock4_walk", _SOCK_ADDR, bpfsys.ATTACH_CGROUP_INET4_CONNECT)),
    ("kvr_walk_c6", Program("sock6_walk", _SOCK_ADDR, bpfsys.ATTACH_CGROUP_INET6_CONNECT)),
    ("kvr_walk_s4", Program("udp4_walk", _SOCK_ADDR, bpfsys.ATTACH_CGROUP_UDP4_SENDMSG)),
    ("kvr_walk_s6", Program("udp6_walk", _SOCK_ADDR, bpfsys.ATTACH_CGROUP_UDP6_SENDMSG)),
    ("kvr_pick_c4", Program("sock4_pick", _SOCK_ADDR, bpfsys.ATTACH_CGROUP_INET4_CONNECT)),
    ("kvr_pick_c6", Program("sock6_pick", _SOCK_ADDR, bpfsys.ATTACH_CGROUP_INET6_CONNECT)),
    ("kvr_pick_s4", Program("udp4_pick", _SOCK_ADDR, bpfsys.ATTACH_CGROUP_UDP4_SENDMSG)),
    ("kvr_pick_s6", Program("udp6_pick", _SOCK_ADDR, bpfsys.ATTACH_CGROUP_UDP6_SENDMSG)),
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


def assemble_source(root: Path | None = None, entries: tuple[str, ...] = ENTRY_FILES) -> str:
    """The entry files (the socket programs unless told) with their project headers inlined.

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
    for entry in entries:
        lines.extend(inline((root / entry).resolve()))
    return "\n".join(lines) + "\n"


def probe_kernel() -> dict[str, bool]:
    """Ask the running kernel about every feature in dataplane.features (root needed)."""
    found: dict[str, bool] = {}
    for feature in features.FEATURES:
        p = feature.probe
        try:
            if p.kind == "prog":
                found[feature.name] = bpfsys.probe_prog(p.prog_type, p.attach_type)
            elif p.kind == "helper":
                found[feature.name] = bpfsys.probe_helper(p.prog_type, p.helper)
            elif p.kind == "map":
                found[feature.name] = bpfsys.probe_map(p.map_type, p.map_flags)
            else:
                found[feature.name] = bpfsys.probe_link()
        except OSError as exc:
            raise LoadError(f"cannot ask the kernel whether it has {feature.what}: "
                            f"{exc.strerror}") from exc
    return found


def kernel_plan() -> features.Plan:
    """What this kernel offers, as a build plan; raises features.Unsupported (naming each
    missing feature and the Linux release that has it) when the programs cannot load."""
    plan = features.decide(probe_kernel(), os.uname().release)
    plan.require()
    return plan


def preflight(settings: Settings) -> tuple[features.Plan, uapi.Headers]:
    """Every host requirement, checked before anything is touched: what the kernel offers
    (and so how to build for it) and which headers bcc compiles against."""
    host.require_root()
    host.check_pin_dir(settings.pin_dir)
    host.cgroup2_root()
    try:
        headers = uapi.find(settings.kernel_headers)
        return kernel_plan(), headers
    except (features.Unsupported, uapi.HeadersMissing) as exc:
        raise LoadError(str(exc)) from None


def compile_environ(headers: uapi.Headers) -> AbstractContextManager[None]:
    """The environment bcc compiles in for ``headers`` (the packet path's object too)."""
    return _environ(headers.environ())


@contextmanager
def _environ(extra: dict[str, str]) -> Iterator[None]:
    """``extra`` in os.environ while bcc compiles (it reads BCC_KERNEL_SOURCE there)."""
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class Datapath:
    """The compiled programs, loaded into the kernel; maps pinned and adopted."""

    def __init__(self, settings: Settings, plan: features.Plan | None = None) -> None:
        """``plan``: build for it instead of the running kernel's (tests use it to run a
        fallback on a kernel that needs none)."""
        probed, self.headers = preflight(settings)
        self.plan = plan or probed
        for note in self.plan.notes():
            log.warning("fallback: %s", note)
        log.info("compiling against the %s kernel headers in %s", self.headers.kind,
                 self.headers.path)
        try:
            from bcc import BPF  # Debian's python3-bpfcc
        except ImportError as exc:
            raise LoadError(
                "bcc is not importable: install Debian's python3-bpfcc and use a venv "
                "created with --system-site-packages (make setup does both)") from exc
        self.settings = settings
        settings.pin_dir.mkdir(parents=True, exist_ok=True)
        try:
            with _environ(self.headers.environ()):
                self.bpf: Any = BPF(text=assemble_source(), cflags=[
                    *settings.cflags(), *self.plan.cflags, "-Wno-unused-function"])
            self.fds = {
                p.name: self.bpf.load_func(p.name, p.prog_type, attach_type=p.attach_type).fd
                for p in (*PROGRAMS, *(prog for _, prog in TAIL_CALLS))
            }
        except Exception as exc:  # bcc raises bare Exception for compile and verifier errors
            # bcc reads E2BIG as "program too large"; the verifier also says it when a
            # program's paths take more than its 1M-instruction budget on this kernel.
            hint = (" (E2BIG: the verifier's 1,000,000-instruction budget ran out on this "
                    "kernel)" if "Argument list too long" in str(exc) else "")
            raise LoadError(
                f"loading the eBPF programs failed: {exc}{hint} (kernel {self.plan.release}, "
                f"which "
                f"has every feature kvroute probes for; compiled against the "
                f"{self.headers.kind} headers in {self.headers.path}; bcc printed the "
                "compiler or verifier output above: please report it)") from exc
        # Before any link points at a new entry point: it must find its tail call.
        for array, prog in TAIL_CALLS:
            bpfsys.update(self.bpf[array].map_fd, abi.ct.c_uint32(abi.PROG_PICK),
                          abi.ct.c_uint32(self.fds[prog.name]))
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


class NotKvroute(LoadError):
    """The pin dir holds nothing kvroute made: uninstall refused and changed nothing."""


@dataclasses.dataclass(frozen=True)
class Uninstalled:
    removed: list[str]  # "link NAME", "map NAME"
    kept: list[str]  # what was left in place, and why


def _look(path: Path) -> pins.Entry:
    """The facts pins.plan judges an entry by; the entry itself is only opened."""
    if path.is_symlink():
        return pins.Entry(path.name, "symlink")
    if path.is_dir():
        return pins.Entry(path.name, "dir")
    try:
        fd = bpfsys.obj_get(path)
    except OSError as exc:
        return pins.Entry(path.name, "", problem=f"cannot open it as a BPF object: {exc.strerror}")
    try:
        kind = bpfsys.obj_kind(fd)
        if kind == "map":
            name = bpfsys.map_info(fd).name.decode(errors="replace")
            return pins.Entry(path.name, kind, object_name=name)
        if kind == "link":
            cgroup = bpfsys.link_info(fd).type == bpfsys.BPF_LINK_TYPE_CGROUP
            return pins.Entry(path.name, kind, cgroup_link=cgroup)
        return pins.Entry(path.name, kind)
    finally:
        os.close(fd)


def _look_in(folder: Path) -> list[pins.Entry]:
    return [_look(p) for p in sorted(folder.iterdir())]


def remove_pins(pin_dir: Path) -> Uninstalled:
    """Detach kvroute's pinned links and remove kvroute's pins from ``pin_dir``, and the
    folders once empty; whatever else is there stays (and is named in ``kept``).

    Raises host.HostError for a folder that cannot be a pin dir (not on bpffs, the bpffs root)
    and NotKvroute for one holding pins of which none is kvroute's; both change nothing.
    """
    host.check_pin_dir(pin_dir)
    if not pin_dir.is_dir():
        return Uninstalled([], [])
    top = _look_in(pin_dir)
    links_dir = pin_dir / pins.LINKS_DIR
    has_links = any(e.name == pins.LINKS_DIR and e.kind == "dir" for e in top)
    plan = pins.plan(top, _look_in(links_dir) if has_links else [],
                     (*maps.PINNED_MAPS, *maps.NODEPORT_MAPS, *maps.RETIRED_MAPS),
                     [p.name for p in PROGRAMS])
    if not plan.owns_anything:
        if top:
            raise NotKvroute(f"{pin_dir} holds none of kvroute's pins ({plan.kept[0]}); "
                             "nothing removed: give the folder the agent pins into")
        return Uninstalled([], [])
    removed: list[str] = []
    for name in plan.links:
        fd = bpfsys.obj_get(links_dir / name)
        try:
            bpfsys.link_detach(fd)
        finally:
            os.close(fd)
        (links_dir / name).unlink()
        removed.append(f"link {name}")
    for name in plan.maps:
        (pin_dir / name).unlink()
        removed.append(f"map {name}")
    kept = list(plan.kept)
    for folder in (links_dir, pin_dir) if has_links else (pin_dir,):
        try:
            folder.rmdir()
        except OSError as exc:
            if exc.errno != errno.ENOTEMPTY:
                raise
            kept.append(f"{folder} stays: it holds what kvroute did not make")
    return Uninstalled(removed, kept)


def uninstall(pin_dir: Path) -> list[str]:
    """Detach kvroute's links and remove its pins (see remove_pins): routing by kvroute ends.
    Returns what was removed; what was left is logged."""
    done = remove_pins(pin_dir)
    for line in done.kept:
        log.warning("left in place: %s", line)
    return done.removed
