"""Kernel tests: the real programs, compiled once per session, attached to the
cgroup of a lab made for the session (never the root cgroup), with pods in
network namespaces serving their own names."""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dataplane import apply, loader, model
from dataplane.maps import MapSet
from dataplane.settings import Settings

POD_PORT = 8000
N_PODS = 6


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("kernel tests need root (eBPF, cgroups, network namespaces)")


@contextlib.contextmanager
def private_bpffs(folder: Path) -> Iterator[Path]:
    """A bpffs instance of its own mounted on ``folder`` (every mount is a new, empty
    instance): pins made there are nobody else's, and go with the unmount."""
    if os.geteuid() != 0:
        pytest.skip("bpffs tests need root")
    folder.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "bpf", "bpf", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.fixture(scope="session")
def lab() -> Iterator[Any]:
    _require_root()
    from lab import netns, podserver
    try:
        lb = netns.Lab().up()
    except netns.LabUnsupported as exc:
        pytest.skip(f"this kernel cannot build the lab: {exc}")
    try:
        for i in range(N_PODS):
            pod = lb.add_pod(f"gpu{i}")
            pod.spawn([sys.executable, "-m", "lab.podserver", "--name", pod.name,
                       "--port", str(POD_PORT)])
        lb.add_pod("dead")  # no server: connects to it are refused
        lb.add_client("client")
        for pod in lb.pods.values():
            if pod.name != "dead":
                podserver.wait_listening(pod, POD_PORT)
        yield lb
    finally:
        lb.down()


class Node:
    """One compiled datapath on the lab's client cgroup, plus an apply helper."""

    def __init__(self, lab: Any, settings: Settings, datapath: loader.Datapath) -> None:
        self.lab = lab
        self.settings = settings
        self.datapath = datapath
        self.maps = MapSet(settings.pin_dir)
        self.applier = apply.Applier(self.maps, settings.hash_seed)
        self.client = lab.clients["client"]

    def apply(self, services: list[dict[str, Any]]) -> apply.ApplyResult:
        return self.applier.apply(model.desired_from_dict({"services": services}))

    def pod(self, name: str) -> Any:
        return self.lab.pods[name]

    def backend(self, name: str, **kw: Any) -> dict[str, Any]:
        return {"address": str(self.pod(name).address), "port": POD_PORT, **kw}

    def refused(self, name: str) -> str:
        """The errno name a program's refusal reaches the caller with on this kernel: ``name``
        where bpf_set_retval exists (5.18), EPERM before it (dataplane/features.py)."""
        return name if self.datapath.plan.set_retval else "EPERM"

    def run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run fn inside the client namespace and the attached cgroup."""
        return self.client.call(fn, *args, cgroup=self.lab.cgroup, timeout=300, **kwargs)


@pytest.fixture(scope="session")
def node(lab: Any) -> Iterator[Node]:
    pin_dir = Path(f"/sys/fs/bpf/kvrtest-{secrets.token_hex(3)}")
    lab.own_pin_dir(pin_dir)  # removed by the next session's sweep if this one is killed
    settings = Settings(pin_dir=pin_dir, fail_k=3)
    try:
        datapath = loader.Datapath(settings)
    except loader.LoadError as exc:
        pytest.fail(f"the programs do not load: {exc}")
    try:
        datapath.attach(lab.cgroup.path)
        n = Node(lab, settings, datapath)
        yield n
        n.applier.close()
        n.maps.close()
    finally:
        datapath.close()
        loader.uninstall(pin_dir)


@pytest.fixture
def kv(node: Node) -> Iterator[Node]:
    """The session's node with no services; whatever a test applies is removed after it."""
    node.apply([])
    yield node
    node.apply([])


# -- client-side workloads (run inside the client namespace via Node.run) -----------------

def connect_names(vip: str, port: int, count: int, sessions: list[str] | None = None,
                  sock_timeout: float = 2.0) -> list[str]:
    """Connect `count` times (or once per session, tagged); return the pod that answered,
    or 'error:<errno name>'."""
    from dataplane import client
    from lab import podserver
    out = []
    keys = sessions if sessions is not None else [None] * count
    for session in keys:
        s = socket.socket()
        s.settimeout(sock_timeout)
        try:
            if session is not None:
                client.tag_session(s, session)
            s.connect((vip, port))
            out.append(podserver.ask_on(s))
        except OSError as exc:
            out.append(f"error:{errno_name(exc)}")
        finally:
            s.close()
    return out


def errno_name(exc: OSError) -> str:
    import errno
    return errno.errorcode.get(exc.errno or 0, str(exc))
