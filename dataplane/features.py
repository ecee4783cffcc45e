"""What the programs need from the running kernel, and what kvroute does without it.

A pure core: :data:`FEATURES` lists every kernel facility the programs use that is newer
than the oldest kernels users run (each with the Linux release that brought it), and
:func:`decide` turns the answers of a probe (``dataplane.probe``, the edge that asks the
kernel) into a :class:`Plan`: the ``-D`` flags that select a fallback, what the fallbacks
change for clients, and the features whose absence stops the load. The loader stops
*before* compiling when a required feature is missing, so a person reads "needs X (Linux
N)" instead of a verifier dump.
"""

from __future__ import annotations

import dataclasses
import errno
from collections.abc import Mapping

from dataplane import bpfsys as b


@dataclasses.dataclass(frozen=True)
class Probe:
    """One question to the kernel. ``kind`` says how the edge asks it:

    - ``prog``: can a program of ``prog_type`` load (with ``attach_type`` as its expected
      attach type when given)?
    - ``map``: can a map of ``map_type`` (with ``map_flags``) be created?
    - ``helper``: may a program of ``prog_type`` call helper ``helper``?
    - ``link``: does the kernel have BPF_LINK_CREATE?
    """

    kind: str
    prog_type: int = 0
    attach_type: int | None = None
    map_type: int = 0
    map_flags: int = 0
    helper: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("prog", "map", "helper", "link"):
            raise ValueError(f"unknown probe kind {self.kind!r}")


@dataclasses.dataclass(frozen=True)
class Feature:
    name: str      # stable key: what a probe result is filed under
    what: str      # for people: the facility, in the kernel's own words
    since: str     # the first Linux release that has it
    probe: Probe
    # None: required (the load stops without it). Otherwise the -D flag compiled in when
    # the kernel has it, and what clients see differently when it does not.
    enable_flag: str | None = None
    without: str = ""
    # Needed by the packet path only (bpf/tc_nodeport.c, loaded with
    # --external-interface): its absence stops that load, not the socket path's.
    packet_path: bool = False


FEATURES: tuple[Feature, ...] = (
    Feature("prog_sock_addr", "BPF_PROG_TYPE_CGROUP_SOCK_ADDR programs (connect4)", "4.17",
            Probe("prog", b.PROG_CGROUP_SOCK_ADDR, b.ATTACH_CGROUP_INET4_CONNECT)),
    Feature("attach_getpeername4", "the cgroup/getpeername4 attach point", "5.8",
            Probe("prog", b.PROG_CGROUP_SOCK_ADDR, b.ATTACH_CGROUP_INET4_GETPEERNAME)),
    Feature("attach_sendmsg4", "the cgroup/sendmsg4 attach point (unconnected UDP)", "4.18",
            Probe("prog", b.PROG_CGROUP_SOCK_ADDR, b.ATTACH_CGROUP_UDP4_SENDMSG)),
    Feature("attach_recvmsg4", "the cgroup/recvmsg4 attach point (UDP replies from the VIP)",
            "5.2", Probe("prog", b.PROG_CGROUP_SOCK_ADDR, b.ATTACH_CGROUP_UDP4_RECVMSG)),
    Feature("attach_connect6", "the cgroup/connect6 attach point", "4.17",
            Probe("prog", b.PROG_CGROUP_SOCK_ADDR, b.ATTACH_CGROUP_INET6_CONNECT)),
    Feature("attach_sock_release", "the cgroup/sock_release attach point (a closed UDP "
            "socket's entries go with it)", "5.9",
            Probe("prog", b.PROG_CGROUP_SOCK, b.ATTACH_CGROUP_INET_SOCK_RELEASE)),
    Feature("prog_sockopt", "BPF_PROG_TYPE_CGROUP_SOCKOPT programs (cgroup/setsockopt)", "5.3",
            Probe("prog", b.PROG_CGROUP_SOCKOPT, b.ATTACH_CGROUP_SETSOCKOPT)),
    Feature("prog_sock_ops", "BPF_PROG_TYPE_SOCK_OPS programs", "4.13",
            Probe("prog", b.PROG_SOCK_OPS)),
    Feature("map_sk_storage", "BPF_MAP_TYPE_SK_STORAGE maps (socket-local storage)", "5.2",
            Probe("map", map_type=b.BPF_MAP_TYPE_SK_STORAGE)),
    Feature("map_ringbuf", "BPF_MAP_TYPE_RINGBUF maps (kvr_events)", "5.8",
            Probe("map", map_type=b.BPF_MAP_TYPE_RINGBUF)),
    Feature("map_inner_mmap", "BPF_F_INNER_MAP | BPF_F_MMAPABLE arrays (the table groups)",
            "5.10", Probe("map", map_type=b.BPF_MAP_TYPE_ARRAY,
                          map_flags=b.BPF_F_INNER_MAP | b.BPF_F_MMAPABLE)),
    Feature("map_hash_of_maps", "BPF_MAP_TYPE_HASH_OF_MAPS maps", "4.12",
            Probe("map", map_type=b.BPF_MAP_TYPE_HASH_OF_MAPS)),
    Feature("helper_sk_storage_get", "bpf_sk_storage_get() in cgroup sock_addr programs",
            "5.10", Probe("helper", b.PROG_CGROUP_SOCK_ADDR, helper=b.FUNC_SK_STORAGE_GET)),
    Feature("helper_netns_cookie", "bpf_get_netns_cookie() in cgroup sock_addr programs",
            "5.7", Probe("helper", b.PROG_CGROUP_SOCK_ADDR, helper=b.FUNC_GET_NETNS_COOKIE)),
    Feature("helper_socket_cookie", "bpf_get_socket_cookie() in cgroup sock_addr programs",
            "4.12", Probe("helper", b.PROG_CGROUP_SOCK_ADDR, helper=b.FUNC_GET_SOCKET_COOKIE)),
    Feature("helper_socket_cookie_sock", "bpf_get_socket_cookie() in cgroup sock programs "
            "(sock_release)", "5.7",
            Probe("helper", b.PROG_CGROUP_SOCK, helper=b.FUNC_GET_SOCKET_COOKIE)),
    Feature("helper_ringbuf_output", "bpf_ringbuf_output() in cgroup sock_addr programs",
            "5.8", Probe("helper", b.PROG_CGROUP_SOCK_ADDR, helper=b.FUNC_RINGBUF_OUTPUT)),
    Feature("link_create", "bpf_link for cgroup programs (pinned, atomically updated)", "5.7",
            Probe("link")),
    Feature("helper_set_retval", "bpf_set_retval() in cgroup programs", "5.18",
            Probe("helper", b.PROG_CGROUP_SOCK_ADDR, helper=b.FUNC_SET_RETVAL),
            enable_flag="ENABLE_SET_RETVAL",
            without="a refused connect() or session tag fails with EPERM, not "
                    "ECONNREFUSED / EINVAL / ENOPROTOOPT"),
    # The packet path (NodePort, external IPs): a tc program on a clsact qdisc.
    Feature("prog_sched_cls", "BPF_PROG_TYPE_SCHED_CLS programs (tc clsact, direct action)",
            "4.5", Probe("prog", b.PROG_SCHED_CLS), packet_path=True),
    Feature("helper_fib_lookup", "bpf_fib_lookup() in tc programs (routing SNATed packets)",
            "4.18", Probe("helper", b.PROG_SCHED_CLS, helper=b.FUNC_FIB_LOOKUP),
            packet_path=True),
    Feature("helper_redirect_neigh", "bpf_redirect_neigh() in tc programs (a next hop "
            "without a known MAC)", "5.10",
            Probe("helper", b.PROG_SCHED_CLS, helper=b.FUNC_REDIRECT_NEIGH),
            packet_path=True),
)

BY_NAME = {f.name: f for f in FEATURES}


class Unsupported(RuntimeError):
    """The running kernel lacks a facility the programs cannot do without."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """How to build the programs for one kernel."""

    release: str
    cflags: tuple[str, ...]          # -DENABLE_X for every optional feature present
    fallbacks: tuple[Feature, ...]   # optional features absent: compiled without
    missing: tuple[Feature, ...]     # required features absent: nothing can load
    # packet-path features absent: the socket path loads, the packet path cannot
    packet_missing: tuple[Feature, ...] = ()

    @property
    def set_retval(self) -> bool:
        return BY_NAME["helper_set_retval"] not in self.fallbacks

    @property
    def refuse_errno(self) -> int:
        """The errno a connect() to a service with no usable backend fails with."""
        return errno.ECONNREFUSED if self.set_retval else errno.EPERM

    def notes(self) -> list[str]:
        """One line per fallback in use, for the agent's log."""
        return [f"{f.what} needs Linux {f.since}, this kernel is {self.release}: {f.without}"
                for f in self.fallbacks]

    def require(self) -> None:
        """Raise :class:`Unsupported` naming every missing required feature."""
        _require(self.release, self.missing, "the kvroute programs need",
                 "Run kvroute on Linux {newest} or newer (see README, supported kernels).")

    def require_packet_path(self) -> None:
        """Raise :class:`Unsupported` naming every missing feature of the packet path
        (checked only when it is asked for: --external-interface)."""
        _require(self.release, self.packet_missing,
                 "the packet path (NodePort, external IPs) needs",
                 "Run it on Linux {newest} or newer, or leave out --external-interface.")


def _require(release: str, missing: tuple[Feature, ...], who: str, advice: str) -> None:
    """Raise :class:`Unsupported` naming each of ``missing`` and the release that has it;
    ``advice`` may name {newest}, the newest of those releases."""
    if not missing:
        return
    needs = "; ".join(f"{f.what} (Linux {f.since})" for f in missing)
    newest = max((f.since for f in missing), key=_version_key)
    raise Unsupported(f"kernel {release} lacks what {who}: {needs}. "
                      + advice.format(newest=newest))


def rows(found: Mapping[str, bool]) -> list[dict[str, object]]:
    """Every feature with its probe answer, for people (``kvroute check-kernel``)."""
    return [{"name": f.name, "what": f.what, "since": f.since,
             "present": found.get(f.name, False),
             "without": f.without if f.enable_flag
             else "no packet path (--external-interface)" if f.packet_path
             else "cannot load"} for f in FEATURES]


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


def decide(found: Mapping[str, bool], release: str) -> Plan:
    """Turn probe answers (feature name -> present) into a build plan.

    A feature the probe did not answer counts as absent: a plan never assumes more of the
    kernel than was shown.
    """
    unknown = set(found) - set(BY_NAME)
    if unknown:
        raise ValueError(f"probe answered for unknown features: {sorted(unknown)}")
    cflags: list[str] = []
    fallbacks: list[Feature] = []
    missing: list[Feature] = []
    packet_missing: list[Feature] = []
    for feature in FEATURES:
        present = found.get(feature.name, False)
        if feature.packet_path:
            if not present:
                packet_missing.append(feature)
        elif feature.enable_flag is None:
            if not present:
                missing.append(feature)
        elif present:
            cflags.append(f"-D{feature.enable_flag}")
        else:
            fallbacks.append(feature)
    return Plan(release, tuple(cflags), tuple(fallbacks), tuple(missing),
                tuple(packet_missing))
