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
PROG_PICK = 0  # KVR_PROG_PICK: slot of the pick program in each kvr_pick_* array
UDP_FLOWS = 4  # KVR_UDP_FLOWS: VIPs one UDP socket keeps flows to at once

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
    DGRAMS = 9
    REPLIES = 10


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
    NO_FAMILY = 8
    UDP_NEW = 9
    UDP_FREED = 10
    UDP_RECYCLED = 11


class EventKind(enum.IntEnum):
    """enum kvr_event_kind"""

    BIND = 1
    TOUCH = 2


EV_BIND = int(EventKind.BIND)
EV_TOUCH = int(EventKind.TOUCH)


class L4Key(ct.Structure):
    """struct kvr_l4_key"""

    _fields_ = [("addr", ct.c_uint32 * 4), ("port", ct.c_uint16), ("proto", ct.c_uint8),
                ("pad", ct.c_uint8)]


class Svc(ct.Structure):
    """struct kvr_svc"""

    _fields_ = [("id", ct.c_uint32), ("table_size", ct.c_uint32), ("tbl_group", ct.c_uint32),
                ("tbl_base", ct.c_uint32), ("aff_timeout", ct.c_uint32),
                ("eps_milli", ct.c_uint16), ("probe_milli", ct.c_uint16),
                ("affinity", ct.c_uint8), ("flags", ct.c_uint8), ("n_backends", ct.c_uint16),
                ("move_eps_milli", ct.c_uint16), ("pad", ct.c_uint16), ("revision", ct.c_uint64),
                ("ident", ct.c_uint64)]


class SvcName(ct.Structure):
    """struct kvr_svc_name"""

    _fields_ = [("name", ct.c_char * 64)]


class Backend(ct.Structure):
    """struct kvr_backend"""

    _fields_ = [("addr4", ct.c_uint32), ("addr6", ct.c_uint32 * 4), ("port", ct.c_uint16),
                ("proto", ct.c_uint8), ("state", ct.c_uint8)]


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

    _fields_ = [("vip", ct.c_uint32 * 4), ("vport", ct.c_uint16), ("pad", ct.c_uint16),
                ("be_id", ct.c_uint32)]


class UdpFlow(ct.Structure):
    """struct kvr_udp_flow"""

    _fields_ = [("vip", ct.c_uint32 * 4), ("be_addr", ct.c_uint32 * 4), ("vport", ct.c_uint16),
                ("be_port", ct.c_uint16), ("be_id", ct.c_uint32), ("svc_id", ct.c_uint32),
                ("pad", ct.c_uint32)]


class Udp(ct.Structure):
    """struct kvr_udp"""

    _fields_ = [("flow", UdpFlow * UDP_FLOWS), ("next", ct.c_uint32), ("pad", ct.c_uint32)]


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


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# Addresses of either family are one 128-bit integer here, IPv4 as its IPv4-mapped IPv6
# address (::ffff:a.b.c.d), the form the kernel maps hold (bpf/lib/abi.h).
V4MAPPED = 0xFFFF << 32
_V4MAPPED_MASK = ((1 << 96) - 1) << 32
_WORDS = struct.Struct("=4I")


def addr128(addr: IPAddress | str) -> int:
    """An address of either family as the maps' 128-bit form."""
    ip = ipaddress.ip_address(addr)
    return V4MAPPED | int(ip) if ip.version == 4 else int(ip)


def ip_of(value: int) -> IPAddress:
    """The maps' 128-bit form -> the address, IPv4 for an IPv4-mapped one."""
    if value & _V4MAPPED_MASK == V4MAPPED:
        return ipaddress.IPv4Address(value & 0xFFFFFFFF)
    return ipaddress.IPv6Address(value)


def to_words(value: int) -> tuple[int, int, int, int]:
    """128-bit address -> the four __be32 words as ctypes reads them natively."""
    words: tuple[int, int, int, int] = _WORDS.unpack(value.to_bytes(16, "big"))
    return words


def from_words(words: ct.Array[ct.c_uint32] | tuple[int, ...]) -> int:
    return int.from_bytes(_WORDS.pack(*words), "big")


def parse_endpoint(text: str) -> tuple[IPAddress, int, str]:
    """'10.96.0.10:8000', '10.96.0.10:8000/udp' or '[fd00::a]:53/udp' -> (address, port,
    protocol); a ValueError names what is wrong. Backend identities use the same form."""
    body, _, proto = text.partition("/")
    proto = proto or "tcp"
    host, sep, port_s = body.rpartition(":")
    if not sep or proto not in IPPROTO:
        raise ValueError(f"{text!r}: expected ADDRESS:PORT, [IPV6]:PORT or either with "
                         "/tcp or /udp")
    bracketed = host.startswith("[") and host.endswith("]")
    try:
        addr: IPAddress = (ipaddress.IPv6Address(host[1:-1]) if bracketed
                           else ipaddress.IPv4Address(host))
        port = int(port_s)
    except ValueError as exc:
        raise ValueError(f"{text!r}: {exc}") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"{text!r}: port must be between 1 and 65535")
    return addr, port, proto


def format_host(addr: IPAddress) -> str:
    """An address as it stands before ':PORT' (IPv6 in brackets)."""
    return str(addr) if addr.version == 4 else f"[{addr}]"


def format_endpoint(addr: int, port: int, proto: int) -> str:
    """Key fields (128-bit address, network-order port) -> parse_endpoint's form."""
    return f"{format_host(ip_of(addr))}:{be16_to_port(port)}/{PROTO_NAME.get(proto, str(proto))}"


def l4_key(addr: IPAddress | str, port: int, proto: str) -> L4Key:
    return L4Key(addr=(ct.c_uint32 * 4)(*to_words(addr128(addr))), port=port_to_be16(port),
                 proto=IPPROTO[proto], pad=0)


class Meta(ct.Structure):
    """struct kvr_meta"""

    _fields_ = [("hash_seed", ct.c_uint64), ("fail_k", ct.c_uint32), ("candidates", ct.c_uint32),
                ("abi_version", ct.c_uint32), ("pad", ct.c_uint32)]


ABI_VERSION = 3

# Every ctypes mirror with the C struct name bcc reports for it.
MIRRORS: dict[str, type[ct.Structure]] = {
    "kvr_l4_key": L4Key, "kvr_svc": Svc, "kvr_svc_name": SvcName, "kvr_backend": Backend,
    "kvr_member_key": MemberKey, "kvr_health": Health, "kvr_aff_key": AffKey,
    "kvr_aff_val": AffVal, "kvr_sk": SkState, "kvr_sock": Sock, "kvr_svc_cnt_val": SvcCounters,
    "kvr_be_cnt_val": BeCounters, "kvr_meta": Meta, "kvr_event": Event,
    "kvr_scratch": Scratch, "kvr_udp_flow": UdpFlow, "kvr_udp": Udp,
}
