"""The connect hook's key hashing, in Python (bpf/lib/hash.h).

`kvroute explain` and the tests predict the kernel's choice with these, so
they must give the same numbers as the C; tests/kernel checks them against
real connects.
"""

from __future__ import annotations

from dataplane import abi

_MASK = (1 << 64) - 1
DEFAULT_SEED = 0x6B76726F75746531


def mix64(x: int) -> int:
    """MurmurHash3's 64-bit finaliser (kvr_mix64)."""
    x &= _MASK
    x ^= x >> 33
    x = (x * 0xFF51AFD7ED558CCD) & _MASK
    x ^= x >> 33
    x = (x * 0xC4CEB9FE1A85EC53) & _MASK
    x ^= x >> 33
    return x


def svc_ident(vip: str, port: int, proto: str) -> int:
    """A service's identity in the slot hash (struct kvr_svc.ident), from its first VIP's
    raw (network-order) fields: the same on every node, and shared by a dual-stack
    service's second VIP, so a session hashes alike whichever family its client uses. An
    IPv6 VIP folds its four words into one; an IPv4 VIP gives what kvroute gave before
    IPv6 existed, so IPv4 services keep their tables."""
    key = abi.l4_key(vip, port, proto)
    words = tuple(key.addr)
    folded = words[3] if abi.addr128(vip) >> 32 == 0xFFFF else (
        words[0] ^ words[1] ^ words[2] ^ words[3])
    return ((folded << 32) | (key.port << 8) | key.proto) & _MASK


def slot_hash(key: int, ident: int, n: int, seed: int = DEFAULT_SEED) -> int:
    """kvr_slot_hash: the hash of the nth candidate slot for a key."""
    return mix64(key ^ seed ^ mix64(ident) ^ ((n * 0x9E3779B97F4A7C15) & _MASK))
