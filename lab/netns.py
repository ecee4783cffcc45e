"""The one-machine lab: pods and clients as network namespaces on one host bridge.

Layout of a lab with tag ``T`` on subnet ``S`` (all names start with ``kvr`` + tag)::

    host:   bridge kvrTbr (S.1)  ── veth kvrTv0 ──  netns kvrT-gpu0:   eth0 S.10
                                 ── veth kvrTv1 ──  netns kvrT-gpu1:   eth0 S.11
                                 ── veth kvrTv2 ──  netns kvrT-client: eth0 S.200
    cgroup: <cgroup2 root>/kvrT-clients-<random>   (for client processes)

Every namespace also has an IPv6 address, ``fd6b:7672::`` + its IPv4 address in the last 32
bits (/96, see :func:`ipv6_of`): distinct per lab because the IPv4 subnets are, and only
between the lab's namespaces (the bridge has none, so the host routes no lab IPv6 prefix).

Everything is L2 on the one bridge, so no forwarding or NAT is touched on the host, and the
only addresses involved are the lab's own. One host setting can still interfere: with
br_netfilter loaded (net.bridge.bridge-nf-call-iptables=1), bridged client→pod frames pass the
host's iptables FORWARD chain, so a host whose FORWARD policy is DROP (Docker sets that) blocks
them; host→pod traffic is local and unaffected.

Teardown keeps a registry of undo steps, pushed right after each thing is made, run newest
first; every step tolerates what is already gone. A failure half-way through up() or add_pod()
therefore removes exactly what had been made.

A process that dies without teardown (SIGKILL, a timeout) cannot run those steps, so each lab
also keeps an owner record (:mod:`lab.owner`) naming what it made, written before it makes
it. :func:`sweep`, run by every up() and at the start of a test session, removes the labs
whose owner is gone, and nothing else.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import functools
import ipaddress
import logging
import os
import re
import secrets
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import pyroute2
import pyroute2.netlink.exceptions
import pyroute2.netns

import dataplane.host
import dataplane.loader
import lab.cgroup
import lab.owner
import lab.run

T = TypeVar("T")
log = logging.getLogger(__name__)

NAME_ROOT = "kvr"
IFNAMSIZ = 15  # usable characters in an interface name
POD_OFFSET = 10  # pods get .10, .11, …
CLIENT_OFFSET = 200  # clients get .200, .201, …
# Grace between SIGTERM and SIGKILL for spawned programs at teardown.
TERM_GRACE_SECONDS = 1.0

_IFA_F_NODAD = 0x02  # linux/if_addr.h
_POD_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,31}$")
_TAG = re.compile(r"^[a-z0-9]{1,5}$")
_B36 = "0123456789abcdefghijklmnopqrstuvwxyz"


class LabError(RuntimeError):
    """The lab could not be built or torn down as asked; the message says why."""


class LabUnsupported(LabError):
    """The kernel lacks something the lab needs (EOPNOTSUPP); tests turn this into a skip."""


IPV6_PREFIX = ipaddress.IPv6Network("fd6b:7672::/96")


def ipv6_of(address: ipaddress.IPv4Address) -> ipaddress.IPv6Address:
    """A lab namespace's IPv6 address: its IPv4 address inside IPV6_PREFIX."""
    return IPV6_PREFIX.network_address + int(address)


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
        if not indexes:
            raise FileNotFoundError(f"no link {ifname}")
        ipr.link("del", index=indexes[0])


def _kill_netns_processes(names: list[str]) -> list[int]:
    """SIGKILL whatever still runs in these namespaces (daemons a program left behind);
    the pids signalled."""
    wanted = set(names)
    killed = []
    for ns, pids in pyroute2.netns.ns_pids().items():
        if ns in wanted:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
    return killed


def _host_networks() -> list[tuple[ipaddress.IPv4Network, str]]:
    """Every IPv4 network on a host interface, with the interface's name."""
    with pyroute2.IPRoute() as ipr:
        return [(ipaddress.IPv4Network(f"{m.get('IFA_ADDRESS')}/{m['prefixlen']}", strict=False),
                 m.get("IFA_LABEL") or f"index {m['index']}")
                for m in ipr.get_addr(family=2)]  # AF_INET


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

    @property
    def address6(self) -> ipaddress.IPv6Address:
        """The pod's IPv6 address (see :func:`ipv6_of`)."""
        return ipv6_of(self.address)


class Lab:
    """A host bridge, pods and clients in their own namespaces, and a cgroup for clients.

    Use as ``with Lab() as lab:`` or call up()/down(). Several labs may exist at once, in
    one process or many: with no subnet given, up() takes one no host interface and no other
    lab uses; a subnet given is refused if it is in use.
    """

    def __init__(self, subnet: str | None = None, prefix: str | None = None,
                 store: lab.owner.Store | None = None) -> None:
        # No subnet: up() takes a free one (lab.owner.AUTO_SUBNETS), so labs of two test
        # runs at once never meet; until then ``subnet`` is only a likely choice.
        self._auto_subnet = subnet is None
        if subnet is None:
            self.subnet = lab.owner.AUTO_SUBNETS[secrets.randbelow(len(lab.owner.AUTO_SUBNETS))]
        else:
            self.subnet = ipaddress.IPv4Network(subnet)
        if self.subnet.prefixlen > 24:
            raise ValueError(f"lab subnet {subnet} is smaller than a /24 (clients use .200+)")
        tag = prefix if prefix is not None else new_tag()
        if not _TAG.match(tag):
            raise ValueError(f"lab prefix must be 1-5 of [a-z0-9], got {tag!r}")
        self.prefix = tag
        self.names = NAME_ROOT + tag  # what every name of this lab starts with
        self.bridge = f"{self.names}br"
        self.pods: dict[str, Pod] = {}
        self.clients: dict[str, Pod] = {}
        self._cgroup: lab.cgroup.Cgroup | None = None
        self._undo = _Undo()
        self._procs: list[subprocess.Popen[bytes]] = []
        self._links = 0
        self._up = False
        self._store = store or lab.owner.Store()
        self._record: lab.owner.Record | None = None

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return self.subnet.network_address + 1

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
        """Remove labs whose owner died, then record this one and make the bridge (with the
        gateway address) and the client cgroup."""
        if self._up:
            return self
        for line in sweep().lines():
            log.warning("%s", line)
        try:
            self._claim()
            self._make_bridge()
            self._cgroup = lab.cgroup.Cgroup.create(f"{self.names}-clients")
            self.own_cgroup(self._cgroup)
            self._undo.push(f"cgroup {self._cgroup.path}", self._drop_cgroup)
        except BaseException:
            self.down()
            raise
        self._up = True
        return self

    def own_process(self, pid: int) -> None:
        """A host process that is part of this lab (an agent, a controller): if the lab's
        owner dies without teardown, a sweep kills it. Pods' processes need no call."""
        value = lab.owner.process_value(pid)
        if value is not None:  # else it has ended already: nothing to kill later
            self._own("process", value)

    def own_pin_dir(self, path: Path) -> None:
        """A bpffs pin dir made for this lab (call before the programs are loaded into it):
        a sweep uninstalls it, removing only kvroute's pins."""
        self._own("pin_dir", str(path))

    def own_cgroup(self, group: lab.cgroup.Cgroup) -> None:
        """A cgroup made for this lab: a sweep removes it (and kills what is in it)."""
        self._own("cgroup", str(group.path))

    def _own(self, kind: lab.owner.Kind, value: str) -> None:
        if self._record is None:
            raise LabError("the lab is not up; only a lab that is up owns things")
        self._record.add(kind, value)
        self._store.save(self._record)

    def _claim(self) -> None:
        """Pick the subnet (or check the one given) and write the owner record, under the
        allocation lock: two labs starting at once never share a subnet or a name."""
        with self._store.allocation():
            records = self._store.load_all()
            used = _host_networks() + [
                (ipaddress.IPv4Network(r.subnet), f"lab {r.names}") for r in records]
            clash = next((u for u in used if u[0].overlaps(self.subnet)), None)
            if clash is not None and self._auto_subnet:
                free = lab.owner.pick_subnet([net for net, _ in used])
                if free is None:
                    raise LabError("no free subnet for a lab in 10.77.100.0-10.77.249.0; "
                                   "run `kvroute lab clean` to remove dead labs")
                self.subnet, clash = free, None
            if clash is not None:
                raise LabError(f"subnet {self.subnet} overlaps {clash[0]} on {clash[1]}; "
                               "give each lab its own subnet (or run `kvroute lab clean`)")
            start = lab.owner.process_start(os.getpid())
            assert start is not None  # this process runs
            record = lab.owner.Record(names=self.names, subnet=str(self.subnet),
                                      owner_pid=os.getpid(), owner_start=start)
            try:
                self._store.create(record)
            except lab.owner.RecordError as e:
                raise LabError(f"{e}; give the lab another prefix") from None
        self._record = record

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
            # The record stays: once this process is gone, a sweep retries what is left.
            raise LabError("lab teardown left things behind: " + "; ".join(failures))
        if self._record is not None:
            self._store.remove(self._record)
            self._record = None

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

    def _make_bridge(self) -> None:
        self._own("link", self.bridge)
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
        self._own("netns", netns)
        pyroute2.netns.create(netns)

        def drop_netns() -> None:
            _kill_netns_processes([netns])
            _remove_netns(netns)

        undo.push(f"netns {netns}", drop_netns)
        self._own("link", veth)
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
            try:
                # No duplicate address detection: the address is usable at once, and the
                # lab's addresses are unique by construction.
                ns.addr("add", index=eth0, address=str(ipv6_of(address)),
                        prefixlen=IPV6_PREFIX.prefixlen, flags=_IFA_F_NODAD)
            except pyroute2.netlink.exceptions.NetlinkError as e:
                # IPv6 disabled on this host: the lab still serves IPv4.
                log.warning("no IPv6 address for %s: %s", netns, e)
            ns.link("set", index=eth0, state="up")
            # No default route on purpose: a lab namespace reaches its subnet and nothing
            # else, so a connect() the programs leave alone (an unrouted VIP, say) fails
            # at once with ENETUNREACH instead of leaving the machine through the host.


@dataclass
class SweepReport:
    """What :func:`sweep` removed, what it left alone, and what it could not remove."""

    labs: list[str] = field(default_factory=list)  # "kvrT (owner pid N gone)"
    processes: list[str] = field(default_factory=list)
    pin_dirs: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)
    cgroups: list[str] = field(default_factory=list)
    live: list[str] = field(default_factory=list)  # labs left alone: their owner runs
    unowned: list[str] = field(default_factory=list)  # kvr* objects no record names
    failures: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """What was removed (and what could not be), one line each, for people."""
        removed = [("lab", self.labs), ("process", self.processes), ("pins", self.pin_dirs),
                   ("link", self.links), ("namespace", self.namespaces),
                   ("cgroup", self.cgroups)]
        return [f"removed {what} {name}" for what, names in removed for name in names] + \
            [f"could not remove: {failure}" for failure in self.failures]

    def notes(self) -> list[str]:
        """What was left alone, and how to remove it anyway."""
        return [f"left alone: live lab {name}; --all removes it" for name in self.live] + \
            [f"left alone: {name}, named like a lab's but in no lab's record (another "
             "tool's, or an older kvroute's); --all removes it" for name in self.unowned]


def sweep(*, include_live: bool = False, unowned: bool = False, only: str | None = None,
          store: lab.owner.Store | None = None) -> SweepReport:
    """Remove what labs whose owner is gone recorded: their host processes, everything in
    their namespaces, pin dirs (kvroute's pins only), links, namespaces and cgroups.

    ``include_live`` removes labs whose owner still runs too; ``unowned`` also removes
    ``kvr*`` namespaces, links and cgroups that no record names (labs of an older kvroute);
    ``only`` restricts the sweep to the lab with those ``names``. By default nothing a live
    lab or another tool made is touched; such objects are listed in the report.
    """
    store = store or lab.owner.Store()
    report = SweepReport()
    # The objects before the records: a lab records each thing before making it, so an
    # object seen here is named by a record read afterwards, unless it is really unowned.
    found = _lab_like_objects()
    records = store.load_all()
    for record in records:
        if only is not None and record.names != only:
            continue
        alive = lab.owner.owner_alive(record)
        if alive and not include_live:
            report.live.append(f"{record.names} (owner pid {record.owner_pid})")
            continue
        with store.claim(record) as mine:
            if mine:
                failed = len(report.failures)
                _sweep_lab(record, found, report, alive)
                if len(report.failures) == failed:  # else the next sweep tries again
                    store.remove(record)
    if only is None:
        recorded = {v for r in records for kind in lab.owner.KINDS for v in r.items(kind)}
        stray = {kind: [n for n in names if n not in recorded] for kind, names in found.items()}
        if unowned:
            _remove(report, stray)
        else:
            report.unowned = [f"{kind} {n}" for kind, names in stray.items() for n in names]
    return report


def _lab_like_objects() -> dict[str, list[str]]:
    """Namespaces, host links and v2 cgroups whose names start like a lab's."""
    pattern = NAME_ROOT + "*"
    with pyroute2.IPRoute() as ipr:
        links = [str(msg.get("IFLA_IFNAME")) for msg in ipr.get_links()]
    root = dataplane.host.cgroup2_root()
    return {
        "netns": [n for n in pyroute2.netns.listnetns() if fnmatch.fnmatchcase(n, pattern)],
        # veths before bridges, so no veth is briefly enslaved to nothing while we work.
        "link": sorted((n for n in links if fnmatch.fnmatchcase(n, pattern)),
                       key=lambda n: n.endswith("br")),
        "cgroup": [str(p) for p in sorted(root.iterdir())
                   if p.is_dir() and fnmatch.fnmatchcase(p.name, pattern)],
    }


def _sweep_lab(record: lab.owner.Record, found: dict[str, list[str]], report: SweepReport,
               alive: bool) -> None:
    for value in record.items("process"):
        pid = lab.owner.is_running(value)
        if pid is not None:
            _attempt(report, report.processes, str(pid),
                     functools.partial(os.kill, pid, signal.SIGKILL))
    for pin_dir in record.items("pin_dir"):
        if Path(pin_dir).exists():
            _attempt(report, report.pin_dirs, pin_dir,
                     functools.partial(dataplane.loader.uninstall, Path(pin_dir)))
    # Newest first, as the lab's own teardown would: veths before their bridge.
    _remove(report, {
        "netns": [n for n in reversed(record.items("netns")) if n in found["netns"]],
        "link": [n for n in reversed(record.items("link")) if n in found["link"]],
        "cgroup": [p for p in reversed(record.items("cgroup")) if Path(p).exists()],
    })
    state = "still running" if alive else "gone"
    report.labs.append(f"{record.names} (owner pid {record.owner_pid} {state})")


def _remove(report: SweepReport, objects: dict[str, list[str]]) -> None:
    """Remove namespaces (and what runs in them), links and cgroups, in that order."""
    if objects["netns"]:
        report.processes.extend(f"{pid} (in netns)"
                                for pid in _kill_netns_processes(objects["netns"]))
    for name in objects["link"]:
        _attempt(report, report.links, name, functools.partial(_delete_link, name))
    for name in objects["netns"]:
        _attempt(report, report.namespaces, name, functools.partial(pyroute2.netns.remove, name))
    for path in objects["cgroup"]:
        _attempt(report, report.cgroups, path, lab.cgroup.Cgroup(Path(path)).remove)


def _attempt(report: SweepReport, bucket: list[str], what: str, step: Callable[[], Any]) -> None:
    try:
        step()
        bucket.append(what)
    except Exception as e:
        if not _is_gone(e):
            report.failures.append(f"{what}: {e!r}")
