"""Build-time options of the eBPF programs: one object feeds the C (as -D
flags) and the Python side (hash seed, limits), as Cilium hands its Maglev
seed to the datapath."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from dataplane import hashing, model, uapi

DEFAULT_PIN_DIR = Path("/sys/fs/bpf/kvroute")


@dataclasses.dataclass(frozen=True)
class Settings:
    pin_dir: Path = DEFAULT_PIN_DIR
    hash_seed: int = hashing.DEFAULT_SEED
    fail_k: int = 3              # consecutive failed connects before the kernel trips a backend
    candidates: int = 4          # usable candidates the bounded-load check compares
    max_services: int = model.MAX_SERVICES  # ceilings only: hash maps are not preallocated
    max_backends: int = model.MAX_BACKENDS
    affinity_entries: int = 262144  # LRU size (preallocated by the kernel)
    sock_entries: int = 65536    # translated sockets tracked at once (LRU, preallocated)
    udp_entries: int = 16384     # UDP sockets with reverse translations at once (LRU, 200 B each)
    events_bytes: int = 1 << 20  # kvr_events ring size: a power of two, at least a page
    kernel_headers: str = "auto"  # auto | node | shipped: what bcc compiles against (uapi.py)

    def __post_init__(self) -> None:
        problems = []
        if not 0 <= self.hash_seed < 1 << 64:
            problems.append("hash_seed: must be an unsigned 64-bit integer")
        if not 1 <= self.fail_k <= 1000:
            problems.append("fail_k: must be between 1 and 1000")
        if not 1 <= self.candidates <= 16:
            problems.append("candidates: must be between 1 and 16")
        for name in ("max_services", "max_backends", "affinity_entries", "sock_entries",
                     "udp_entries"):
            if not 16 <= getattr(self, name) <= 1 << 24:
                problems.append(f"{name}: must be between 16 and {1 << 24}")
        if not (4096 <= self.events_bytes <= 1 << 30
                and self.events_bytes & (self.events_bytes - 1) == 0):
            problems.append("events_bytes: must be a power of two between 4096 and 2**30")
        if self.kernel_headers not in uapi.MODES:
            problems.append(f"kernel_headers: must be one of {', '.join(uapi.MODES)}")
        if not self.pin_dir.is_absolute():
            problems.append("pin_dir: must be an absolute path under a bpffs mount")
        if problems:
            raise ValueError("; ".join(problems))

    def cflags(self) -> list[str]:
        return [
            f'-DKVR_PIN_DIR="{self.pin_dir}"',
            f"-DKVR_HASH_SEED={self.hash_seed}ULL",
            f"-DKVR_FAIL_K={self.fail_k}",
            f"-DKVR_CANDIDATES={self.candidates}",
            f"-DKVR_MAX_SERVICES={self.max_services}",
            f"-DKVR_MAX_BACKENDS={self.max_backends}",
            f"-DKVR_AFFINITY_ENTRIES={self.affinity_entries}",
            f"-DKVR_SOCK_ENTRIES={self.sock_entries}",
            f"-DKVR_UDP_ENTRIES={self.udp_entries}",
            f"-DKVR_EVENTS_BYTES={self.events_bytes}",
            f"-DKVR_MOVE_MIN_EXCESS={model.MOVE_MIN_EXCESS}",
        ]
