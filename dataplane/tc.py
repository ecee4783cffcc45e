"""The packet path's programs (bpf/tc_nodeport.c): compile, load, attach to interfaces.

Traffic that arrives at a node from outside (NodePort, externalIPs, LoadBalancer IPs)
has no local socket for connect4 to rewrite, so a tc (clsact, direct-action) program
on the node's external interfaces translates its packets. The programs are a bcc
object of their own: they share every service and backend map with the socket
programs through the pins (BPF_TABLE_PINNED adopts what exists), and pin the packet
path's own maps (dataplane.maps.NODEPORT_MAPS) only when loaded, so a node without
external traffic pays no conntrack memory.

tc filters hold their programs: they outlive the agent like the socket path's pinned
links, and a new agent replaces them in place (same handle).
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import dataclasses
import errno
from collections.abc import Iterator
from typing import Any

from dataplane import abi, bpfsys, features, loader
from dataplane.settings import Settings

ENTRY = "tc_nodeport.c"
INGRESS = "tc_np4_ingress"  # starts and follows flows; takes SNATed replies
EGRESS = "tc_np4_egress"    # follows flows only: replies of local backends
# kvr_np_progs slot -> program: the stages of a new flow, tail-called in turn.
STAGES = ((abi.NP_PROG_NEW, "tc_np4_new"), (abi.NP_PROG_PICK, "tc_np4_pick"),
          (abi.NP_PROG_NAT, "tc_np4_nat"), (abi.NP_PROG_LOCAL, "tc_np4_local"))

PARENT_INGRESS = "ffff:fff2"
PARENT_EGRESS = "ffff:fff3"
# The filter's handle and priority: fixed, so a restarted agent replaces its own filter
# and leaves anyone else's on the interface alone.
HANDLE = 0x6B76
PRIORITY = 0x6B76

TC_ACT_OK = 0
TC_ACT_SHOT = 2
TC_ACT_REDIRECT = 7  # a translated packet routed by the program itself (np4_forward)


@dataclasses.dataclass(frozen=True)
class Interface:
    """Where the packet path attaches: an interface by name, in a network namespace
    (None: the agent's own)."""

    name: str
    netns: str | None = None


@contextlib.contextmanager
def _ipr(netns: str | None) -> Iterator[Any]:
    import pyroute2
    ipr = pyroute2.NetNS(netns) if netns else pyroute2.IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


class PacketPath:
    """The compiled packet-path programs, loaded; their stages written to kvr_np_progs."""

    def __init__(self, settings: Settings) -> None:
        plan, headers = loader.preflight(settings)
        try:
            plan.require_packet_path()
        except features.Unsupported as exc:
            raise loader.LoadError(str(exc)) from None
        try:
            from bcc import BPF  # Debian's python3-bpfcc
        except ImportError as exc:
            raise loader.LoadError("bcc is not importable (see dataplane.loader)") from exc
        self.settings = settings
        settings.pin_dir.mkdir(parents=True, exist_ok=True)
        try:
            # The socket path's header choice and feature flags: the two objects
            # share maps.h and abi.h, so they must compile them alike.
            with loader.compile_environ(headers):
                self.bpf: Any = BPF(text=loader.assemble_source(entries=(ENTRY,)),
                                    cflags=[*settings.cflags(), *plan.cflags,
                                            "-Wno-unused-function"])
            self.fds = {name: self.bpf.load_func(name, BPF.SCHED_CLS).fd
                        for name in (INGRESS, EGRESS, *(n for _, n in STAGES))}
        except Exception as exc:  # bcc raises bare Exception for compile and verifier errors
            raise loader.LoadError(f"loading the packet-path programs failed: {exc}") from exc
        # Before any filter points at the new ingress program: it must find its stages.
        progs_fd = self.bpf["kvr_np_progs"].map_fd
        for slot, name in STAGES:
            bpfsys.update(progs_fd, ct.c_uint32(slot), ct.c_uint32(self.fds[name]))

    def attach(self, iface: Interface, egress: bool = True) -> list[str]:
        """Attach ingress (and egress) to an interface, replacing kvroute's own filters
        there. Returns what was done."""
        done = []
        with _ipr(iface.netns) as ipr:
            links = ipr.link_lookup(ifname=iface.name)
            if not links:
                raise loader.LoadError(f"no interface {iface.name!r}"
                                       + (f" in netns {iface.netns}" if iface.netns else ""))
            index = links[0]
            try:
                ipr.tc("add", "clsact", index)
            except Exception as exc:  # NetlinkError: EEXIST when clsact is there already
                if getattr(exc, "code", None) != errno.EEXIST:
                    raise loader.LoadError(f"{iface.name}: cannot add clsact: {exc}") from exc
            for parent, prog in ((PARENT_INGRESS, INGRESS), (PARENT_EGRESS, EGRESS)):
                if prog == EGRESS and not egress:
                    continue
                ipr.tc("replace-filter", "bpf", index, HANDLE, fd=self.fds[prog], name=prog,
                       parent=parent, prio=PRIORITY, classid=1, direct_action=True)
                done.append(f"{iface.name}: {prog}")
        return done

    def test_run(self, prog: str, frame: bytes, repeat: int = 1) -> tuple[int, bytes, int]:
        """BPF_PROG_TEST_RUN of one of the programs on an Ethernet frame:
        (verdict, the frame as left, mean ns a run)."""
        return bpfsys.test_run(self.fds[prog], frame, repeat)

    def close(self) -> None:
        """Drop this process's handles; filters and pinned maps stay."""
        self.bpf.cleanup()


def detach(iface: Interface) -> bool:
    """Remove kvroute's filters from an interface (others' filters and the clsact qdisc
    stay). False when there was nothing of kvroute's."""
    removed = False
    with _ipr(iface.netns) as ipr:
        links = ipr.link_lookup(ifname=iface.name)
        if not links:
            return False
        for parent in (PARENT_INGRESS, PARENT_EGRESS):
            try:
                ipr.tc("del-filter", "bpf", links[0], HANDLE, parent=parent, prio=PRIORITY)
                removed = True
            except Exception as exc:  # NetlinkError: ENOENT/EINVAL when absent
                if getattr(exc, "code", None) not in (errno.ENOENT, errno.EINVAL):
                    raise
    return removed
