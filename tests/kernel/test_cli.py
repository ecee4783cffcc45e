"""`kvroute maps` and `kvroute explain` as people run them: a separate process
reading the pinned maps, tables for people, JSON for machines, clear errors."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from dataplane import bpfsys, cli, client
from tests.kernel.conftest import Node, connect_names
from tests.kernel.test_sock_lb import VIP, svc

KVROUTE = str(Path(sys.executable).parent / "kvroute")
NOBODY = 65534


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([KVROUTE, *args], capture_output=True, text=True, timeout=60)


def test_maps_and_explain_read_the_pinned_maps(kv: Node) -> None:
    kv.apply([svc("cli", VIP, [kv.backend("gpu0"), kv.backend("gpu1")], affinity="session")])
    names = kv.run(connect_names, VIP, 80, 0, ["who"])
    pin = ["--pin-dir", str(kv.settings.pin_dir)]
    services = json.loads(_run("maps", "services", "--json", *pin).stdout)
    assert [(s["name"], s["frontend"], s["counters"]["selected"]) for s in services] == \
        [("cli", f"{VIP}:80/tcp", 1)]
    table = _run("maps", "services", *pin).stdout
    assert "cli" in table and f"{VIP}:80/tcp" in table
    assert all(len(line) <= 80 for line in table.splitlines())
    maglev = json.loads(_run("maps", "maglev", "cli", "--json", *pin).stdout)
    assert sum(maglev["slots"].values()) == maglev["table_size"] == len(maglev["table"])
    affinity = json.loads(_run("maps", "affinity", "--json", *pin).stdout)
    assert f"{client.session_hash('who'):016x}" in {a["key"] for a in affinity}
    explained = json.loads(_run("explain", f"{VIP}:80", "--session", "who", "--json",
                                *pin).stdout)
    assert explained["backend"] == f"{kv.pod(names[0]).address}:8000/tcp"
    assert explained["reason"].startswith("affinity hit")
    fresh = json.loads(_run("explain", "cli", "--session", "nobody-yet", "--json", *pin).stdout)
    assert fresh["reason"] == "table owner"
    by_client = _run("explain", f"{VIP}:80", "--client", kv.client.netns, *pin)
    assert by_client.returncode == 0 and "client netns" in by_client.stdout


def test_clear_errors(kv: Node) -> None:
    pin = ["--pin-dir", str(kv.settings.pin_dir)]
    cases = {
        ("maps", "maglev", "no-such-service", *pin): "no service named 'no-such-service'",
        ("explain", "10.96.10.1:99999", "--session", "x", *pin): "port must be between",
        ("explain", "not-an-ip:80", "--session", "x", *pin): "not-an-ip:80",
        ("explain", f"{VIP}:80", *pin): "exactly one of --session",
        ("maps", "services", "--pin-dir", "/sys/fs/bpf/kvr-nothing-here"): "not pinned",
    }
    for args, message in cases.items():
        proc = _run(*args)
        assert proc.returncode != 0, args
        assert message in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
    seen = kv.client.call(_as_nobody, kv.settings.pin_dir, ["maps", "services", *pin])
    assert seen["exit_code"] == 1 and "needs root" in seen["stderr"], seen
    assert seen["exception"] == "SystemExit", seen
    assert seen["open"] in (errno.EPERM, errno.EACCES), seen
    assert seen["unlink"] in (errno.EPERM, errno.EACCES), seen
    assert (kv.settings.pin_dir / "kvr_meta").exists()


def _errno_of(step: Any) -> int:
    try:
        step()
    except OSError as exc:
        return exc.errno or -1
    return 0


def _as_nobody(pin_dir: Path, args: list[str]) -> dict[str, Any]:
    """The CLI as an unprivileged user, in a forked child (lab.run.call) that drops to nobody
    only after the interpreter and kvroute are loaded: executing the venv's `kvroute` as
    nobody fails wherever a folder above the clone is 0700 (/root, mktemp -d), which says
    nothing about kvroute. Then the kernel itself is asked: the maps stay closed to nobody."""
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    result = CliRunner().invoke(cli.main, args)
    meta = pin_dir / "kvr_meta"
    return {
        "exit_code": result.exit_code,
        "stderr": result.stderr,
        "exception": type(result.exception).__name__,
        "open": _errno_of(lambda: os.close(bpfsys.obj_get(meta))),
        "unlink": _errno_of(meta.unlink),
    }


def test_a_bad_cgroup_is_refused_before_anything_is_pinned(tmp_path: Path) -> None:
    cfg = tmp_path / "state.yaml"
    cfg.write_text("services: []\n")
    pin = Path(f"/sys/fs/bpf/kvr-cgcheck-{os.getpid()}")
    for cgroup in (tmp_path / "no-such", tmp_path):  # missing; a folder off cgroup2
        proc = subprocess.run([KVROUTE, "agent", "--config", str(cfg), "--cgroup", str(cgroup),
                               "--pin-dir", str(pin)], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode != 0
        assert f"--cgroup {cgroup}" in proc.stderr and "Traceback" not in proc.stderr
        assert not pin.exists()


def _tagged(host: str, session: str) -> str:
    from tests.kernel.test_udp6 import tcp
    return tcp(host, 80, session)[0]


def test_dual_stack_service_in_maps_and_explain(kv: Node) -> None:
    """Both VIPs on one row; explain gives the same answer through either VIP, and it is
    where an IPv6 connect of a new session lands."""
    vip6 = "fd00:96::c11"
    kv.apply([{**svc("dual", VIP, [{**kv.backend(p), "address6": str(kv.pod(p).address6)}
                                   for p in ("gpu0", "gpu1", "gpu2")], affinity="session"),
               "vip6": vip6}])
    pin = ["--pin-dir", str(kv.settings.pin_dir)]
    services = json.loads(_run("maps", "services", "--json", *pin).stdout)
    assert [s["frontends"] for s in services] == [[f"{VIP}:80/tcp", f"[{vip6}]:80/tcp"]]
    table = _run("maps", "services", *pin).stdout
    assert f"{VIP}:80/tcp" in table and f"[{vip6}]:80/tcp" in table
    backends = json.loads(_run("maps", "backends", "--json", *pin).stdout)
    assert {tuple(b["addresses"]) for b in backends} == {
        (f"{kv.pod(p).address}:8000/tcp", f"[{kv.pod(p).address6}]:8000/tcp")
        for p in ("gpu0", "gpu1", "gpu2")}
    for session in ("a", "b", "c", "d"):
        by4 = json.loads(_run("explain", f"{VIP}:80", "--session", session, "--json",
                              *pin).stdout)
        by6 = json.loads(_run("explain", f"[{vip6}]:80", "--session", session, "--json",
                              *pin).stdout)
        assert by4["backend"] == by6["backend"] and by4["reason"] == "table owner"
        landed = kv.run(_tagged, vip6, session)
        assert by4["backend"] == f"{kv.pod(landed).address}:8000/tcp"
    table = _run("maps", "backends", *pin).stdout
    assert all(a in table for b in backends for a in b["addresses"])
    maglev = _run("maps", "maglev", f"[{vip6}]:80", *pin).stdout
    assert f"[{vip6}]:80/tcp" in maglev or f"{VIP}:80/tcp" in maglev
    assert f"[{kv.pod('gpu0').address6}]" not in maglev  # backends by their first address
    assert f"{kv.pod('gpu0').address}:8000/tcp" in maglev
