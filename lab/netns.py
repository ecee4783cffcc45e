"""The one-machine lab: pods and clients as network namespaces on one host bridge.

Layout of a lab with tag ``T`` on subnet ``S`` (all names start with ``kvr`` + tag, so
:func:`sweep` can find leftovers of a crashed run)::

    host:   bridge kvrTbr (S.1)  ── veth kvrTv0 ──  netns kvrT-gpu0:   eth0 S.10
                                 ── veth kvrTv1 ──  netns kvrT-gpu1:   eth0 S.11
                                 ── veth kvrTv2 ──  netns kvrT-client: eth0 S.200
    cgroup: <cgroup2 root>/kvrT-clients-<random>   (for client processes)

Everything is L2 on the one bridge, so no forwarding or NAT is touched on the host, and the
only addresses involved are the lab's own. One host setting can still interfere: with
br_netfilter loaded (net.bridge.bridge-nf-call-iptables=1), bridged client→pod frames pass the
host's iptables FORWARD chain, so a host whose FORWARD policy is DROP (Docker sets that) blocks
them; host→pod traffic is local and unaffected.

Teardown keeps a registry of undo steps, pushed right after each thing is made, run newest
first; every step tolerates what is already gone. A failure half-way through up() or add_pod()
therefore removes exactly what had been made.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import functools
import ipaddress
import os
import re
import secrets
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

import pyroute2
import pyroute2.netlink.exceptions
import pyroute2.netns

import dataplane.host
import lab.cgroup
import lab.run

T = TypeVar("T")

NAME_ROOT = "kvr"
IFNAMSIZ = 15  # usable characters in an interface name
POD_OFFSET = 10  # pods get .10, .11, …
CLIENT_OFFSET = 200  # clients get .200, .201, …
# Grace between SIGTERM and SIGKILL for spawned programs at teardown.
TERM_GRACE_SECONDS = 1.0

_POD_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,31}$")
_TAG = re.compile(r"^[a-z0-9]{1,5}$")
_B36 = "0123456789abcdefghijklmnopqrstuvwxyz"


class LabError(RuntimeError):
    """The lab could not be built or torn down as asked; the message says why."""


class LabUnsupported(LabError):
    """The kernel lacks something the lab needs (EOPNOTSUPP); tests turn this into a skip."""


def _b36(n: int, width: int) -> str:
    out = ""
    for _ in range(width):
        n, r = divmod(n, 36)
        out = _B36[r] + out
    return out


def new_tag() -> str:
    """Five characters: two from the pid (labs of one process share them, so a person can
    tell runs apart), three random (labs of one process differ)."""
    return _b36(os.getpid() % 36**2, 2) + _b36(secrets.randbelow(36**3), 3)


def _is_gone(e: BaseException) -> bool:
    if isinstance(e, pyroute2.netlink.exceptions.NetlinkError):
        return e.code in (errno.ENODEV, errno.ENOENT, errno.ESRCH)
    return isinstance(e, FileNotFoundError | ProcessLookupError)


class _Undo:
    """Undo steps, newest first. A step that finds its object gone counts as done."""

    def __init__(self) -> None:
        self._steps: list[tuple[str, Callable[[], None]]] = []

    def push(self, what: str, step: Callable[[], None]) -> None:
        self._steps.append((what, step))

    def absorb(self, other: _Undo) -> None:
        self._steps.extend(other._steps)
        other._steps.clear()

    def run(self) -> list[str]:
        failures: list[str] = []
        while self._steps:
            what, step = self._steps.pop()
            try:
                step()
            except Exception as e:
                if not _is_gone(e):
                    failures.append(f"{what}: {e!r}")
        return failures


def _netlink_unsupported(e: pyroute2.netlink.exceptions.NetlinkError, what: str) -> LabError:
    if e.code == errno.EOPNOTSUPP:
        return LabUnsupported(f"the kernel cannot make {what} (EOPNOTSUPP): {e}")
    return LabError(f"cannot make {what}: {e}")


def _delete_link(ifname: str) -> None:
    with pyroute2.IPRoute() as ipr:
        indexes = ipr.link_lookup(ifname=ifname)
        if indexes:
            ipr.link("del", index=indexes[0])


def _kill_netns_processes(names: list[str]) -> None:
    """SIGKILL whatever still runs in these namespaces (daemons a program left behind)."""
    wanted = set(names)
    for ns, pids in pyroute2.netns.ns_pids().items():
        if ns in wanted:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def _remove_netns(name: str) -> None:
    if name in pyroute2.netns.listnetns():
        pyroute2.netns.remove(name)


def _write_proc_sys(key: str, value: str) -> None:
    path = "/proc/sys/" + key.replace(".", "/")
    with open(path, "w", encoding="ascii") as f:
        f.write(value)


def sysctl(netns: str, key: str, value: str | int) -> None:
    """Set ``key`` (dotted, e.g. ``net.ipv4.ip_forward``) inside ``netns``. /proc/sys/net is
    per namespace, so the write happens in a child that has entered it."""
    lab.run.call(netns, _write_proc_sys, key, str(value), timeout=10)


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each process group, give them a moment together, then SIGKILL the rest."""
    live = [p for p in procs if p.poll() is None]
    for p in live:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + TERM_GRACE_SECONDS
    for p in live:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(max(0.0, deadline - time.monotonic()))
    for p in procs:
        # The group too: a program's own children may outlive it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()


@dataclass
class Pod:
    """A network namespace with one address on the lab bridge (a GPU pod or a client)."""

    name: str
    netns: str
    address: ipaddress.IPv4Address
    veth_host: str
    # Told about every process spawn() starts, so the lab can kill it at teardown.
    on_spawn: Callable[[subprocess.Popen[bytes]], None] | None = field(
        default=None, repr=False, compare=False
    )

    def spawn(
        self,
        argv: list[str],
        *,
        cgroup: lab.cgroup.Cgroup | None = None,
        env: Mapping[str, str] | None = None,
        stdout: Any = None,
        stderr: Any = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` in this pod (and ``cgroup``). ``env`` is added to the current
        environment. The lab kills the process (group) in down()."""
        proc = lab.run.spawn(self.netns, argv, cgroup=cgroup, env=env, stdout=stdout, stderr=stderr)
        if self.on_spawn is not None:
            self.on_spawn(proc)
        return proc

    def call(
        self,
        fn: Callable[..., T],
        *args: Any,
        cgroup: lab.cgroup.Cgroup | None = None,
        timeout: float = 60,
        **kwargs: Any,
    ) -> T:
        """``fn(*args, **kwargs)`` in a forked child inside this pod; see :func:`lab.run.call`."""
        return lab.run.call(self.netns, fn, *args, cgroup=cgroup, timeout=timeout, **kwargs)


class Lab:
    """A host bridge, pods and clients in their own namespaces, and a cgroup for clients.

    Use as ``with Lab("10.77.3.0/24") as lab:`` or call up()/down(). Several labs may exist at
    once if their subnets differ (up() refuses a subnet already on a host interface).
    """

    def __init__(self, subnet: str = "10.77.0.0/24", prefix: str | None = None) -> None:
        self.subnet = ipaddress.IPv4Network(subnet)
        if self.subnet.prefixlen > 24:
            raise ValueError(f"lab subnet {subnet} is smaller than a /24 (clients use .200+)")
        tag = prefix if prefix is not None else new_tag()
        if not _TAG.match(tag):
            raise ValueError(f"lab prefix must be 1-5 of [a-z0-9], got {tag!r}")
        self.prefix = tag
        self.names = NAME_ROOT + tag  # what every name of this lab starts with
        self.bridge = f"{self.names}br"
        self.gateway = self.subnet.network_address + 1
        self.pods: dict[str, Pod] = {}
        self.clients: dict[str, Pod] = {}
        self._cgroup: lab.cgroup.Cgroup | None = None
        self._undo = _Undo()
        self._procs: list[subprocess.Popen[bytes]] = []
        self._links = 0
        self._up = False

    @property
    def cgroup(self) -> lab.cgroup.Cgroup:
        """The lab's client cgroup (exists between up() and down())."""
        if self._cgroup is None:
            raise LabError("the lab is not up; its cgroup exists only between up() and down()")
        return self._cgroup

    def __enter__(self) -> Lab:
        return self.up()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()

    def up(self) -> Lab:
        """Make the bridge (with the gateway address) and the client cgroup."""
        if self._up:
            return self
        try:
            self._check_subnet_free()
            self._make_bridge()
            self._cgroup = lab.cgroup.Cgroup.create(f"{self.names}-clients")
            self._undo.push(f"cgroup {self._cgroup.path}", self._drop_cgroup)
        except BaseException:
            self.down()
            raise
        self._up = True
        return self

    def down(self) -> None:
        """Kill what the lab started, remove namespaces, links and cgroup. Idempotent."""
        self._up = False
        _stop(self._procs)
        self._procs.clear()
        every = [p.netns for p in (*self.pods.values(), *self.clients.values())]
        if every:
            _kill_netns_processes(every)
        failures = self._undo.run()
        self.pods.clear()
        self.clients.clear()
        if failures:
            raise LabError("lab teardown left things behind: " + "; ".join(failures))

    def add_pod(self, name: str) -> Pod:
        """A pod namespace with the next address from .10 up."""
        offset = POD_OFFSET + len(self.pods)
        if offset >= CLIENT_OFFSET:
            raise LabError(f"no pod addresses left in {self.subnet}")
        pod = self._add(name, self.subnet.network_address + offset)
        self.pods[name] = pod
        return pod

    def add_client(self, name: str) -> Pod:
        """A client namespace with the next address from .200 up."""
        address = self.subnet.network_address + CLIENT_OFFSET + len(self.clients)
        if address >= self.subnet.broadcast_address:
            raise LabError(f"no client addresses left in {self.subnet}")
        pod = self._add(name, address)
        self.clients[name] = pod
        return pod

    def _track(self, proc: subprocess.Popen[bytes]) -> None:
        self._procs.append(proc)

    def _drop_cgroup(self) -> None:
        if self._cgroup is not None:
            self._cgroup.remove()
            self._cgroup = None

    def _check_subnet_free(self) -> None:
        with pyroute2.IPRoute() as ipr:
            for msg in ipr.get_addr(family=2):  # AF_INET
                net = ipaddress.IPv4Network(
                    f"{msg.get('IFA_ADDRESS')}/{msg['prefixlen']}", strict=False
                )
                if net.overlaps(self.subnet):
                    owner = msg.get("IFA_LABEL") or f"index {msg['index']}"
                    raise LabError(
                        f"subnet {self.subnet} overlaps {net} on {owner}; "
                        "give each lab its own subnet (or run `kvroute lab clean`)"
                    )

    def _make_bridge(self) -> None:
        with pyroute2.IPRoute() as ipr:
            try:
                # STP off and no forward delay: ports forward the moment they are up.
                ipr.link(
                    "add", ifname=self.bridge, kind="bridge", br_stp_state=0, br_forward_delay=0
                )
            except pyroute2.netlink.exceptions.NetlinkError as e:
                raise _netlink_unsupported(e, f"bridge {self.bridge}") from e
            self._undo.push(f"bridge {self.bridge}", lambda: _delete_link(self.bridge))
            index = ipr.link_lookup(ifname=self.bridge)[0]
            ipr.addr("add", index=index, address=str(self.gateway), prefixlen=self.subnet.prefixlen)
            ipr.link("set", index=index, state="up")

    def _add(self, name: str, address: ipaddress.IPv4Address) -> Pod:
        if not self._up:
            raise LabError("call up() (or use the lab as a context manager) before adding pods")
        if not _POD_NAME.match(name):
            raise ValueError(f"pod name must match {_POD_NAME.pattern}, got {name!r}")
        if name in self.pods or name in self.clients:
            raise LabError(f"the lab already has a pod or client called {name!r}")
        netns = f"{self.names}-{name}"
        veth = f"{self.names}v{self._links}"
        if len(veth) > IFNAMSIZ:
            raise LabError(f"interface name {veth} is longer than {IFNAMSIZ} characters")
        self._links += 1
        undo = _Undo()
        try:
            self._build_pod(undo, netns, veth, address)
        except BaseException:
            failures = undo.run()
            if failures:
                raise LabError("; ".join(failures)) from None
            raise
        self._undo.absorb(undo)
        return Pod(name=name, netns=netns, address=address, veth_host=veth, on_spawn=self._track)

    def _build_pod(
        self, undo: _Undo, netns: str, veth: str, address: ipaddress.IPv4Address
    ) -> None:
        pyroute2.netns.create(netns)

        def drop_netns() -> None:
            _kill_netns_processes([netns])
            _remove_netns(netns)

        undo.push(f"netns {netns}", drop_netns)
        with pyroute2.IPRoute() as ipr:
            try:
                # The peer is born inside the namespace, so its name never clashes on the host.
                ipr.link(
                    "add", ifname=veth, kind="veth", peer={"ifname": "eth0", "net_ns_fd": netns}
                )
            except pyroute2.netlink.exceptions.NetlinkError as e:
                raise _netlink_unsupported(e, f"veth {veth}") from e
            # Deleting the host end deletes the pair; done before the netns goes, because a
            # namespace is destroyed asynchronously and its veth would linger a moment.
            undo.push(f"veth {veth}", lambda: _delete_link(veth))
            bridge = ipr.link_lookup(ifname=self.bridge)[0]
            host_end = ipr.link_lookup(ifname=veth)[0]
            ipr.link("set", index=host_end, master=bridge, state="up")
        with pyroute2.IPRoute(netns=netns) as ns:
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
            eth0 = ns.link_lookup(ifname="eth0")[0]
            ns.addr("add", index=eth0, address=str(address), prefixlen=self.subnet.prefixlen)
            ns.link("set", index=eth0, state="up")
            # No default route on purpose: a lab namespace reaches its subnet and nothing
            # else, so a connect() the programs leave alone (an unrouted VIP, say) fails
            # at once with ENETUNREACH instead of leaving the machine through the host.


@dataclass
class SweepReport:
    """What :func:`sweep` removed (and what it could not)."""

    namespaces: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    cgroups: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def sweep(prefix_glob: str = NAME_ROOT) -> SweepReport:
    """Remove lab leftovers whose names match ``prefix_glob + "*"``: processes in and then the
    namespaces themselves, host links (veths, bridges), and cgroups under the v2 root.

    The default removes every lab on the machine, running ones included; pass a lab's
    ``names`` to remove one lab only.
    """
    pattern = prefix_glob + "*"
    report = SweepReport()

    def attempt(bucket: list[str], what: str, step: Callable[[], None]) -> None:
        try:
            step()
            bucket.append(what)
        except Exception as e:
            if not _is_gone(e):
                report.failures.append(f"{what}: {e!r}")

    namespaces = [n for n in pyroute2.netns.listnetns() if fnmatch.fnmatchcase(n, pattern)]
    if namespaces:
        _kill_netns_processes(namespaces)
    with pyroute2.IPRoute() as ipr:
        links = [
            str(msg.get("IFLA_IFNAME"))
            for msg in ipr.get_links()
            if fnmatch.fnmatchcase(str(msg.get("IFLA_IFNAME")), pattern)
        ]
    # veths before bridges, so no veth is briefly enslaved to nothing while we work.
    for name in sorted(links, key=lambda n: n.endswith("br")):
        attempt(report.links, name, functools.partial(_delete_link, name))
    for name in namespaces:
        attempt(report.namespaces, name, functools.partial(pyroute2.netns.remove, name))
    root = dataplane.host.cgroup2_root()
    for path in sorted(root.iterdir()):
        if path.is_dir() and fnmatch.fnmatchcase(path.name, pattern):
            attempt(report.cgroups, str(path), lab.cgroup.Cgroup(path).remove)
    return report
