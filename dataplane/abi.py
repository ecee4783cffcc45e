"""Python view of bpf/lib/abi.h.

The agent and the CLI read and write the pinned maps through these ctypes
mirrors, so that inspecting a node needs neither a compiler nor kernel headers.
Each class names the C struct it must match; tests/kernel/test_abi.py compares
every field (name, offset, size) with the types bcc derives from the C source.
Byte order is converted here and nowhere else.
"""

from __future__ import annotations

import ctypes as ct
import enum
import ipaddress
import socket
import struct

SOL_KVROUTE = 0x6B76
KVROUTE_SESSION = 1
EPS_OFF = 0xFFFF
SVC_F_SATURATED = 1 << 0
SVC_F_FLEET = 1 << 1  # bindings are fleet-wide: announced on kvr_events, expired by the controller
HEALTH_TRIPPED = 1 << 0
NO_BACKEND = 0xFFFFFFFF
PROG_PICK = 0  # KVR_PROG_PICK: slot of sock4_pick in kvr_progs

IPPROTO = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}
PROTO_NAME = {v: k for k, v in IPPROTO.items()}


class Affinity(enum.IntEnum):
    """enum kvr_affinity"""

    NONE = 0
    CLIENT = 1
    SESSION = 2


class BackendState(enum.IntEnum):
    """enum kvr_be_state"""

    ACTIVE = 0
    DRAINING = 1
    OPEN = 2
    PROBING = 3


class SvcCounter(enum.IntEnum):
    """enum kvr_svc_cnt"""

    SELECTED = 0
    AFF_HIT = 1
    AFF_MISS = 2
    SPILLED = 3
    NO_BACKEND = 4
    UNTAGGED = 5
    MOVED = 6
    SATURATED = 7
    MOVED_LOAD = 8


class BeCounter(enum.IntEnum):
    """enum kvr_be_cnt"""

    SELECTED = 0
    CONNECTS = 1
    FAILED = 2
    ESTABLISHED = 3
    CLOSED = 4
    TRIPS = 5


class Reason(enum.IntEnum):
    """enum kvr_reason"""

    NO_TABLE = 0
    NO_SK_STORAGE = 1
    BAD_SOCKOPT = 2
    TAGGED = 3
    REVERSED = 4
    EV_LOST = 5
    NO_PICK = 6
    HANDOVER = 7


class EventKind(enum.IntEnum):
    """enum kvr_event_kind"""

    BIND = 1
    TOUCH = 2


EV_BIND = int(EventKind.BIND)
EV_TOUCH = int(EventKind.TOUCH)


class L4Key(ct.Structure):
    """struct kvr_l4_key"""

    _fields_ = [("addr", ct.c_uint32), ("port", ct.c_uint16), ("proto", ct.c_uint8),
                ("pad", ct.c_uint8)]


class Svc(ct.Structure):
    """struct kvr_svc"""

    _fields_ = [("id", ct.c_uint32), ("table_size", ct.c_uint32), ("tbl_group", ct.c_uint32),
                ("tbl_base", ct.c_uint32), ("aff_timeout", ct.c_uint32),
                ("eps_milli", ct.c_uint16), ("probe_milli", ct.c_uint16),
                ("affinity", ct.c_uint8), ("flags", ct.c_uint8), ("n_backends", ct.c_uint16),
                ("move_eps_milli", ct.c_uint16), ("pad", ct.c_uint16), ("revision", ct.c_uint64)]


class SvcName(ct.Structure):
    """struct kvr_svc_name"""

    _fields_ = [("name", ct.c_char * 64)]


class Backend(ct.Structure):
    """struct kvr_backend"""

    _fields_ = [("addr", ct.c_uint32), ("port", ct.c_uint16), ("proto", ct.c_uint8),
                ("state", ct.c_uint8)]


class MemberKey(ct.Structure):
    """struct kvr_member_key"""

    _fields_ = [("svc_id", ct.c_uint32), ("be_id", ct.c_uint32)]


class Health(ct.Structure):
    """struct kvr_health"""

    _fields_ = [("consec_fail", ct.c_uint32), ("flags", ct.c_uint32), ("srtt_us", ct.c_uint32),
                ("pad", ct.c_uint32), ("tripped_ns", ct.c_uint64)]


class AffKey(ct.Structure):
    """struct kvr_aff_key"""

    _fields_ = [("svc_id", ct.c_uint32), ("pad", ct.c_uint32), ("key", ct.c_uint64)]


class AffVal(ct.Structure):
    """struct kvr_aff_val"""

    _fields_ = [("be_id", ct.c_uint32), ("reported_s", ct.c_uint32), ("last_ns", ct.c_uint64)]


class SkState(ct.Structure):
    """struct kvr_sk"""

    _fields_ = [("session", ct.c_uint64)]


class Sock(ct.Structure):
    """struct kvr_sock"""

    _fields_ = [("vip", ct.c_uint32), ("vport", ct.c_uint16), ("pad", ct.c_uint16),
                ("be_id", ct.c_uint32), ("pad2", ct.c_uint32)]


class Event(ct.Structure):
    """struct kvr_event: one record on the kvr_events ring."""

    _fields_ = [("kind", ct.c_uint8), ("pad", ct.c_uint8 * 3), ("svc_id", ct.c_uint32),
                ("be_id", ct.c_uint32), ("prev_be_id", ct.c_uint32), ("key", ct.c_uint64)]


class Scratch(ct.Structure):
    """struct kvr_scratch (programs only; mirrored for the layout test)"""

    _fields_ = [("cookie", ct.c_uint64), ("key", ct.c_uint64), ("now", ct.c_uint64),
                ("prev", ct.c_uint32), ("avoid", ct.c_uint32)]


class SvcCounters(ct.Structure):
    """struct kvr_svc_cnt_val"""

    _fields_ = [("c", ct.c_uint64 * len(SvcCounter))]


class BeCounters(ct.Structure):
    """struct kvr_be_cnt_val"""

    _fields_ = [("c", ct.c_uint64 * len(BeCounter))]


# The one place where addresses and ports change byte order. The kernel keeps
# both in network order; ctypes reads the fields as native integers.
def ip_to_be32(addr: ipaddress.IPv4Address | str) -> int:
    value: int = struct.unpack("=I", ipaddress.IPv4Address(addr).packed)[0]
    return value


def be32_to_ip(value: int) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(struct.pack("=I", value))


def port_to_be16(port: int) -> int:
    return socket.htons(port)


def be16_to_port(value: int) -> int:
    return socket.ntohs(value)


def parse_endpoint(text: str) -> tuple[ipaddress.IPv4Address, int, str]:
    """'10.96.0.10:8000' or '10.96.0.10:8000/udp' -> (address, port, protocol); a
    ValueError names what is wrong. Backend identities use the same form."""
    body, _, proto = text.partition("/")
    proto = proto or "tcp"
    host, sep, port_s = body.rpartition(":")
    if not sep or proto not in IPPROTO:
        raise ValueError(f"{text!r}: expected ADDRESS:PORT or ADDRESS:PORT/tcp|udp")
    try:
        addr = ipaddress.IPv4Address(host)
        port = int(port_s)
    except ValueError as exc:
        raise ValueError(f"{text!r}: {exc}") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"{text!r}: port must be between 1 and 65535")
    return addr, port, proto


def format_endpoint(addr: int, port: int, proto: int) -> str:
    """Raw (network-order) key fields -> 'ADDRESS:PORT/proto', parse_endpoint's form."""
    return f"{be32_to_ip(addr)}:{be16_to_port(port)}/{PROTO_NAME.get(proto, str(proto))}"


def l4_key(addr: ipaddress.IPv4Address | str, port: int, proto: str) -> L4Key:
    return L4Key(addr=ip_to_be32(addr), port=port_to_be16(port), proto=IPPROTO[proto], pad=0)


class Meta(ct.Structure):
    """struct kvr_meta"""

    _fields_ = [("hash_seed", ct.c_uint64), ("fail_k", ct.c_uint32), ("candidates", ct.c_uint32),
                ("abi_version", ct.c_uint32), ("pad", ct.c_uint32)]


ABI_VERSION = 2


# -- packet path (bpf/lib/abi.h, "Packet path (tc)") --------------------------------------

NP_F_LOCAL = 1 << 0  # externalTrafficPolicy: Local
NP_F_NODEPORT = 1 << 1  # a NodePort frontend: key address 0, any node address
NP_LOCAL_MAX = 32  # KVR_NP_LOCAL_MAX: local backends of one service on one node
CT_ORIG, CT_REPLY = 0, 1
CT_F_SRC = 1 << 0
CT_F_DST = 1 << 1
CT_F_SEEN_REPLY = 1 << 2
CT_F_FIN = 1 << 3
CT_F_CLOSING = 1 << 4
# Slots of kvr_np_progs: the stages of a new flow (KVR_NP_PROG_*).
NP_PROG_NEW, NP_PROG_PICK, NP_PROG_NAT, NP_PROG_LOCAL = 0, 1, 2, 3


class NpCounter(enum.IntEnum):
    """enum kvr_np_cnt"""

    NEW = 0
    FWD = 1
    REV = 2
    SNAT = 3
    LOCAL = 4
    NO_BACKEND = 5
    CLOSED = 6
    MIDFLOW = 7
    AFF_HIT = 8


class NpReason(enum.IntEnum):
    """enum kvr_np_reason"""

    NOT_IP = 0
    MALFORMED = 1
    TRUNCATED = 2
    FRAGMENT = 3
    NO_SERVICE = 4
    NO_SNAT_ADDR = 5
    NO_SNAT_PORT = 6
    CT_FULL = 7
    REWRITE = 8
    EXPIRED = 9
    NO_PROG = 10
    NO_ROUTE = 11


class NpFrontend(ct.Structure):
    """struct kvr_np_fe"""

    _fields_ = [("svc", L4Key), ("flags", ct.c_uint32), ("pad", ct.c_uint32)]


class NpLocal(ct.Structure):
    """struct kvr_np_local"""

    _fields_ = [("n", ct.c_uint32), ("pad", ct.c_uint32),
                ("be_id", ct.c_uint32 * NP_LOCAL_MAX)]


class NpConfig(ct.Structure):
    """struct kvr_np_cfg"""

    _fields_ = [("snat_addr", ct.c_uint32), ("snat_min", ct.c_uint16),
                ("snat_max", ct.c_uint16)]


class CtKey(ct.Structure):
    """struct kvr_ct_key"""

    _fields_ = [("saddr", ct.c_uint32 * 4), ("daddr", ct.c_uint32 * 4),
                ("sport", ct.c_uint16), ("dport", ct.c_uint16), ("proto", ct.c_uint8),
                ("family", ct.c_uint8), ("dir", ct.c_uint8), ("pad", ct.c_uint8)]


class Ct(ct.Structure):
    """struct kvr_ct"""

    _fields_ = [("nat_saddr", ct.c_uint32 * 4), ("nat_daddr", ct.c_uint32 * 4),
                ("nat_sport", ct.c_uint16), ("nat_dport", ct.c_uint16),
                ("flags", ct.c_uint32), ("svc_id", ct.c_uint32), ("be_id", ct.c_uint32),
                ("lifetime_s", ct.c_uint32), ("pad", ct.c_uint32),
                ("created_ns", ct.c_uint64), ("last_ns", ct.c_uint64),
                ("packets", ct.c_uint64)]


class NpCounters(ct.Structure):
    """struct kvr_np_cnt_val"""

    _fields_ = [("c", ct.c_uint64 * len(NpCounter))]

# Every ctypes mirror with the C struct name bcc reports for it.
MIRRORS: dict[str, type[ct.Structure]] = {
    "kvr_l4_key": L4Key, "kvr_svc": Svc, "kvr_svc_name": SvcName, "kvr_backend": Backend,
    "kvr_member_key": MemberKey, "kvr_health": Health, "kvr_aff_key": AffKey,
    "kvr_aff_val": AffVal, "kvr_sk": SkState, "kvr_sock": Sock, "kvr_svc_cnt_val": SvcCounters,
    "kvr_be_cnt_val": BeCounters, "kvr_meta": Meta, "kvr_event": Event,
    "kvr_scratch": Scratch, "kvr_np_fe": NpFrontend, "kvr_np_local": NpLocal,
    "kvr_np_cfg": NpConfig, "kvr_ct_key": CtKey, "kvr_ct": Ct, "kvr_np_cnt_val": NpCounters,
}
