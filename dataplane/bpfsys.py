"""Thin ctypes bindings to libbpf (Debian's libbpf1, which bcc itself links).

Only what bcc's Python API lacks: pinning, bpf links (attachments that
outlive the agent, replaced atomically on upgrade), raw map access by fd for
pinned maps, batch updates, and map-in-map inner tables.
"""

from __future__ import annotations

import ctypes as ct
import ctypes.util
import errno
import os
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import TypeVar

import numpy as np

BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_HASH_OF_MAPS = 13
BPF_MAP_TYPE_SK_STORAGE = 24
BPF_MAP_TYPE_RINGBUF = 27
BPF_F_INNER_MAP = 1 << 12
BPF_ANY = 0

# enum bpf_attach_type values used by kvroute (uapi/linux/bpf.h).
ATTACH_CGROUP_SOCK_OPS = 3
ATTACH_CGROUP_INET4_CONNECT = 10
ATTACH_CGROUP_INET6_CONNECT = 11
ATTACH_CGROUP_UDP4_SENDMSG = 14
ATTACH_CGROUP_UDP6_SENDMSG = 15
ATTACH_CGROUP_UDP4_RECVMSG = 19
ATTACH_CGROUP_UDP6_RECVMSG = 20
ATTACH_CGROUP_SETSOCKOPT = 22
ATTACH_CGROUP_INET4_GETPEERNAME = 29
ATTACH_CGROUP_INET6_GETPEERNAME = 30
ATTACH_CGROUP_INET_SOCK_RELEASE = 34

# enum bpf_prog_type values (bcc 0.26 lacks CGROUP_SOCKOPT).
PROG_SCHED_CLS = 3  # tc programs (the packet path)
PROG_CGROUP_SOCK = 9
PROG_SOCK_OPS = 13
PROG_CGROUP_SOCK_ADDR = 18
PROG_CGROUP_SOCKOPT = 25

# enum bpf_func_id values of the helpers dataplane.features asks the kernel about.
FUNC_GET_SOCKET_COOKIE = 46
FUNC_FIB_LOOKUP = 69
FUNC_REDIRECT_NEIGH = 152
FUNC_SK_STORAGE_GET = 107
FUNC_GET_NETNS_COOKIE = 122
FUNC_RINGBUF_OUTPUT = 130
FUNC_SET_RETVAL = 187


# int (*ring_buffer_sample_fn)(void *ctx, void *data, size_t size)
RINGBUF_SAMPLE_FN = ct.CFUNCTYPE(ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_size_t)


@cache
def _lib() -> ct.CDLL:
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    lib = ct.CDLL(name, use_errno=True)
    vp, u32, i32 = ct.c_void_p, ct.c_uint32, ct.c_int
    sigs: dict[str, tuple[list[object], object]] = {
        "bpf_obj_get": ([ct.c_char_p], i32),
        "bpf_obj_pin": ([i32, ct.c_char_p], i32),
        "bpf_map_lookup_elem": ([i32, vp, vp], i32),
        "bpf_map_update_elem": ([i32, vp, vp, ct.c_uint64], i32),
        "bpf_map_delete_elem": ([i32, vp], i32),
        "bpf_map_get_next_key": ([i32, vp, vp], i32),
        "bpf_map_update_batch": ([i32, vp, vp, ct.POINTER(u32), vp], i32),
        "bpf_map_delete_batch": ([i32, vp, ct.POINTER(u32), vp], i32),
        "bpf_map_get_fd_by_id": ([u32], i32),
        "bpf_link_create": ([i32, i32, u32, vp], i32),
        "bpf_link_update": ([i32, i32, vp], i32),
        "bpf_link_detach": ([i32], i32),
        "bpf_obj_get_info_by_fd": ([i32, vp, ct.POINTER(u32)], i32),
        "bpf_enable_stats": ([i32], i32),
        "bpf_prog_load": ([u32, ct.c_char_p, ct.c_char_p, vp, ct.c_size_t, vp], i32),
        "libbpf_probe_bpf_helper": ([u32, u32, vp], i32),
        "libbpf_probe_bpf_map_type": ([u32, vp], i32),
        "ring_buffer__new": ([i32, RINGBUF_SAMPLE_FN, vp, vp], vp),
        "ring_buffer__poll": ([vp, i32], i32),
        "ring_buffer__consume": ([vp], i32),
        "ring_buffer__epoll_fd": ([vp], i32),
        "ring_buffer__free": ([vp], None),
        "bpf_prog_test_run_opts": ([i32, vp], i32),
    }
    for fn, (argtypes, restype) in sigs.items():
        f = getattr(lib, fn)
        f.argtypes = argtypes
        f.restype = restype
    return lib


@cache
def _bcc() -> ct.CDLL:
    lib = ct.CDLL("libbcc.so.0", use_errno=True)
    lib.bcc_create_map.argtypes = [ct.c_int, ct.c_char_p, ct.c_int, ct.c_int, ct.c_int, ct.c_int]
    lib.bcc_create_map.restype = ct.c_int
    return lib


def _check(ret: int, what: str) -> int:
    # libbpf 1.x returns -errno from every call.
    if ret < 0:
        raise OSError(-ret, f"{what}: {os.strerror(-ret)}")
    return ret


def obj_get(path: Path | str) -> int:
    return _check(_lib().bpf_obj_get(str(path).encode()), f"open pinned {path}")


def obj_pin(fd: int, path: Path | str) -> None:
    _check(_lib().bpf_obj_pin(fd, str(path).encode()), f"pin {path}")


def lookup(fd: int, key: object, value: object) -> bool:
    ret = _lib().bpf_map_lookup_elem(fd, ct.byref(key), ct.byref(value))  # type: ignore[arg-type]
    if ret == -errno.ENOENT:
        return False
    _check(ret, "map lookup")
    return True


# Unpreallocated hash maps take elements from a per-CPU cache that the kernel
# refills asynchronously; a burst of updates from user space can find it empty
# and get ENOMEM although memory is plentiful. Such a write is retried after a
# moment instead of failing an apply.
_ENOMEM_RETRIES = 200


def update(fd: int, key: object, value: object, flags: int = BPF_ANY) -> None:
    for _ in range(_ENOMEM_RETRIES):
        ret = _lib().bpf_map_update_elem(fd, ct.byref(key), ct.byref(value), flags)  # type: ignore[arg-type]
        if ret != -errno.ENOMEM:
            break
        time.sleep(0.001)
    _check(ret, "map update")


def delete(fd: int, key: object) -> bool:
    ret = _lib().bpf_map_delete_elem(fd, ct.byref(key))  # type: ignore[arg-type]
    if ret == -errno.ENOENT:
        return False
    _check(ret, "map delete")
    return True


def next_key(fd: int, key: object | None, out: object) -> bool:
    ret = _lib().bpf_map_get_next_key(fd, None if key is None else ct.byref(key), ct.byref(out))  # type: ignore[arg-type]
    if ret == -errno.ENOENT:
        return False
    _check(ret, "map iterate")
    return True


# The kernel's own "operation not supported" (include/linux/errno.h), which user space
# has no name for: what a batch call on a map type without batch operations returns.
ENOTSUPP_KERNEL = 524


def update_batch(fd: int, keys: np.ndarray, values: np.ndarray) -> None:
    """Many entries per syscall (BPF_MAP_UPDATE_BATCH), from packed numpy arrays
    (one row per entry). A batch cut short by ENOMEM resumes where it stopped.

    A map type this kernel has no batch update for (ENOTSUPP: some of kvroute's on
    5.10, found by the kernel matrix) gets the rest one entry at a time: slower, the
    same result."""
    count = len(keys)
    if len(values) != count:
        raise ValueError(f"{count} keys but {len(values)} values")
    kstride, vstride = keys.strides[0] if keys.ndim else 0, values.strides[0] if values.ndim else 0
    done, retries = 0, 0
    while done < count:
        n = ct.c_uint32(count - done)
        ret = _lib().bpf_map_update_batch(fd, keys.ctypes.data + done * kstride,
                                          values.ctypes.data + done * vstride, ct.byref(n), None)
        if ret == -ENOTSUPP_KERNEL:
            # Refused before any write, and n still holds what was asked for.
            for i in range(done, count):
                _update_raw(fd, keys.ctypes.data + i * kstride, values.ctypes.data + i * vstride)
            return
        done += n.value
        if ret == -errno.ENOMEM and retries < _ENOMEM_RETRIES:
            retries += 1
            time.sleep(0.001)
            continue
        _check(ret, "map batch update")


def _update_raw(fd: int, key: int, value: int) -> None:
    """One entry from addresses into packed rows (update_batch's fallback)."""
    for _ in range(_ENOMEM_RETRIES):
        ret = _lib().bpf_map_update_elem(fd, ct.c_void_p(key), ct.c_void_p(value), BPF_ANY)
        if ret != -errno.ENOMEM:
            break
        time.sleep(0.001)
    _check(ret, "map update")


def delete_batch(fd: int, keys: np.ndarray) -> None:
    """Delete packed keys, all present (ENOENT at the first absent one). Map types
    without a batch delete in this kernel get the keys one at a time, stopping as the
    batch would."""
    if len(keys) == 0:
        return
    n = ct.c_uint32(len(keys))
    ret = _lib().bpf_map_delete_batch(fd, keys.ctypes.data, ct.byref(n), None)
    if ret == -ENOTSUPP_KERNEL:
        stride = keys.strides[0] if keys.ndim else 0
        for i in range(len(keys)):  # refused before any delete (n is not an answer)
            _check(_lib().bpf_map_delete_elem(fd, ct.c_void_p(keys.ctypes.data + i * stride)),
                   "map delete")
        return
    _check(ret, "map batch delete")


def delete_each(fd: int, keys: np.ndarray) -> int:
    """Delete the entries of packed keys one by one, those absent included (a batch
    delete stops at the first absent key): for undoing a write that may have been cut
    short. Returns how many were there."""
    stride = keys.strides[0] if keys.ndim else 0
    gone = 0
    for i in range(len(keys)):
        ret = _lib().bpf_map_delete_elem(fd, ct.c_void_p(keys.ctypes.data + i * stride))
        if ret != -errno.ENOENT:
            _check(ret, "map delete")
            gone += 1
    return gone


def map_fd_by_id(map_id: int) -> int:
    return _check(_lib().bpf_map_get_fd_by_id(map_id), f"open map id {map_id}")


BPF_F_MMAPABLE = 1 << 10
BPF_LINK_TYPE_CGROUP = 3  # enum bpf_link_type


def _create_map(map_type: int, name: str, key_size: int, value_size: int, max_entries: int,
                flags: int) -> int:
    # The kernel keeps 15 characters of an object's name.
    return int(_bcc().bcc_create_map(map_type, name.encode()[:15], key_size, value_size,
                                     max_entries, flags))


def create_map(map_type: int, name: str, key_size: int, value_size: int, max_entries: int,
               flags: int = 0) -> int:
    """A new map, unpinned; the caller owns the fd."""
    return _check(_create_map(map_type, name, key_size, value_size, max_entries, flags),
                  f"create map {name}")


def create_table_group(slots: int, name: str) -> int:
    """An array of u32 backend ids, compatible with kvr_tbl_tmpl, writable by mmap."""
    fd = _create_map(BPF_MAP_TYPE_ARRAY, name, 4, 4, slots, BPF_F_INNER_MAP | BPF_F_MMAPABLE)
    return _check(fd, f"create table group {name} ({slots} slots)")


class MapInfo(ct.Structure):
    """The head of struct bpf_map_info (uapi/linux/bpf.h): the kernel fills what fits."""

    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("key_size", ct.c_uint32),
                ("value_size", ct.c_uint32), ("max_entries", ct.c_uint32),
                ("map_flags", ct.c_uint32), ("name", ct.c_char * 16)]


class LinkInfo(ct.Structure):
    """The head of struct bpf_link_info with the cgroup member of its union (8-byte
    aligned after type, id and prog_id)."""

    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("prog_id", ct.c_uint32),
                ("pad", ct.c_uint32), ("cgroup_id", ct.c_uint64), ("attach_type", ct.c_uint32),
                ("pad2", ct.c_uint32)]


InfoT = TypeVar("InfoT", MapInfo, LinkInfo)


def _info(fd: int, info_t: type[InfoT], what: str) -> InfoT:
    info = info_t()
    size = ct.c_uint32(ct.sizeof(info))
    _check(_lib().bpf_obj_get_info_by_fd(fd, ct.byref(info), ct.byref(size)), what)
    return info


def map_info(fd: int) -> MapInfo:
    return _info(fd, MapInfo, "map info")


def link_info(fd: int) -> LinkInfo:
    return _info(fd, LinkInfo, "link info")


# struct bpf_prog_info (uapi/linux/bpf.h): id at 4, run_time_ns at 192, run_cnt at 200
# (the kernel fills what fits in the size given; the rest of the buffer stays zero).
_PROG_INFO_SIZE = 208
_PROG_ID, _PROG_RUN_TIME, _PROG_RUN_CNT = 4, 192, 200
BPF_STATS_RUN_TIME = 0  # enum bpf_stats_type


def enable_stats() -> int:
    """BPF_ENABLE_STATS: the kernel counts every program's run time and runs while the
    returned fd is open (close it to stop; a reference, so other holders are unaffected)."""
    return _check(_lib().bpf_enable_stats(BPF_STATS_RUN_TIME), "enable BPF run-time stats")


def prog_run_stats(fd: int) -> tuple[int, int]:
    """(run_time_ns, run_cnt) of a program fd: totals since load, counted only while
    stats are enabled; a tail-called program's time is its caller's."""
    buf = ct.create_string_buffer(_PROG_INFO_SIZE)
    size = ct.c_uint32(_PROG_INFO_SIZE)
    _check(_lib().bpf_obj_get_info_by_fd(fd, buf, ct.byref(size)), "program info")
    run_time = int.from_bytes(buf.raw[_PROG_RUN_TIME:_PROG_RUN_TIME + 8], "little")
    run_cnt = int.from_bytes(buf.raw[_PROG_RUN_CNT:_PROG_RUN_CNT + 8], "little")
    return run_time, run_cnt


def prog_id(fd: int) -> int:
    buf = ct.create_string_buffer(_PROG_INFO_SIZE)
    size = ct.c_uint32(_PROG_INFO_SIZE)
    _check(_lib().bpf_obj_get_info_by_fd(fd, buf, ct.byref(size)), "program info")
    return int.from_bytes(buf.raw[_PROG_ID:_PROG_ID + 4], "little")


def map_max_entries(fd: int) -> int:
    return int(map_info(fd).max_entries)


def obj_kind(fd: int) -> str:
    """"map", "link" or "prog" for a BPF object's fd, "" for anything else. The info call
    cannot tell: it fills whatever struct it is given, so the file's anon inode name does."""
    target = os.readlink(f"/proc/self/fd/{fd}")
    # Links were "bpf_link" before Linux 6.x named them "bpf-link" like the others.
    return {"anon_inode:bpf-map": "map", "anon_inode:bpf-link": "link",
            "anon_inode:bpf_link": "link", "anon_inode:bpf-prog": "prog"}.get(target, "")


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    return _check(_lib().bpf_link_create(prog_fd, target_fd, attach_type, None), "bpf link create")


# -- feature probes (dataplane.features says what is asked, and why) ----------------------

class _ProgLoadOpts(ct.Structure):
    """The head of libbpf's struct bpf_prog_load_opts: libbpf reads only the ``sz`` bytes
    a caller declares, so the fields after expected_attach_type may stay off."""

    _fields_ = [("sz", ct.c_size_t), ("attempts", ct.c_int),
                ("expected_attach_type", ct.c_uint32)]


# r0 = 1; exit: the smallest program every program type accepts.
_RETURN_ONE = bytes([0xB7, 0, 0, 0, 1, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0])


def _probe_result(ret: int, what: str, absent: tuple[int, ...]) -> bool:
    if ret >= 0:
        return True
    if -ret in absent:
        return False
    raise OSError(-ret, f"probing {what}: {os.strerror(-ret)}")


def probe_prog(prog_type: int, attach_type: int | None) -> bool:
    """Does a program of this type (expected to attach at ``attach_type``) load?"""
    opts = _ProgLoadOpts(sz=ct.sizeof(_ProgLoadOpts),
                         expected_attach_type=attach_type or 0)
    insns = ct.create_string_buffer(_RETURN_ONE, len(_RETURN_ONE))
    fd = _lib().bpf_prog_load(prog_type, b"kvr_probe", b"GPL", insns, len(_RETURN_ONE) // 8,
                              ct.byref(opts) if attach_type is not None else None)
    if fd >= 0:
        os.close(fd)
    # EINVAL: unknown type or attach type; E2BIG: attr fields this kernel predates.
    return _probe_result(fd, f"program type {prog_type}", (errno.EINVAL, errno.E2BIG))


def probe_helper(prog_type: int, helper: int) -> bool:
    """May a program of this type call helper number ``helper``? (libbpf reads the
    verifier's "unknown func" / "invalid func" answer.)"""
    ret = _lib().libbpf_probe_bpf_helper(prog_type, helper, None)
    return _probe_result(ret, f"helper {helper}", (errno.EINVAL,)) and ret == 1


def probe_map(map_type: int, flags: int) -> bool:
    """Can a map of this type (with these flags) be created?"""
    if flags:
        # libbpf's probe takes no flags: create the smallest such map ourselves.
        fd = _create_map(map_type, "kvr_probe", 4, 4, 1, flags)
        if fd >= 0:
            os.close(fd)
        return _probe_result(fd, f"map type {map_type} flags {flags:#x}", (errno.EINVAL,))
    ret = _lib().libbpf_probe_bpf_map_type(map_type, None)
    return _probe_result(ret, f"map type {map_type}", (errno.EINVAL,)) and ret == 1


def probe_link() -> bool:
    """Does the kernel have BPF_LINK_CREATE? Asked with no program: a kernel that knows
    the command looks the program fd up (EBADF); one that does not says EINVAL."""
    ret = _lib().bpf_link_create(-1, -1, ATTACH_CGROUP_INET4_CONNECT, None)
    if ret == -errno.EBADF:
        return True
    return _probe_result(ret, "BPF_LINK_CREATE", (errno.EINVAL,))


def link_update(link_fd: int, prog_fd: int) -> None:
    """Swap the program behind a link atomically: no connect() goes unhooked."""
    _check(_lib().bpf_link_update(link_fd, prog_fd, None), "bpf link update")


def link_detach(link_fd: int) -> None:
    _check(_lib().bpf_link_detach(link_fd), "bpf link detach")


def link_cgroup_id(link_fd: int) -> int:
    """The cgroup a cgroup link is attached to (0 once it is detached)."""
    return int(link_info(link_fd).cgroup_id)


@cache
def possible_cpus() -> int:
    """Per-CPU map values hold one slot per possible CPU, not per online one."""
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    count = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        count += (int(hi) if hi else int(lo)) - int(lo) + 1
    return count


class RingBuffer:
    """A BPF ring buffer map read through libbpf's ring_buffer API, by map fd (a pinned
    ring works from any process). ``on_sample`` gets each record's bytes; it runs inside
    poll() and consume(), on the caller's thread. An exception it raises stops the
    consumption (that record is consumed) and is raised again by poll()/consume():
    ctypes would otherwise print and swallow it."""

    def __init__(self, map_fd: int, on_sample: Callable[[bytes], None]) -> None:
        self._error: BaseException | None = None

        def sample(_ctx: int | None, data: int | None, size: int) -> int:
            try:
                on_sample(ct.string_at(data or 0, size))
            except BaseException as exc:  # re-raised on the caller's side of libbpf
                self._error = exc
                return -1
            return 0

        # Kept on the object: libbpf calls it for as long as the ring lives.
        self._callback = RINGBUF_SAMPLE_FN(sample)
        ptr = _lib().ring_buffer__new(map_fd, self._callback, None, None)
        if not ptr:
            err = ct.get_errno() or errno.EINVAL
            raise OSError(err, f"ring buffer on map fd {map_fd}: {os.strerror(err)}")
        self._rb: int | None = ptr

    def _ptr(self) -> int:
        if self._rb is None:
            raise ValueError("ring buffer is closed")
        return self._rb

    def _raise_pending(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def poll(self, timeout_ms: int) -> int:
        """Wait up to timeout_ms for records; returns how many were consumed."""
        ret = _lib().ring_buffer__poll(self._ptr(), timeout_ms)
        self._raise_pending()
        if ret == -errno.EINTR:
            return 0
        return _check(ret, "ring buffer poll")

    def consume(self) -> int:
        """Consume what is there without waiting; returns how many records."""
        ret = _lib().ring_buffer__consume(self._ptr())
        self._raise_pending()
        return _check(ret, "ring buffer consume")

    def epoll_fd(self) -> int:
        """An fd that becomes readable when records wait (for an event loop)."""
        return _check(_lib().ring_buffer__epoll_fd(self._ptr()), "ring buffer epoll fd")

    def close(self) -> None:
        if self._rb is not None:
            _lib().ring_buffer__free(self._rb)
            self._rb = None


class TestRunOpts(ct.Structure):
    """libbpf's struct bpf_test_run_opts (libbpf 1.x)."""

    _fields_ = [("sz", ct.c_size_t), ("data_in", ct.c_void_p), ("data_out", ct.c_void_p),
                ("data_size_in", ct.c_uint32), ("data_size_out", ct.c_uint32),
                ("ctx_in", ct.c_void_p), ("ctx_out", ct.c_void_p),
                ("ctx_size_in", ct.c_uint32), ("ctx_size_out", ct.c_uint32),
                ("retval", ct.c_uint32), ("repeat", ct.c_int), ("duration", ct.c_uint32),
                ("flags", ct.c_uint32), ("cpu", ct.c_uint32), ("batch_size", ct.c_uint32)]


def test_run(prog_fd: int, data: bytes, repeat: int = 1) -> tuple[int, bytes, int]:
    """BPF_PROG_TEST_RUN: run a packet program on a frame. Returns (the program's return
    value, the frame as the program left it, mean ns per run)."""
    data_in = ct.create_string_buffer(data, len(data))
    out = ct.create_string_buffer(len(data) + 256)
    opts = TestRunOpts(sz=ct.sizeof(TestRunOpts), data_in=ct.cast(data_in, ct.c_void_p),
                       data_out=ct.cast(out, ct.c_void_p), data_size_in=len(data),
                       data_size_out=len(out), repeat=repeat)
    _check(_lib().bpf_prog_test_run_opts(prog_fd, ct.byref(opts)), "BPF_PROG_TEST_RUN")
    return opts.retval, out.raw[:opts.data_size_out], opts.duration
