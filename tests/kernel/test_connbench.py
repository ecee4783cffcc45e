"""The connect bench's C client, compiled here and run in a lab client namespace: direct
connects, and through kube-proxy's rule shapes loaded in a namespace of the test's own."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from lab import connbench
from tests.kernel.conftest import POD_PORT


@pytest.fixture(scope="module")
def binary() -> Path:
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler (cc) on PATH: apt-get install -y gcc")
    return connbench.build()


def _run(pod: Any, argv: list[str]) -> connbench.Result:
    proc = pod.spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()
    return connbench.parse(out.decode())


def test_100_direct_connects_from_a_lab_client(lab: Any, binary: Path) -> None:
    client, pod = lab.clients["client"], lab.pods["gpu0"]
    got = _run(client, connbench.connect_argv(binary, str(pod.address), POD_PORT, 100, 5))
    assert (got.n, got.ok, got.errors) == (100, 100, 0)
    assert 0 < got.min_ns <= got.p50_ns <= got.p90_ns <= got.p99_ns <= got.max_ns
    assert got.rate > 0


def test_a_refused_connect_is_reported_not_timed(lab: Any, binary: Path) -> None:
    client, dead = lab.clients["client"], lab.pods["dead"]
    argv = connbench.connect_argv(binary, str(dead.address), POD_PORT, 3)
    proc = client.spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1
    with pytest.raises(ValueError, match="errno 111"):
        connbench.parse(out.decode())


@pytest.mark.parametrize("kind", ["iptables-nft", "nftables"])
def test_kube_proxy_shapes_load_and_dnat_the_vip(lab: Any, binary: Path, kind: str,
                                                 tmp_path: Path) -> None:
    from lab import bench_connect
    tool = bench_connect.rule_argv(kind, tmp_path / "rules")[0]
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed (apt-get install -y iptables nftables)")
    client = lab.add_client(f"cb{kind[:3]}{len(lab.clients)}")
    bench_connect.route_vips(client.netns)
    pods = [lab.pods[f"gpu{i}"] for i in range(3)]
    svcs = [connbench.Svc(f"t/s{i}", f"10.100.0.{i + 1}", 80, (("10.200.0.1", 8000),))
            for i in range(2)]
    svcs.append(connbench.Svc("t/measured", "10.96.0.1", 80,
                              tuple((str(p.address), POD_PORT) for p in pods)))
    path = tmp_path / "rules"
    path.write_text(bench_connect.rule_file(kind, svcs))
    took, err = bench_connect.run_tool(client.netns, bench_connect.rule_argv(kind, path))
    assert err is None and took > 0
    got = _run(client, connbench.connect_argv(binary, "10.96.0.1", 80, 30))
    assert (got.ok, got.errors) == (30, 0)
