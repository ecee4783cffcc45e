"""`kvroute check-config` on UDP, IPv6 and dual-stack services (no kernel involved)."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from dataplane import cli

GOOD = """\
services:
  - name: kube-dns
    vip: 10.96.0.53
    vip6: fd00:96::35
    port: 53
    protocol: udp
    backends:
      - {address: 10.244.1.9, address6: "fd00:244:1::9", port: 53}
  - name: web6
    vip: fd00:96::80
    port: 80
    backends:
      - {address: "fd00:244:1::7", port: 8000}
"""


def test_counts_udp_dual_stack_and_ipv6_services(tmp_path: Path) -> None:
    path = tmp_path / "kvroute.yaml"
    path.write_text(GOOD)
    result = CliRunner().invoke(cli.main, ["check-config", str(path)])
    assert result.exit_code == 0, result.output
    assert "ok (2 services, 2 backends; 1 udp, 1 dual-stack, 1 IPv6-only)" in result.output


def test_a_dual_stack_backend_without_ipv6_is_named(tmp_path: Path) -> None:
    path = tmp_path / "kvroute.yaml"
    path.write_text(GOOD.replace(', address6: "fd00:244:1::9"', ""))
    result = CliRunner().invoke(cli.main, ["check-config", str(path)])
    assert result.exit_code != 0
    assert ("services[0].backends[10.244.1.9:53]: the service has an IPv6 VIP, the backend "
            "has no IPv6 address (address6)") in result.output
