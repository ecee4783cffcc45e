"""The ctypes mirrors in dataplane/abi.py against the types bcc derives from
bpf/lib/abi.h: every field's name, offset and size."""

from __future__ import annotations

import ctypes as ct
from typing import Any

import pytest

from dataplane import abi, hashing
from tests.kernel.conftest import Node

# map name -> (key mirror, value mirror)
MAP_TYPES: dict[str, tuple[Any, Any]] = {
    "kvr_svc_v2": (abi.L4Key, abi.Svc),
    "kvr_svc_name": (ct.c_uint32, abi.SvcName),
    "kvr_be_v2": (ct.c_uint32, abi.Backend),
    "kvr_member": (abi.MemberKey, ct.c_uint32),
    "kvr_health": (ct.c_uint32, abi.Health),
    "kvr_affinity": (abi.AffKey, abi.AffVal),
    "kvr_sock_v2": (ct.c_uint64, abi.Sock),
    "kvr_udp_v1": (ct.c_uint64, abi.Udp),
    "kvr_udp_tmpl": (ct.c_uint32, abi.Udp),
    "kvr_svc_cnt_v3": (ct.c_uint32, abi.SvcCounters),
    "kvr_be_cnt": (ct.c_uint32, abi.BeCounters),
    "kvr_meta": (ct.c_uint32, abi.Meta),
    "kvr_be_sess": (ct.c_uint32, ct.c_uint32),
    "kvr_scratch": (ct.c_uint32, abi.Scratch),
}


def _layout(t: Any) -> list[tuple[str, int, int]] | int:
    if not hasattr(t, "_fields_"):
        return ct.sizeof(t)
    return [(name, getattr(t, name).offset, getattr(t, name).size) for name, *_ in t._fields_]


@pytest.mark.parametrize("name", sorted(MAP_TYPES))
def test_mirror_matches_bcc(node: Node, name: str) -> None:
    table = node.datapath.bpf[name]
    key_t, leaf_t = MAP_TYPES[name]
    leaf = getattr(table, "sLeaf", table.Leaf)  # per-CPU tables: one CPU's value
    assert _layout(table.Key) == _layout(key_t)
    assert _layout(leaf) == _layout(leaf_t)
    assert ct.sizeof(table.Key) == ct.sizeof(key_t)
    assert ct.sizeof(leaf) == ct.sizeof(leaf_t)


def test_udp_flow_mirror_matches_bcc(node: Node) -> None:
    """The flows nested in struct kvr_udp, field by field."""
    flow = node.datapath.bpf["kvr_udp_v1"].Leaf._fields_[0][1]._type_
    assert _layout(flow) == _layout(abi.UdpFlow)


def test_every_pinned_map_is_known(node: Node) -> None:
    from dataplane import maps
    pinned = {p.name for p in node.settings.pin_dir.iterdir() if p.is_file()}
    assert pinned == set(maps.PINNED_MAPS)


def test_meta_records_the_build_options(node: Node) -> None:
    meta = node.maps.meta()
    assert meta.hash_seed == node.settings.hash_seed == hashing.DEFAULT_SEED
    assert meta.fail_k == node.settings.fail_k
    assert meta.abi_version == abi.ABI_VERSION
