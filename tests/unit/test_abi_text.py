"""Endpoint text <-> the kernel's raw (network-order) key fields, in one place."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dataplane import abi


@given(st.ip_addresses(v=4), st.integers(1, 65535), st.sampled_from(["tcp", "udp"]))
def test_round_trip_through_the_kernel_key(addr: ipaddress.IPv4Address, port: int,
                                           proto: str) -> None:
    key = abi.l4_key(addr, port, proto)
    text = abi.format_endpoint(key.addr, key.port, key.proto)
    assert text == f"{addr}:{port}/{proto}"
    assert abi.parse_endpoint(text) == (addr, port, proto)


def test_network_order_fields() -> None:
    key = abi.l4_key("10.0.0.1", 8000, "tcp")
    assert bytes(key)[:6] == bytes([10, 0, 0, 1, 0x1F, 0x40])  # what the kernel compares


@pytest.mark.parametrize(("text", "message"), [
    ("10.0.0.1", "expected ADDRESS:PORT"),
    ("10.0.0.1:80/sctp", "expected ADDRESS:PORT"),
    ("10.0.0.300:80", "10.0.0.300"),
    ("10.0.0.1:0", "port must be between"),
    ("10.0.0.1:http", "invalid literal"),
])
def test_bad_text_is_named(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        abi.parse_endpoint(text)
