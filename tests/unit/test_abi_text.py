"""Endpoint text <-> the kernel's raw (network-order) key fields, in one place."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dataplane import abi


@given(st.ip_addresses(), st.integers(1, 65535), st.sampled_from(["tcp", "udp"]))
def test_round_trip_through_the_kernel_key(addr: abi.IPAddress, port: int, proto: str) -> None:
    if addr.version == 6 and addr.ipv4_mapped is not None:
        return  # the kernel form of IPv4 itself: reads back as the IPv4 address (below)
    key = abi.l4_key(addr, port, proto)
    text = abi.format_endpoint(abi.from_words(key.addr), key.port, key.proto)
    host = str(addr) if addr.version == 4 else f"[{addr}]"
    assert text == f"{host}:{port}/{proto}"
    assert abi.parse_endpoint(text) == (addr, port, proto)


def test_network_order_fields() -> None:
    key = abi.l4_key("10.0.0.1", 8000, "tcp")
    # What the kernel compares: ::ffff:10.0.0.1, then the port in network order.
    assert bytes(key)[:18] == bytes([0] * 10 + [0xFF, 0xFF, 10, 0, 0, 1, 0x1F, 0x40])
    key6 = abi.l4_key("fd00::a", 53, "udp")
    assert bytes(key6)[:19] == bytes([0xFD] + [0] * 14 + [0x0A, 0, 53, 17])


def test_ipv4_and_its_mapped_form_are_one_key() -> None:
    """A dual-stack socket's ::ffff:VIP finds the IPv4 service."""
    assert bytes(abi.l4_key("10.0.0.1", 80, "tcp")) == bytes(
        abi.l4_key(ipaddress.IPv6Address("::ffff:10.0.0.1"), 80, "tcp"))
    assert abi.ip_of(abi.addr128("::ffff:10.0.0.1")) == ipaddress.IPv4Address("10.0.0.1")


@pytest.mark.parametrize(("text", "message"), [
    ("10.0.0.1", "expected ADDRESS:PORT"),
    ("10.0.0.1:80/sctp", "expected ADDRESS:PORT"),
    ("10.0.0.300:80", "10.0.0.300"),
    ("10.0.0.1:0", "port must be between"),
    ("10.0.0.1:http", "invalid literal"),
    ("fd00::1:53", "fd00::1"),  # IPv6 needs brackets
    ("[fd00::g]:53/udp", "fd00::g"),
])
def test_bad_text_is_named(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        abi.parse_endpoint(text)
